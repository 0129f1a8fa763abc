"""``bnfold fuse`` through the CLI: outputs, exit codes, JSON, files left behind."""

from __future__ import annotations

import hashlib
import json
import textwrap

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from bnfold.cli import app
from tests.helpers import write_arch

ARCH_SOURCE = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, width=8):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(width)
            self.up = nn.ConvTranspose2d(width, width, 2, stride=2, groups=2)
            self.bn_up = nn.BatchNorm2d(width)
            self.pre = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.neck = nn.BatchNorm1d(width)
            self.fc = nn.Linear(width, 4)

        def forward(self, x):
            x = torch.relu(self.bn(self.conv(x)))
            x = torch.relu(self.bn_up(self.up(x)))
            x = self.conv2(self.pre(x))
            return self.fc(self.neck(torch.flatten(self.pool(torch.relu(x)), 1)))
""")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def net_files(tmp_path):
    """A state_dict with real statistics and the file that defines its architecture."""
    arch, namespace = write_arch(tmp_path, ARCH_SOURCE)
    torch.manual_seed(0)
    model = namespace["Net"]()
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        for _ in range(3):
            model(torch.randn(4, 3, 8, 8) * 2 + 1)
    weights = tmp_path / "net.pt"
    torch.save(model.state_dict(), weights)
    return weights, f"{arch}:Net"


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fuse_writes_verified_onnx_and_json(runner, net_files, tmp_path):
    """fuse folds all four BNs (conv, grouped transpose, two forward), writes verified ONNX."""
    weights, arch = net_files
    digest = sha(weights)
    out = tmp_path / "net.onnx"
    result = runner.invoke(
        app,
        [
            "fuse",
            str(weights),
            "--arch",
            arch,
            "--input-shape",
            "1,3,8,8",
            "--out",
            str(out),
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema_version"] == 1
    assert {f["bn"]: f["direction"] for f in report["folded"]} == {
        "bn": "backward",
        "bn_up": "backward",
        "pre": "forward",
        "neck": "forward",
    }
    assert report["skipped"] == []
    assert report["verification"]["passed"] is True
    assert report["verification"]["max_rel_error"] < 1e-5
    assert report["output"] == str(out)
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert report["onnx_bn_nodes"] == 0
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert sha(weights) == digest  # the input is never modified
    assert [p.name for p in tmp_path.iterdir() if "bnfold-tmp" in p.name] == []


def test_fuse_refuses_to_overwrite_input_or_existing_output(runner, net_files, tmp_path):
    """--out equal to the input, or an existing file without --force, exit 2 and write nothing."""
    weights, arch = net_files
    digest = sha(weights)
    result = runner.invoke(app, ["fuse", str(weights), "--arch", arch, "--out", str(weights)])
    assert result.exit_code == 2
    assert "refusing to overwrite the input" in result.output
    assert sha(weights) == digest
    existing = tmp_path / "old.onnx"
    existing.write_bytes(b"previous")
    result = runner.invoke(app, ["fuse", str(weights), "--arch", arch, "--out", str(existing)])
    assert result.exit_code == 2
    assert "--force" in result.output
    assert existing.read_bytes() == b"previous"
    same = tmp_path / "both.onnx"
    result = runner.invoke(
        app, ["fuse", str(weights), "--arch", arch, "--out", str(same), "--save-torch", str(same)]
    )
    assert result.exit_code == 2
    assert "name the same file" in result.output
    assert not same.exists()
    result = runner.invoke(
        app, ["fuse", str(weights), "--arch", arch, "--out", str(existing), "--force"]
    )
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(onnx.load(str(existing)))


def test_fuse_exits_1_when_verification_fails(runner, net_files, tmp_path):
    """Tolerances of zero cannot be met by float32 arithmetic: verification fails, exit 1."""
    weights, arch = net_files
    result = runner.invoke(
        app,
        [
            "fuse",
            str(weights),
            "--arch",
            arch,
            "--out",
            str(tmp_path / "m.onnx"),
            "--atol",
            "0",
            "--rtol",
            "0",
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["verification"]["passed"] is False


def test_failed_verification_setup_leaves_no_output(runner, net_files, tmp_path):
    """An --inputs file that does not fit the model: exit 2, no output, no temp files."""
    weights, arch = net_files
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.zeros((1, 5, 8, 8), np.float32))
    out = tmp_path / "m.onnx"
    result = runner.invoke(
        app, ["fuse", str(weights), "--arch", arch, "--out", str(out), "--inputs", str(npz)]
    )
    assert result.exit_code != 0
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npz", "net.pt", "net.py"]


def test_fuse_uses_real_inputs_and_saves_torch(runner, net_files, tmp_path):
    """--inputs is verified on; --save-torch writes a torch.export archive equal to the model."""
    weights, arch = net_files
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32))
    pt2 = tmp_path / "folded.pt2"
    result = runner.invoke(
        app,
        [
            "fuse",
            str(weights),
            "--arch",
            arch,
            "--out",
            str(tmp_path / "m.onnx"),
            "--inputs",
            str(npz),
            "--save-torch",
            str(pt2),
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert str(npz) in report["verification"]["input_source"]
    # the .npz, a seeded random batch, one scaled by 100 and a random one of another batch
    # size (issue 13: verification looks where errors hide)
    assert report["verification"]["inputs"] == 4
    program = torch.export.load(pt2)
    names = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert not any("batch_norm" in str(t) for t in names)


def test_bare_state_dict_needs_arch(runner, net_files, tmp_path):
    """fuse on weights alone exits 2 and asks for --arch."""
    weights, _ = net_files
    result = runner.invoke(app, ["fuse", str(weights), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2
    assert "--arch" in result.output
    assert "Traceback" not in result.output


def test_markdown_and_table_formats(runner, net_files, tmp_path):
    """The table and markdown name every folded BN and the verification verdict."""
    weights, arch = net_files
    result = runner.invoke(
        app,
        [
            "fuse",
            str(weights),
            "--arch",
            arch,
            "--out",
            str(tmp_path / "a.onnx"),
            "--format",
            "markdown",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| `bn_up` | `up` | backward | convtranspose_bn |" in result.stdout
    assert "Verification passed" in result.stdout
    result = runner.invoke(
        app, ["fuse", str(weights), "--arch", arch, "--out", str(tmp_path / "b.onnx")]
    )
    assert result.exit_code == 0, result.output
    assert "verification PASSED" in result.stdout
    assert "folded ← conv2 (bn_conv)" in result.stdout


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_same_input_gives_byte_identical_onnx(runner, net_files, tmp_path, exporter):
    """Two runs of the same command write byte-identical ONNX files, with either exporter."""
    weights, arch = net_files
    digests = []
    for name in ("a.onnx", "b.onnx"):
        result = runner.invoke(
            app,
            [
                "fuse",
                str(weights),
                "--arch",
                arch,
                "--out",
                str(tmp_path / name),
                "--exporter",
                exporter,
                "--format",
                "json",
            ],
        )
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["verification"]["passed"]
        digests.append(sha(tmp_path / name))
    assert digests[0] == digests[1]


TWO_INPUTS = textwrap.dedent("""
    import torch
    from torch import nn

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.image = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.tabular = nn.Linear(5, 4)
            self.bn_meta = nn.BatchNorm1d(4)

        def forward(self, x, m):
            a = self.bn(self.image(x)).mean((2, 3))
            return {"sum": a + self.bn_meta(self.tabular(m)), "image": a}
""")


def fuse_two_inputs(runner, weights, arch, out, *extra: str):
    """``bnfold fuse`` on a TwoInputs state_dict, with both input shapes."""
    return runner.invoke(
        app,
        [
            "fuse", str(weights), "--arch", f"{arch}:TwoInputs", "--input-shape", "1,3,6,6",
            "--input-shape", "1,5", "--out", str(out), *extra,
        ],
    )  # fmt: skip


def test_several_inputs_and_dict_outputs(runner, tmp_path):
    """Two --input-shape options feed a two-input model; both dict outputs are verified."""
    arch, namespace = write_arch(tmp_path, TWO_INPUTS, "two")
    torch.manual_seed(0)
    model = namespace["TwoInputs"]()
    with torch.no_grad():
        model(torch.randn(4, 3, 6, 6), torch.randn(4, 5))  # train mode: statistics move
    weights = tmp_path / "two.pt"
    torch.save(model.state_dict(), weights)
    result = fuse_two_inputs(runner, weights, arch, tmp_path / "two.onnx", "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {f["bn"] for f in report["folded"]} == {"bn", "bn_meta"}
    assert [o["name"] for o in report["verification"]["outputs"]] == ["['sum']", "['image']"]
    assert report["verification"]["passed"]
    model_proto = onnx.load(str(tmp_path / "two.onnx"))
    assert len(model_proto.graph.input) == 2


def test_submodule_named_like_a_graphmodule_attribute_is_a_clear_error(runner, tmp_path):
    """A submodule called `meta` (which torch.fx cannot hold) exits 2 with a hint, not 3."""
    source = TWO_INPUTS.replace("self.tabular", "self.meta")
    arch, namespace = write_arch(tmp_path, source, "clash")
    weights = tmp_path / "clash.pt"
    torch.save(namespace["TwoInputs"]().state_dict(), weights)
    result = fuse_two_inputs(runner, weights, arch, tmp_path / "o.onnx")
    assert result.exit_code == 2, result.output
    assert "renamed" in result.stderr


def _sample_rate_model(path):
    """An ONNX model whose int64 input ``sr`` must be 16000 (a reshape needs sr // 16000 ==
    1), as silero-vad's must be 8000 or 16000, with a MatMul+Add+BN to fold."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "scale"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "shift"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "var"),
        numpy_helper.from_array(np.array([16000], dtype=np.int64), "rate"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "minus_one"),
        numpy_helper.from_array(np.array([4], dtype=np.int64), "four"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["lin"]),
        helper.make_node("BatchNormalization", ["lin", "scale", "shift", "mean", "var"], ["bn"]),
        helper.make_node("Div", ["sr", "rate"], ["k"]),
        helper.make_node("Mul", ["k", "four"], ["width"]),
        helper.make_node("Concat", ["minus_one", "width"], ["shape"], axis=0),
        helper.make_node("Reshape", ["bn", "shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "sr",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_onnx_integer_inputs_take_the_values_of_the_users_data(runner, tmp_path):
    """Issue 13: random verification batches gave silero-vad's ``sr`` values the model does
    not accept, and --inputs could not replace them; with --inputs, integer inputs take
    the data's values, and --verify-batches 0 feeds the data alone (plus its scaled copy)."""
    model = tmp_path / "sr.onnx"
    _sample_rate_model(model)
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32),
             sr=np.array([16000], dtype=np.int64))  # fmt: skip
    base = ["fuse", str(model), "--inputs", str(npz), "--force", "--format", "json"]
    for extra in ([], ["--verify-batches", "0"]):
        result = runner.invoke(app, [*base, "--out", str(tmp_path / "f.onnx"), *extra])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["verification"]["passed"] and len(report["folded"]) == 1
        assert any("scaled by 100" in f for f in report["verification"]["fed"])
    refused = runner.invoke(app, ["fuse", str(model), "--verify-batches", "0",
                                  "--out", str(tmp_path / "g.onnx")])  # fmt: skip
    assert refused.exit_code == 2 and "--inputs" in refused.stderr

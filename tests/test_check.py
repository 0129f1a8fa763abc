"""``bnfold check``, the CI gate (bnfold/gate.py, bnfold/cli/check.py)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

from bnfold.cli import app
from tests import corrupt

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
ARCH = f"{SAMPLES / 'archs.py'}:ConvNet"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def folded(tmp_path_factory) -> Path:
    """The sample ConvNet folded by bnfold fuse: no BatchNormalization left."""
    out = tmp_path_factory.mktemp("folded") / "convnet.onnx"
    result = CliRunner().invoke(
        app,
        [
            "fuse",
            str(SAMPLES / "convnet.state_dict.pt"),
            "--arch",
            ARCH,
            "--input-shape",
            "1,3,32,32",
            "--out",
            str(out),
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def test_clean_folded_model_passes(runner, folded):
    """A folded model passes every check: exit 0, every check named in JSON."""
    result = runner.invoke(app, ["check", str(folded), "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (f,) = report["files"]
    assert f["passed"] is True
    assert [c["name"] for c in f["checks"]] == [
        "checker",
        "shape_inference",
        "weights_finite",
        "batchnorm",
        "onnxruntime",
        "outputs_finite",
    ]
    assert report["exit_code"] == 0


def test_bn_left_fails_and_names_the_node(runner):
    """An export with BatchNormalization left fails (exit 1) and names each node; --max-bn
    raises the limit."""
    model = SAMPLES / "convnet.onnx"
    result = runner.invoke(app, ["check", str(model)])
    assert result.exit_code == 1, result.output
    names = [n.name for n in onnx.load(str(model)).graph.node if n.op_type == "BatchNormalization"]
    assert names and all(
        name in result.stdout.replace("\n", "").replace(" ", "")
        for name in (n.replace(" ", "") for n in names)
    )
    result = runner.invoke(app, ["check", str(model), "--max-bn", str(len(names))])
    assert result.exit_code == 0, result.output


def test_reference_catches_changed_weights(runner, folded, tmp_path):
    """--reference: the folded model matches its PyTorch original; one changed weight fails."""
    ok = runner.invoke(
        app,
        [
            "check",
            str(folded),
            "--reference",
            str(SAMPLES / "convnet.state_dict.pt"),
            "--arch",
            ARCH,
            "--format",
            "json",
        ],
    )
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.stdout)
    assert report["files"][0]["outputs"][0]["max_rel_error"] < 1e-5
    proto = onnx.load(str(folded))
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    init = next(i for i in proto.graph.initializer if i.name == conv.input[1])
    w = numpy_helper.to_array(init).copy()
    w *= 1.02
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    changed = tmp_path / "changed.onnx"
    onnx.save(proto, str(changed))
    bad = runner.invoke(
        app,
        [
            "check",
            str(changed),
            "--reference",
            str(SAMPLES / "convnet.state_dict.pt"),
            "--arch",
            ARCH,
        ],
    )
    assert bad.exit_code == 1, bad.output
    assert "reference" in bad.stdout


def test_onnx_reference_and_real_inputs(runner, folded):
    """An ONNX original works as --reference, with real inputs from --inputs."""
    result = runner.invoke(
        app,
        [
            "check",
            str(folded),
            "--reference",
            str(SAMPLES / "convnet.onnx"),
            "--inputs",
            str(SAMPLES / "convnet.inputs.npz"),
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    (f,) = json.loads(result.stdout)["files"]
    assert f["outputs"][0]["shape"] == [8, 10]


def test_nan_weight_fails(runner, folded, tmp_path):
    """NaN in an initializer fails weights_finite and outputs_finite."""
    proto = onnx.load(str(folded))
    init = proto.graph.initializer[0]
    w = numpy_helper.to_array(init).copy()
    w.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    path = tmp_path / "nan.onnx"
    onnx.save(proto, str(path))
    result = runner.invoke(app, ["check", str(path), "--format", "json"])
    assert result.exit_code == 1
    checks = {c["name"]: c["passed"] for c in json.loads(result.stdout)["files"][0]["checks"]}
    assert checks["weights_finite"] is False
    assert checks["outputs_finite"] is False


@pytest.mark.parametrize("kind", ["truncated", "not_onnx", "missing"])
def test_unreadable_file_exits_2(runner, folded, tmp_path, kind):
    """A truncated file, a non-ONNX file and a missing path exit 2."""
    if kind == "truncated":
        path = tmp_path / "cut.onnx"
        path.write_bytes(folded.read_bytes()[:1000])
    elif kind == "not_onnx":
        path = tmp_path / "weights.onnx"
        torch.save(corrupt.small_state_dict(), path)
    else:
        path = tmp_path / "nowhere.onnx"
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_several_files_one_summary_worst_exit(runner, folded):
    """Two files, one failing: both reported, exit 1."""
    result = runner.invoke(
        app, ["check", str(folded), str(SAMPLES / "convnet.onnx"), "--format", "json"]
    )
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert [f["passed"] for f in report["files"]] == [True, False]


def test_junit_is_valid_xml_with_a_case_per_check(runner, folded):
    """JUnit XML: a testsuite per file, a testcase per check, failures where checks fail."""
    result = runner.invoke(
        app, ["check", str(folded), str(SAMPLES / "convnet.onnx"), "--format", "junit"]
    )
    assert result.exit_code == 1
    root = ET.fromstring(result.stdout.split("\n", 1)[1])
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == [str(folded), str(SAMPLES / "convnet.onnx")]
    assert len(suites[0].findall("testcase")) == 6
    failed = [c.get("name") for c in suites[1].findall("testcase") if c.find("failure") is not None]
    assert failed == ["batchnorm"]


def test_symbolic_dimensions_need_input_shape(runner, tmp_path):
    """A graph input with a symbolic non-batch dimension asks for --input-shape (exit 2)."""
    from onnx import TensorProto, helper

    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        "sym",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, None, 6])],
        [weight],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "sym.onnx"
    onnx.save(proto, str(path))
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 2
    assert "--input-shape" in result.stderr
    result = runner.invoke(app, ["check", str(path), "--input-shape", "1,3,8,8"])
    assert result.exit_code == 0, result.output


def test_nan_stored_in_float_data_fails_weights_finite(tmp_path):
    """A tensor stored in float_data (not raw_data) is read like any other: its NaN fails
    weights_finite."""
    from onnx import helper

    proto = onnx.load(str(SAMPLES / "convnet.onnx"))
    init = proto.graph.initializer[0]
    w = numpy_helper.to_array(init).copy()
    w.flat[1] = np.nan
    init.CopyFrom(helper.make_tensor(init.name, init.data_type, w.shape, w.ravel().tolist()))
    path = tmp_path / "float_data.onnx"
    onnx.save(proto, str(path))
    result = CliRunner().invoke(app, ["check", str(path), "--format", "json"])
    checks = {c["name"]: c for c in json.loads(result.stdout)["files"][0]["checks"]}
    assert checks["weights_finite"]["passed"] is False
    assert init.name in checks["weights_finite"]["message"]


def test_external_data_model_passes(runner, folded, tmp_path):
    """A model with external data is checked from its folder like any other (issue #4)."""
    proto = onnx.load(str(folded))
    path = tmp_path / "ext.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, location="w.data")
    assert (tmp_path / "w.data").stat().st_size > 0
    result = runner.invoke(app, ["check", str(path), "--format", "json"])
    assert result.exit_code == 0, result.output


def _if_with_bn_inside(path: Path) -> None:
    """An ONNX file whose only BatchNormalization sits in an If branch (unnamed, as some
    exporters leave it)."""
    from onnx import TensorProto, helper

    c = 3
    inits = [
        numpy_helper.from_array(np.full(c, v, np.float32), n)
        for n, v in (("scale", 1.5), ("bias", 0.1), ("mean", 0.2), ("var", 2.0))
    ]
    bn = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["t"])
    shape = [1, c, 2, 2]
    then_g = helper.make_graph(
        [bn], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, shape)]
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, shape)],
    )
    graph = helper.make_graph(
        [
            helper.make_node(
                "If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g
            )
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def test_bn_inside_a_subgraph_fails_max_bn_issue_13(runner, tmp_path):
    """Issue 13: check sees a BatchNormalization inside an If branch: --max-bn 0 fails and
    names it with its place, the name inspect and fuse give it."""
    from bnfold.loading import load_model
    from bnfold.stats import inspect_model

    path = tmp_path / "branch.onnx"
    _if_with_bn_inside(path)
    result = runner.invoke(app, ["check", str(path), "--format", "json"])
    assert result.exit_code == 1, result.output
    (f,) = json.loads(result.stdout)["files"]
    checks = {c["name"]: c for c in f["checks"]}
    assert checks["batchnorm"]["passed"] is False
    assert "branch/then_branch/t" in checks["batchnorm"]["message"]
    (layer,) = inspect_model(load_model(path)).layers
    assert (layer.name, layer.reason, layer.channels) == ("branch/then_branch/t", "subgraph", 3)
    assert runner.invoke(app, ["check", str(path), "--max-bn", "1"]).exit_code == 0


def test_nan_in_a_constant_node_fails_weights_finite(runner, tmp_path):
    """Weights kept in Constant nodes (paddle2onnx) are weights too: a NaN there fails."""
    from onnx import TensorProto, helper

    w = np.ones((2, 2, 1, 1), np.float32)
    w[0, 0, 0, 0] = np.nan
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
            helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])],
    )
    path = tmp_path / "const.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
        str(path),
    )
    result = runner.invoke(app, ["check", str(path), "--format", "json"])
    checks = {c["name"]: c for c in json.loads(result.stdout)["files"][0]["checks"]}
    assert checks["weights_finite"]["passed"] is False
    assert "w" in checks["weights_finite"]["message"]


def test_sequence_input_asks_for_real_inputs(runner, tmp_path):
    """A graph input that is not a tensor (a sequence) cannot get random values: exit 2
    with one line pointing at --inputs, not a traceback."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("SequenceLength", ["s"], ["n"], name="len")],
        "g",
        [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("n", TensorProto.INT64, [])],
    )
    path = tmp_path / "seq.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 2, result.output
    assert "--inputs" in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1

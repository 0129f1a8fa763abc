"""``bnfold inspect`` through the CLI: output formats, options, and the single error exit.

CliRunner (click >= 8.2) keeps stdout and stderr apart: ``result.stdout`` is what a
pipe would see, ``result.stderr`` the diagnostics, ``result.output`` both interleaved.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bnfold import __version__
from bnfold.cli import app
from tests import corrupt
from tests.helpers import assert_one_error_line, write_arch
from tests.models import ConvBN, randomize_all

ARCH_SOURCE = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, width=8):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3)
            self.bn2 = nn.BatchNorm2d(width)

        def forward(self, x):
            x = torch.relu(self.bn(self.conv(x)))
            return self.bn2(self.conv2(x))
""")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def set_bn(bn: nn.Module, mean, var, gamma, beta, nbt: int = 5) -> None:
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor(mean))
        bn.running_var.copy_(torch.tensor(var))
        bn.weight.copy_(torch.tensor(gamma))
        bn.bias.copy_(torch.tensor(beta))
        bn.num_batches_tracked.fill_(nbt)


@pytest.fixture
def net_files(tmp_path) -> tuple[Path, str]:
    """Weights of Net with known statistics (fold scales spread 4x), and its --arch spec."""
    arch, namespace = write_arch(tmp_path, ARCH_SOURCE)
    torch.manual_seed(0)
    model = namespace["Net"]()
    # scales |gamma|/sqrt(var+eps): 1, 1, 2, 0.5 ... -> spread ~4x, under the default 100
    set_bn(
        model.bn,
        [0.5, -0.5] * 4,
        [1.0, 4.0, 1.0, 4.0] * 2,
        [1.0, 2.0, 2.0, 1.0] * 2,
        [0.0, 0.25] * 4,
    )
    set_bn(model.bn2, [0.25] * 8, [2.0] * 8, [1.0] * 8, [0.0] * 8)
    weights = tmp_path / "net.pt"
    torch.save(model.state_dict(), weights)
    return weights, f"{arch}:Net"


@pytest.fixture
def sd_file(net_files) -> Path:
    return net_files[0]


# --------------------------------------------------------------------------- basics


def test_version(runner):
    """--version prints 'bnfold VERSION' and exits 0."""
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"bnfold {__version__}\n"


def test_help(runner):
    """--help lists the inspect command and exits 0."""
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    assert "inspect" in result.stdout and "fuse" in result.stdout


def test_inspect_help(runner):
    """inspect --help documents its options and exits 0."""
    result = runner.invoke(app, ["inspect", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--arch", "--arch-kwargs", "--trust-pickle", "--format", "--threshold"):
        assert option in result.stdout


# --------------------------------------------------------------------------- inspect


def test_inspect_state_dict_table(runner, sd_file):
    """A bare state_dict: a table naming both BNs, 'architecture unknown', exit 0."""
    result = runner.invoke(app, ["inspect", str(sd_file)])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    out = result.stdout
    assert "2 BatchNorm layers" in out
    assert "bn " in out and "bn2" in out
    assert "fold: unknown (no architecture)" in out
    assert "large_scale_spread" not in out


def test_inspect_state_dict_json(runner, sd_file):
    """--format json: stdout is one JSON document whose layers match the file's BNs."""
    result = runner.invoke(app, ["inspect", str(sd_file), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    data = json.loads(result.stdout)
    assert data["schema_version"] == 1
    assert data["format"] == "state_dict"
    assert data["order"] == "file"
    assert [layer["name"] for layer in data["layers"]] == ["bn", "bn2"]
    assert [layer["channels"] for layer in data["layers"]] == [8, 8]
    assert data["layers"][1]["running_var"] == {"min": 2.0, "median": 2.0, "max": 2.0}
    assert data["summary"]["foldable"] is None
    assert data["summary"]["warnings_by_code"] == {}


def test_inspect_state_dict_markdown(runner, sd_file):
    """--format markdown: a table with one row per BN."""
    result = runner.invoke(app, ["inspect", str(sd_file), "-f", "markdown"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.startswith("| `")]
    assert [row.split("|")[1].strip() for row in rows] == ["`bn`", "`bn2`"]
    assert result.stdout.startswith("### bnfold inspect:")


def test_inspect_with_arch_file(runner, net_files):
    """--arch file.py:Net gives data-flow order and each BN's fold target."""
    weights, arch = net_files
    result = runner.invoke(app, ["inspect", str(weights), "--arch", arch, "-f", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["architecture_known"] is True
    assert data["order"] == "data-flow"
    assert [
        (layer["name"], layer["fold_into"], layer["fold_direction"]) for layer in data["layers"]
    ] == [("bn", "conv", "backward"), ("bn2", "conv2", "backward")]
    assert data["layers"][0]["eps"] == 1e-5 and data["layers"][0]["eps_known"] is True
    assert data["summary"]["foldable"] == 2
    assert data["summary"]["params_removed"] == 32
    assert data["summary"]["buffers_removed"] == 34
    assert data["summary"]["bias_params_added"] == 8


def test_inspect_with_arch_table(runner, net_files):
    """The table with --arch shows the fold arrows and the fold count."""
    weights, arch = net_files
    result = runner.invoke(app, ["inspect", str(weights), "--arch", arch])
    assert result.exit_code == 0, result.output
    assert "→ conv" in result.stdout and "→ conv2" in result.stdout
    assert "fold: 2/2" in result.stdout


def test_threshold_makes_large_scale_spread_appear(runner, sd_file):
    """--threshold scale_spread=2 flags the 4x-spread layer; the default does not."""
    base = runner.invoke(app, ["inspect", str(sd_file), "-f", "json"])
    lowered = runner.invoke(
        app, ["inspect", str(sd_file), "-f", "json", "--threshold", "scale_spread=2"]
    )
    assert base.exit_code == 0, base.output
    assert lowered.exit_code == 0, lowered.output
    before, after = json.loads(base.stdout), json.loads(lowered.stdout)
    assert [layer["warnings"] for layer in before["layers"]] == [[], []]
    assert [layer["warnings"] for layer in after["layers"]] == [["large_scale_spread"], []]
    assert after["summary"]["warnings_by_code"] == {"large_scale_spread": 1}
    assert after["thresholds"]["scale_spread"] == 2.0


def test_threshold_repeated(runner, sd_file):
    """--threshold can be given several times; each one applies."""
    result = runner.invoke(
        app,
        [
            "inspect",
            str(sd_file),
            "-f",
            "json",
            "--threshold",
            "dead_gamma=1.5",
            "--threshold",
            "tiny_variance=3",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["thresholds"] == {"dead_gamma": 1.5, "tiny_variance": 3.0, "scale_spread": 100.0}
    assert data["layers"][0]["warnings"] == ["tiny_variance", "dead_channels"]


def test_inspect_whole_module_with_trust_pickle(runner, tmp_path):
    """A pickled module with --trust-pickle is inspected with its own architecture."""
    torch.manual_seed(0)
    path = tmp_path / "whole.pt"
    torch.save(randomize_all(ConvBN()), path)
    result = runner.invoke(app, ["inspect", str(path), "--trust-pickle", "-f", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["format"] == "pickled_module"
    assert [(layer["name"], layer["fold_into"]) for layer in data["layers"]] == [("bn", "conv")]


# --------------------------------------------------------------------------- bad input


def test_missing_file(runner, tmp_path):
    """A missing file: exit 2, one error line naming the path."""
    path = tmp_path / "absent.pt"
    assert_one_error_line(runner.invoke(app, ["inspect", str(path)]), str(path), "no such file")


def test_directory(runner, tmp_path):
    """A directory: exit 2, one error line."""
    assert_one_error_line(runner.invoke(app, ["inspect", str(tmp_path)]), "is a directory")


def test_empty_file(runner, tmp_path):
    """An empty file: exit 2, one error line."""
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    assert_one_error_line(runner.invoke(app, ["inspect", str(path)]), "empty")


def test_text_file(runner, tmp_path):
    """A text file: exit 2, one error line."""
    path = tmp_path / "notes.pt"
    path.write_text("not a model\n")
    assert_one_error_line(runner.invoke(app, ["inspect", str(path)]), "text file")


@pytest.mark.parametrize("keep", [100, -30])
def test_truncated_file(runner, sd_file, tmp_path, keep):
    """A truncated torch.save file: exit 2, one error line (in every output format)."""
    path = corrupt.truncated(sd_file, tmp_path, keep)
    for fmt in ("table", "json"):
        assert_one_error_line(
            runner.invoke(app, ["inspect", str(path), "-f", fmt]), "corrupt or truncated"
        )


def test_corrupt_zip_directory(runner, sd_file, tmp_path):
    """A bit flip in a zip member name: exit 2, one error line (not an internal error)."""
    offset = corrupt.central_record_of(sd_file, "data.pkl") + 46
    path = corrupt.bit_flipped(sd_file, tmp_path, offset, bit=7)
    assert_one_error_line(runner.invoke(app, ["inspect", str(path)]), "corrupt")


def test_pickle_without_trust(runner, tmp_path):
    """A pickled module without --trust-pickle: exit 2, one line pointing at --trust-pickle."""
    path = tmp_path / "whole.pt"
    torch.save(ConvBN(), path)
    assert_one_error_line(
        runner.invoke(app, ["inspect", str(path), "-f", "json"]), "--trust-pickle"
    )


def test_hostile_pickle_without_trust(runner, tmp_path):
    """A pickle that would touch a file: exit 2, and the file is never created."""
    marker = tmp_path / "MARKER"
    path = corrupt.hostile_torch_save(tmp_path, marker)
    assert_one_error_line(runner.invoke(app, ["inspect", str(path)]), "--trust-pickle")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("arch", "needle"),
    [
        ("bnfold_no_such_module:Net", "cannot import bnfold_no_such_module"),
        ("no_colon", "is not of the form"),
        ("{dir}/net.py:Missing", "has no attribute 'Missing'"),
        ("torchvision:resnet18", "the weights do not fit --arch"),
    ],
)
def test_bad_arch(runner, net_files, arch, needle):
    """A bad or ill-fitting --arch: exit 2, one error line saying what is wrong."""
    weights, _ = net_files
    result = runner.invoke(
        app, ["inspect", str(weights), "--arch", arch.format(dir=weights.parent)]
    )
    assert_one_error_line(result, needle)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ("{bad json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"width": 4}', "shape mismatch"),
    ],
)
def test_bad_arch_kwargs(runner, net_files, kwargs, needle):
    """--arch-kwargs that is not a JSON object (or does not fit): exit 2, one error line."""
    weights, arch = net_files
    result = runner.invoke(app, ["inspect", str(weights), "--arch", arch, "--arch-kwargs", kwargs])
    assert_one_error_line(result, needle)


@pytest.mark.parametrize(
    ("threshold", "needle"),
    [
        ("scale_spread", "is not NAME=NUMBER"),
        ("scale_spread=big", "is not NAME=NUMBER"),
        ("bogus=1", "unknown threshold bogus"),
    ],
)
def test_bad_threshold(runner, sd_file, threshold, needle):
    """A malformed or unknown --threshold: exit 2, one error line."""
    result = runner.invoke(app, ["inspect", str(sd_file), "--threshold", threshold])
    assert_one_error_line(result, needle)


def test_bad_format_is_a_usage_error(runner, sd_file):
    """An unknown --format is rejected by the option parser with exit 2."""
    result = runner.invoke(app, ["inspect", str(sd_file), "--format", "yaml"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "yaml" in result.stderr


# --------------------------------------------------------------------------- real process


def run_bnfold(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bnfold", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_subprocess_json_is_clean(sd_file, tmp_path):
    """python -m bnfold inspect FILE --format json: parseable stdout, nothing on stderr."""
    proc = run_bnfold("inspect", str(sd_file), "--format", "json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert [layer["name"] for layer in json.loads(proc.stdout)["layers"]] == ["bn", "bn2"]


def test_subprocess_misnamed_export_archive_is_clean(tmp_path):
    """A .pt2 archive saved as .pt: JSON on stdout and nothing (no torch log) on stderr."""
    torch.manual_seed(0)
    path = tmp_path / "program.pt"
    model = randomize_all(ConvBN())
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8, 8),)), path)
    proc = run_bnfold("inspect", str(path), "--format", "json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["format"] == "torch_export"
    assert proc.stderr == ""


def test_subprocess_corrupt_export_archive_one_line(tmp_path):
    """A .pt2 torch's reader rejects: exit 2, one 'error:' line on stderr, no torch traceback."""
    torch.manual_seed(0)
    good = tmp_path / "program.pt2"
    model = randomize_all(ConvBN())
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8, 8),)), good)
    bad = corrupt.export_archive_with_wrong_size(good, tmp_path)
    proc = run_bnfold("inspect", str(bad), "--format", "json", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")


def test_builder_output_never_reaches_stdout(tmp_path):
    """Issue 14: what an --arch builder prints (ultralytics' model summary) stays off stdout,
    which carries the report alone: --format json parses."""
    arch = tmp_path / "noisy.py"
    arch.write_text(
        "from torch import nn\n"
        "def Net():\n"
        "    print('Net summary: 2 layers')\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))\n"
    )
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    torch.save(
        randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).state_dict(), weights
    )
    result = CliRunner().invoke(
        app, ["inspect", str(weights), "--arch", f"{arch}:Net", "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["summary"]["bn_layers"] == 1

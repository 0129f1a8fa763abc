"""``bnfold recalibrate`` and ``bnfold inspect --data`` through the CLI (issue 17).

The models are the shipped sample models (really trained); the data are arrays or images
written by each test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.loading import load_model
from bnfold.stats import inspect_model
from tests.helpers import assert_one_error_line, write_arch

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
ARCH = f"{SAMPLES / 'archs.py'}:ConvNet"
STATE_DICT = SAMPLES / "convnet.state_dict.pt"
LAYERS = ["stem.1", "down1.1", "dw.1", "pw.1", "down2.1", "up.1"]


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def data(tmp_path) -> Path:
    """40 inputs for the convnet (3x32x32), normalised like its training data."""
    x = np.random.default_rng(0).standard_normal((40, 3, 32, 32)).astype(np.float32)
    path = tmp_path / "data.npz"
    np.savez(path, input=x)
    return path


# --------------------------------------------------------------------------- recalibrate


def test_recalibrate_table_writes_the_model(tmp_path, data):
    """issue 17: the table names every layer as updated and the file holds the new stats."""
    out = tmp_path / "re.pt"
    result = invoke("recalibrate", STATE_DICT, "--arch", ARCH, "--data", data, "--out", out)
    assert result.exit_code == 0, result.output
    assert "re-estimated 6 of 6 BatchNorm layers, method cumulative" in " ".join(
        result.stdout.split()
    )
    assert all(name in result.stdout for name in LAYERS)
    assert result.stderr == ""
    before = inspect_model(load_model(STATE_DICT, arch=ARCH)).layers
    after = inspect_model(load_model(out, arch=ARCH)).layers
    assert all(a.running_var != b.running_var for a, b in zip(after, before, strict=True))


def test_recalibrate_json_matches_the_written_file(tmp_path, data):
    """issue 17: the JSON report is clean and its new running_var spreads are the file's."""
    out = tmp_path / "re.onnx"
    result = invoke(
        "recalibrate", SAMPLES / "convnet.onnx", "--data", data, "--out", out,
        "--method", "sequential", "--batch-size", "16", "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema_version"] == 1 and report["method"] == "sequential"
    assert report["output"] == str(out) and report["format"] == "onnx"
    assert report["data"]["samples"] == 40 and report["data"]["batches"] == 3
    assert report["passes"] == 6 and report["complete"] is True
    written = inspect_model(load_model(out)).layers
    positions = [32 * 32, 16 * 16, 16 * 16, 16 * 16, 8 * 8, 16 * 16]  # each BN's H x W
    for layer, row, hw in zip(written, report["layers"], positions, strict=True):
        assert row["updated"] is True and row["values"] == 40 * hw
        assert layer.running_var is not None
        assert row["running_var"]["max"] == pytest.approx(layer.running_var.max, rel=1e-6)


def test_recalibrate_markdown(tmp_path, data):
    """issue 17: markdown has one row per layer and the data line."""
    result = invoke(
        "recalibrate", SAMPLES / "convnet.pt2", "--data", data, "--out", tmp_path / "m.pt2",
        "-f", "markdown",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("### bnfold recalibrate:")
    assert sum(line.startswith("| `") for line in result.stdout.splitlines()) == 6
    assert "40 samples of 3x32x32" in result.stdout


UNUSED_BN = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.spare = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x))
""")


def test_a_bn_the_data_never_reaches_exits_1(tmp_path, data):
    """issue 17: the file is written, the unreached BN is named, and the exit code is 1."""
    arch, namespace = write_arch(tmp_path, UNUSED_BN)
    weights = tmp_path / "w.pt"
    torch.save(namespace["Net"]().state_dict(), weights)
    out = tmp_path / "out.pt"
    result = invoke("recalibrate", weights, "--arch", f"{arch}:Net", "--data", data, "-o", out)
    assert result.exit_code == 1, result.output
    assert "spare kept (not_called)" in result.stdout
    assert out.exists()


def test_existing_output_needs_force_and_survives(tmp_path, data):
    """issue 17: an existing --out is refused before any work, and kept as it was."""
    out = tmp_path / "re.pt"
    out.write_bytes(b"keep me")
    result = invoke("recalibrate", STATE_DICT, "--arch", ARCH, "--data", data, "--out", out)
    assert_one_error_line(result, "exists", "--force")
    assert out.read_bytes() == b"keep me"
    forced = invoke(
        "recalibrate", STATE_DICT, "--arch", ARCH, "--data", data, "--out", out, "--force"
    )
    assert forced.exit_code == 0, forced.output


@pytest.mark.parametrize(
    ("model", "extra", "needles"),
    [
        ("convnet.state_dict.pt", [], ["needs the architecture", "--arch"]),
        ("convnet.torchscript.pt", [], ["TorchScript"]),
        ("convnet.state_dict.pt", ["--arch", ARCH, "--limit", "1"], ["1 samples, fewer than"]),
        (
            "convnet.state_dict.pt",
            ["--arch", ARCH, "--limit", "1", "--batch-size", "1"],
            ["at least 2 samples"],
        ),
        ("convnet.state_dict.pt", ["--arch", ARCH, "--image-size", "8"], ["--image-size"]),
        ("convnet.state_dict.pt", ["--arch", ARCH, "--mean", "0,0"], ["--mean and --std"]),
        ("convnet.state_dict.pt", ["--arch", ARCH, "--mean", "a", "--std", "1"], ["--mean"]),
    ],
)
def test_recalibrate_errors_are_one_line(tmp_path, data, model, extra, needles):
    """issue 17: wrong models, data and options end with one 'error:' line and exit 2."""
    out = tmp_path / "out.bin"
    result = invoke("recalibrate", SAMPLES / model, "--data", data, "--out", out, *extra)
    assert_one_error_line(result, *needles)
    assert not out.exists()


def test_data_of_the_wrong_shape_is_one_line(tmp_path):
    """issue 17: data the model cannot run on: one line naming the shape, exit 2."""
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 32), dtype=np.float32))
    result = invoke(
        "recalibrate", STATE_DICT, "--arch", ARCH, "--data", tmp_path / "d.npz",
        "--out", tmp_path / "o.pt", "--batch-size", "4",
    )  # fmt: skip
    assert_one_error_line(
        result,
        "does not run on the data",
        "input 0 (x) has shape [4, 3, 32] (float32)",
        "the model's first layer takes (batch, 3, size, size)",
    )
    assert not (tmp_path / "o.pt").exists()


def test_output_may_not_be_the_input(tmp_path, data):
    """issue 17: --out equal to the model is refused."""
    copy = tmp_path / "m.pt"
    copy.write_bytes(STATE_DICT.read_bytes())
    result = invoke("recalibrate", copy, "--arch", ARCH, "--data", data, "--out", copy)
    assert_one_error_line(result, "refusing to overwrite the input")
    assert copy.read_bytes() == STATE_DICT.read_bytes()


def test_recalibrate_subprocess_json_is_clean(tmp_path, data):
    """issue 17: as a process, stdout is exactly the JSON report and stderr is empty."""
    out = tmp_path / "re.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "bnfold", "recalibrate", str(SAMPLES / "convnet.safetensors"),
         "--arch", ARCH, "--data", str(data), "--out", str(out), "--format", "json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert json.loads(proc.stdout)["updated"] == 6


def test_image_folder_with_size_and_normalisation(tmp_path):
    """issue 17: a folder of images, resized and normalised, recalibrates the convnet."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(6):
        size = (40 + i, 48)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    result = invoke(
        "recalibrate", STATE_DICT, "--arch", ARCH, "--data", folder, "--image-size", "32",
        "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--out", tmp_path / "o.pt",
        "--batch-size", "3",
        "-f", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["data"]["input_shapes"] == [[3, 32, 32]]
    assert "normalised with mean 0.5,0.5,0.5 std 0.25,0.25,0.25" in report["data"]["preprocessing"]


# --------------------------------------------------------------------------- inspect --data


def test_inspect_data_json_has_the_data_and_the_drift(data):
    """issue 17: inspect --data adds the data block, per-layer data fields and the drift
    thresholds; the drift of the trained convnet on other data is reported per layer."""
    result = invoke("inspect", STATE_DICT, "--arch", ARCH, "--data", data, "-f", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["data"]["kind"] == "npz" and report["data"]["samples"] == 40
    assert report["thresholds"]["drift_mean"] == 0.5 and report["thresholds"]["drift_var"] == 2
    for layer in report["layers"]:
        assert layer["data_values"] > 0
        assert set(layer["mean_shift"]) == {"min", "median", "max"}
        assert layer["var_ratio"]["min"] > 0


def test_inspect_data_table_and_markdown(data):
    """issue 17: the table gets a data table under the layers; markdown two data columns."""
    table = invoke("inspect", STATE_DICT, "--arch", ARCH, "--data", data)
    assert table.exit_code == 0, table.output
    assert "values/ch" in table.stdout and "var ratio" in table.stdout
    assert all(len(line) <= 80 for line in table.stdout.splitlines())
    markdown = invoke("inspect", STATE_DICT, "--arch", ARCH, "--data", data, "-f", "markdown")
    assert "| data: mean shift max | var ratio min…max |" in markdown.stdout


def test_inspect_data_flags_data_in_other_units(tmp_path, data):
    """issue 17: the same images 4x larger (not normalised like the training data): every
    layer's statistics are off, and the codes say so; raising the thresholds hides them."""
    x = np.load(data)["input"] * 4 + 2
    np.savez(tmp_path / "big.npz", input=x)
    args = ["inspect", STATE_DICT, "--arch", ARCH, "--data", tmp_path / "big.npz", "-f", "json"]
    report = json.loads(invoke(*args).stdout)
    assert report["summary"]["warnings_by_code"]["stats_drift"] >= 1
    first = report["layers"][0]
    assert "stats_drift" in first["warnings"]
    assert isinstance(first["mean_shift_channel"], int)
    assert isinstance(first["var_ratio_channel"], int)
    assert f"(channel {first['mean_shift_channel']})" in first["diagnostics"][0]["message"]
    quiet = json.loads(invoke(*args, "--drift-mean", "1e6", "--drift-var", "1e6").stdout)
    assert not quiet["summary"]["warnings_by_code"]
    assert quiet["thresholds"]["drift_mean"] == 1e6 and quiet["thresholds"]["drift_var"] == 1e6
    also = json.loads(
        invoke(*args, "--threshold", "drift_mean=1e6", "--threshold", "drift_var=1e6").stdout
    )
    assert not also["summary"]["warnings_by_code"]


def test_drift_thresholds_are_checked(data):
    """issue 17: --drift-var must be above 1, --drift-mean positive, both only with --data."""
    base = ["inspect", STATE_DICT, "--arch", ARCH]
    assert invoke(*base, "--data", data, "--drift-var", "0.5").exit_code == 2
    assert invoke(*base, "--data", data, "--drift-mean", "0").exit_code == 2
    assert_one_error_line(invoke(*base, "--drift-mean", "1"), "--drift-mean only applies with")


def test_data_options_need_data(data):
    """issue 17: --mean, --std, --limit, --image-size without --data are refused."""
    result = invoke("inspect", STATE_DICT, "--arch", ARCH, "--mean", "0,0,0", "--std", "1,1,1")
    assert_one_error_line(result, "--mean, --std only applies with --data")


def test_inspect_data_with_plot_and_html(tmp_path, data):
    """issue 17: --plot with data draws the two drift panels (a taller picture), --html
    has the data summary, the data columns and the drift explanations."""
    x = np.load(data)["input"] * 4 + 2
    np.savez(tmp_path / "big.npz", input=x)
    plain = invoke("inspect", STATE_DICT, "--arch", ARCH, "--plot", tmp_path / "a.png")
    with_data = invoke(
        "inspect", STATE_DICT, "--arch", ARCH, "--data", tmp_path / "big.npz",
        "--plot", tmp_path / "b.png", "--html", tmp_path / "b.html",
    )  # fmt: skip
    assert plain.exit_code == 0 and with_data.exit_code == 0, with_data.output

    def height(path: Path) -> int:
        return int.from_bytes(path.read_bytes()[20:24], "big")

    assert height(tmp_path / "b.png") > height(tmp_path / "a.png") + 300
    page = (tmp_path / "b.html").read_text()
    assert "<th>mean shift</th>" in page and "big.npz" in page
    assert '<h3 id="stats_drift">' in page and "drift_mean (0.5)" in page
    assert "(worst: channel " in page


# --------------------------------------------------------------------------- --limit, sources


def test_limit_keeps_the_first_n_samples(data):
    """issue 17: --limit N uses the first N samples (--samples is gone)."""
    args = ["inspect", STATE_DICT, "--arch", ARCH, "--data", data, "-f", "json"]
    result = invoke(*args, "--limit", "10", "--batch-size", "5")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["data"]["samples"], report["data"]["batches"]) == (10, 2)
    assert invoke(*args, "--samples", "10").exit_code == 2


BATCHES_PY = """
import numpy as np
import torch

DATA = {data!r}


def good():
    x = torch.from_numpy(np.load(DATA)["input"])
    return [x[i : i + 8] for i in range(0, len(x), 8)]


def tuples():
    for (b,) in ((t,) for t in good()):
        yield (b,)


def raises():
    raise ValueError("no camera attached\\nsecond line")


def raises_later():
    yield good()[0]
    raise OSError("disk gone")


def empty():
    return []


def strings():
    yield "not a tensor"


def nan():
    x = good()[0].clone()
    x[1, 2, 3, 4] = float("nan")
    yield x


not_callable = 3
"""


@pytest.fixture
def batches_py(tmp_path, data) -> Path:
    path = tmp_path / "batches.py"
    path.write_text(BATCHES_PY.format(data=str(data)))
    return path


@pytest.mark.parametrize("name", ["good", "tuples"])
def test_callable_data_gives_what_the_same_batches_from_a_file_give(
    tmp_path, data, batches_py, name
):
    """issue 17: --data path/file.py:callable yielding tensors (or tuples of them) writes
    the same statistics as the .npz cut into the same batches, and inspect --data measures
    the same drift; the report names the callable, its samples and batches."""
    args = ["--arch", ARCH, "-f", "json"]
    by_file = invoke("recalibrate", STATE_DICT, "--data", data, "--batch-size", 8,
                     "--out", tmp_path / "a.pt", *args)  # fmt: skip
    assert by_file.exit_code == 0, by_file.output
    by_call = invoke("recalibrate", STATE_DICT, "--data", f"{batches_py}:{name}",
                     "--out", tmp_path / "b.pt", *args)  # fmt: skip
    assert by_call.exit_code == 0, by_call.output
    report = json.loads(by_call.stdout)
    assert report["data"]["kind"] == "callable" and report["data"]["source"].endswith(name)
    assert (report["data"]["samples"], report["data"]["batches"]) == (40, 5)
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    measured = invoke("inspect", STATE_DICT, "--data", f"{batches_py}:{name}", *args)
    assert measured.exit_code == 0, measured.output
    layers = json.loads(measured.stdout)["layers"]
    assert all(layer["data_values"] > 0 for layer in layers)


def test_callable_as_a_module_and_with_limit(tmp_path, data, batches_py, monkeypatch):
    """issue 17: module:callable is found from the current folder, as --arch's is; --limit
    cuts its batches (the last one short)."""
    (tmp_path / "my_batches_17.py").write_text(batches_py.read_text())
    monkeypatch.chdir(tmp_path)
    result = invoke("inspect", STATE_DICT, "--arch", ARCH, "--data", "my_batches_17:good",
                    "--limit", 20, "-f", "json")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["data"]
    assert (report["samples"], report["batches"]) == (20, 3)


@pytest.mark.parametrize(
    ("name", "needles"),
    [
        ("raises", ["the callable raised ValueError: no camera attached"]),
        ("raises_later", ["the callable raised OSError: disk gone in batch 1"]),
        ("empty", ["yielded no batches"]),
        ("strings", ["holds a str", "not a tensor"]),
        ("nan", ["NaN or Inf", "input 0"]),
        ("not_callable", ["is a int, not a callable"]),
        ("missing", ["has no attribute 'missing'"]),
    ],
)
def test_bad_callable_is_one_line_and_writes_nothing(tmp_path, batches_py, name, needles):
    """issue 17: a callable that raises (quoted in one line), yields nothing, yields a
    non-tensor or NaN: exit 2, one line, nothing written."""
    out = tmp_path / "o.pt"
    result = invoke("recalibrate", STATE_DICT, "--arch", ARCH, "--data",
                    f"{batches_py}:{name}", "--out", out)  # fmt: skip
    assert_one_error_line(result, *needles)
    assert not out.exists()


def test_callable_refuses_image_options(tmp_path, batches_py):
    """issue 17: --image-size and --mean/--std are for files; a callable preprocesses."""
    result = invoke("inspect", STATE_DICT, "--arch", ARCH, "--data", f"{batches_py}:good",
                    "--mean", "0,0,0", "--std", "1,1,1")  # fmt: skip
    assert_one_error_line(result, "not to a callable's batches")


def _png(path: Path, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)


@pytest.mark.parametrize("case", ["empty", "broken", "nan", "few"])
def test_bad_files_are_one_line_and_write_nothing(tmp_path, data, case):
    """issue 17: an empty folder, an unreadable image (named), NaN in the data, fewer
    samples than one batch: exit 2, one line, nothing written."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    spec, needles = folder, ["no images in this folder"]
    if case == "broken":
        for i in range(4):
            _png(folder / f"{i}.png", i)
        (folder / "2.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
        needles = ["2.png", "cannot"]
    elif case == "nan":
        x = np.load(data)["input"]
        x[33, 0, 0, 0] = np.nan
        np.savez(tmp_path / "nan.npz", input=x)
        spec, needles = tmp_path / "nan.npz", ["NaN or Inf (input 0, samples 20-39)"]
    elif case == "few":
        for i in range(3):
            _png(folder / f"{i}.png", i)
        needles = ["holds 3 samples, fewer than one batch (--batch-size 32)"]
    out = tmp_path / "o.pt"
    size = 32 if case != "broken" else 2
    result = invoke("recalibrate", STATE_DICT, "--arch", ARCH, "--data", spec, "--out", out,
                    "--batch-size", size)  # fmt: skip
    assert_one_error_line(result, *needles)
    assert not out.exists()
    inspected = invoke("inspect", STATE_DICT, "--arch", ARCH, "--data", spec,
                       "--batch-size", size, "--plot", tmp_path / "p.png")  # fmt: skip
    assert_one_error_line(inspected, *needles)
    assert not (tmp_path / "p.png").exists()


# --------------------------------------------------------------------------- no BatchNorm


def test_a_model_without_batchnorm_is_a_message_exit_0_nothing_written(tmp_path, data):
    """issue 17: a model with no BN: recalibrate and inspect --data say so on stderr,
    exit 0, and write no --out, --plot or --html."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    path = tmp_path / "plain.pt"
    torch.save(model, path)
    out = tmp_path / "o.pt"
    result = invoke("recalibrate", path, "--trust-pickle", "--data", data, "--out", out,
                    "-f", "json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "has no BatchNorm layer: nothing to re-estimate" in result.stderr
    report = json.loads(result.stdout)
    assert report["layers"] == [] and report["output"] is None and not out.exists()
    assert any("no BatchNorm" in note for note in report["notes"])
    inspected = invoke("inspect", path, "--trust-pickle", "--data", data,
                       "--plot", tmp_path / "p.png", "--html", tmp_path / "p.html")  # fmt: skip
    assert inspected.exit_code == 0, inspected.output
    assert "has no BatchNorm layer: the data was not run" in inspected.stderr
    assert not (tmp_path / "p.png").exists() and not (tmp_path / "p.html").exists()


# --------------------------------------------------------------------------- --enable-running-stats


class NoStats(torch.nn.Module):
    """conv -> BN without running statistics -> ReLU -> conv -> ordinary BN."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(6, track_running_stats=False)
        self.conv2 = torch.nn.Conv2d(6, 4, 3)
        self.bn2 = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def test_enable_running_stats_gives_them_statistics_which_then_fold(tmp_path, data):
    """issue 17: a BN built with track_running_stats=False refuses re-estimation without
    the flag (exit 2, the hint names it); with --enable-running-stats it gets buffers with
    PyTorch's momentum=None statistics, and `bnfold fuse` then folds it (no BN node left)."""
    torch.manual_seed(0)
    model = NoStats().eval()
    path = tmp_path / "nostats.pt"
    torch.save(model, path)
    only = torch.nn.Sequential(
        torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3, track_running_stats=False)
    )
    torch.save(only.eval(), tmp_path / "only.pt")
    refused = invoke("recalibrate", tmp_path / "only.pt", "--trust-pickle", "--data", data,
                     "--out", tmp_path / "x.pt")  # fmt: skip
    assert_one_error_line(refused, "no BatchNorm layer with running statistics",
                          "--enable-running-stats")  # fmt: skip
    out = tmp_path / "re.pt"
    result = invoke("recalibrate", path, "--trust-pickle", "--data", data, "--out", out,
                    "--enable-running-stats", "--batch-size", 8, "-f", "json")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["complete"] and report["updated"] == 2
    assert any("track_running_stats=False: bn1" in note for note in report["notes"])
    done = torch.load(out, weights_only=False)
    assert done.bn1.track_running_stats and int(done.bn1.num_batches_tracked) == 5
    # PyTorch's own: the same BN with buffers, alone in training mode, momentum=None
    ref = NoStats()
    ref.load_state_dict(model.state_dict(), strict=False)
    ref.bn1 = torch.nn.BatchNorm2d(6, momentum=None)
    ref.bn1.load_state_dict(model.bn1.state_dict(), strict=False)
    ref.bn2.reset_running_stats()
    ref.bn2.momentum = None
    ref.eval().bn1.train()
    ref.bn2.train()
    x = torch.from_numpy(np.load(data)["input"])
    with torch.no_grad():
        for i in range(0, 40, 8):
            ref(x[i : i + 8])
    for name in ("bn1", "bn2"):
        got, want = getattr(done, name), getattr(ref, name)
        torch.testing.assert_close(got.running_mean, want.running_mean, rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(got.running_var, want.running_var, rtol=2e-6, atol=1e-7)
    fused = invoke("fuse", out, "--trust-pickle", "--input-shape", "2,3,32,32",
                   "--out", tmp_path / "f.onnx", "-f", "json")  # fmt: skip
    assert fused.exit_code == 0, fused.output
    fuse_report = json.loads(fused.stdout)
    assert {f["bn"] for f in fuse_report["folded"]} == {"bn1", "bn2"}
    assert fuse_report["onnx_bn_nodes"] == 0 and fuse_report["verification"]["passed"]


def test_enable_running_stats_adds_the_buffers_to_a_state_dict(tmp_path, data):
    """issue 17: a state_dict recalibrated with --enable-running-stats keeps every key and
    gains the three buffers of the BN that had none (the rest untouched)."""
    arch, _ = write_arch(tmp_path, textwrap.dedent(
        """
        import torch

        class NoStats(torch.nn.Module):
            def __init__(self, track=False):
                super().__init__()
                self.conv1 = torch.nn.Conv2d(3, 6, 3, padding=1, bias=False)
                self.bn1 = torch.nn.BatchNorm2d(6, track_running_stats=track)
                self.conv2 = torch.nn.Conv2d(6, 4, 3)
                self.bn2 = torch.nn.BatchNorm2d(4)

            def forward(self, x):
                return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        """
    ), "nostats_arch")  # fmt: skip
    torch.manual_seed(1)
    state = NoStats().state_dict()
    torch.save({"model": state, "epoch": 7}, tmp_path / "ckpt.pt")
    out = tmp_path / "re.pt"
    result = invoke("recalibrate", tmp_path / "ckpt.pt", "--arch", f"{arch}:NoStats",
                    "--data", data, "--out", out, "--enable-running-stats")  # fmt: skip
    assert result.exit_code == 0, result.output
    written = torch.load(out)
    assert written["epoch"] == 7
    new = {"bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"}
    assert set(written["model"]) == set(state) | new
    changed = {"bn2.running_mean", "bn2.running_var", "bn2.num_batches_tracked"}
    assert all(torch.equal(written["model"][k], state[k]) for k in set(state) - changed)
    assert not torch.equal(written["model"]["bn2.running_var"], state["bn2.running_var"])
    loaded = invoke("inspect", out, "--arch", f"{arch}:NoStats", "--arch-kwargs", '{"track": true}',
                    "-f", "json")  # fmt: skip
    assert loaded.exit_code == 0, loaded.output


def test_api_recalibrate_is_what_the_cli_runs(tmp_path, data):
    """issue 17: bnfold.recalibrate writes what the CLI writes and returns the report the
    CLI prints; an in-memory module is changed in place and out= is refused for it."""
    import bnfold
    from bnfold.data import DataOptions
    from bnfold.errors import OutputError

    opts = DataOptions(spec=data, batch_size=8)
    report = bnfold.recalibrate(STATE_DICT, opts, tmp_path / "api.pt", arch=ARCH)
    cli = invoke("recalibrate", STATE_DICT, "--arch", ARCH, "--data", data, "--batch-size", 8,
                 "--out", tmp_path / "cli.pt", "-f", "json")  # fmt: skip
    assert cli.exit_code == 0, cli.output
    a, b = torch.load(tmp_path / "api.pt"), torch.load(tmp_path / "cli.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    as_cli = json.loads(cli.stdout)
    assert report.to_dict()["layers"] == as_cli["layers"]
    module = load_model(STATE_DICT, arch=ARCH).module
    assert bnfold.recalibrate(module, opts).complete
    assert torch.equal(module.state_dict()["stem.1.running_var"], a["stem.1.running_var"])
    with pytest.raises(OutputError, match="in-memory model"):
        bnfold.recalibrate(module, opts, tmp_path / "x.pt")


# ------------------------------------------------------------------ fuse --recalibrate-data


def test_fuse_recalibrate_data_folds_the_re_estimated_model(tmp_path, data):
    """issue 17: `fuse --recalibrate-data` in one command gives the ONNX model that
    `recalibrate` then `fuse` give: the same outputs, every BN folded, verified against
    the re-estimated model; the report carries the recalibration."""
    fused = invoke("fuse", STATE_DICT, "--arch", ARCH, "--recalibrate-data", data,
                   "--batch-size", 8, "--out", tmp_path / "one.onnx", "-f", "json")  # fmt: skip
    assert fused.exit_code == 0, fused.output
    report = json.loads(fused.stdout)
    assert report["recalibration"]["updated"] == 6 and report["recalibration"]["complete"]
    assert report["recalibration"]["method"] == "cumulative"
    assert report["verification"]["passed"] and report["onnx_bn_nodes"] == 0
    assert len(report["folded"]) == 6
    two = invoke("recalibrate", STATE_DICT, "--arch", ARCH, "--data", data, "--batch-size", 8,
                 "--out", tmp_path / "re.pt")  # fmt: skip
    assert two.exit_code == 0, two.output
    again = invoke("fuse", tmp_path / "re.pt", "--arch", ARCH, "--input-shape", "2,3,32,32",
                   "--out", tmp_path / "two.onnx")  # fmt: skip
    assert again.exit_code == 0, again.output
    import onnxruntime as ort

    x = np.load(data)["input"][:8]
    outs = []
    for name in ("one.onnx", "two.onnx"):
        session = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        outs.append(session.run(None, {session.get_inputs()[0].name: x})[0])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    plain = invoke("fuse", STATE_DICT, "--arch", ARCH, "--input-shape", "2,3,32,32",
                   "--out", tmp_path / "plain.onnx")  # fmt: skip
    assert plain.exit_code == 0, plain.output
    session = ort.InferenceSession(str(tmp_path / "plain.onnx"), providers=["CPUExecutionProvider"])
    assert not np.allclose(session.run(None, {session.get_inputs()[0].name: x})[0], outs[0])


def test_fuse_recalibrate_data_on_onnx_and_with_enable_running_stats(tmp_path, data):
    """issue 17: an ONNX model is re-estimated in its graph, folded and verified against the
    re-estimated graph; --enable-running-stats lets a BN without statistics fold in the
    same command; data options need --recalibrate-data."""
    onnx_fused = invoke("fuse", SAMPLES / "convnet.onnx", "--recalibrate-data", data,
                        "--batch-size", 8, "--out", tmp_path / "o.onnx", "-f", "json")  # fmt: skip
    assert onnx_fused.exit_code == 0, onnx_fused.output
    report = json.loads(onnx_fused.stdout)
    assert report["recalibration"]["updated"] == 6 and report["verification"]["passed"]
    torch.manual_seed(0)
    torch.save(NoStats().eval(), tmp_path / "nostats.pt")
    fused = invoke("fuse", tmp_path / "nostats.pt", "--trust-pickle", "--recalibrate-data", data,
                   "--enable-running-stats", "--batch-size", 8, "--out", tmp_path / "n.onnx",
                   "-f", "json")  # fmt: skip
    assert fused.exit_code == 0, fused.output
    report = json.loads(fused.stdout)
    assert {f["bn"] for f in report["folded"]} == {"bn1", "bn2"}
    assert report["onnx_bn_nodes"] == 0 and report["verification"]["passed"]
    alone = invoke("fuse", STATE_DICT, "--arch", ARCH, "--limit", 3, "--out", tmp_path / "x.onnx")
    assert_one_error_line(alone, "--limit only applies with --recalibrate-data")
    flag = invoke("fuse", STATE_DICT, "--arch", ARCH, "--enable-running-stats",
                  "--out", tmp_path / "x.onnx")  # fmt: skip
    assert_one_error_line(flag, "--enable-running-stats only applies with --recalibrate-data")


def test_data_that_does_not_fit_names_input_shape_and_the_onnx_inputs(tmp_path):
    """issue 17: with --input-shape the message names the shape it gives; for an ONNX
    model it names the graph input, the shape and dtype given and the declared shape."""
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 5, 32, 32), dtype=np.float32))
    spec = tmp_path / "d.npz"
    result = invoke("inspect", STATE_DICT, "--arch", ARCH, "--data", spec, "--batch-size", 4,
                    "--input-shape", "1,3,32,32")  # fmt: skip
    assert_one_error_line(
        result,
        "input 0 (x) has shape [4, 5, 32, 32] (float32)",
        "--input-shape says the model takes [1, 3, 32, 32]",
    )
    import onnx

    declared = onnx.load(str(SAMPLES / "convnet.onnx")).graph.input[0]
    out = tmp_path / "o.onnx"
    result = invoke("recalibrate", SAMPLES / "convnet.onnx", "--data", spec, "--batch-size", 4,
                    "--out", out)  # fmt: skip
    assert_one_error_line(
        result,
        "onnxruntime cannot run the model on the data",
        f"input {declared.name!r} has shape [4, 5, 32, 32] (float32); the model takes [",
    )
    assert not out.exists()


# --------------------------------------------------------------------------- drift before / after


def test_recalibrate_reports_the_drift_before_and_after(tmp_path, data):
    """issue 17: the report gives per layer the drift on the data with the old statistics
    (what inspect --data reports on the original) and with the new ones: after the
    sequential method none is left; --no-drift skips both passes."""
    x = np.load(data)["input"] * 4 + 2  # other units: every layer drifts
    np.savez(tmp_path / "big.npz", input=x)
    spec = tmp_path / "big.npz"
    inspected = json.loads(
        invoke(
            "inspect", STATE_DICT, "--arch", ARCH, "--data", spec, "--batch-size", 8, "-f", "json"
        ).stdout
    )
    result = invoke("recalibrate", STATE_DICT, "--arch", ARCH, "--data", spec, "--batch-size", 8,
                    "--method", "sequential", "--out", tmp_path / "o.pt", "-f", "json")  # fmt: skip
    assert result.exit_code == 0, result.output
    layers = json.loads(result.stdout)["layers"]
    by_name = {layer["name"]: layer for layer in inspected["layers"]}
    for layer in layers:
        before, after, seen = layer["drift_before"], layer["drift_after"], by_name[layer["name"]]
        assert before["mean_shift"] == pytest.approx(seen["mean_shift"], rel=1e-9)
        assert before["var_ratio"] == pytest.approx(seen["var_ratio"], rel=1e-9)
        assert before["mean_shift_channel"] == seen["mean_shift_channel"]
        assert after["mean_shift"]["max"] < 1e-4
        assert (
            abs(after["var_ratio"]["min"] - 1) < 1e-4 and abs(after["var_ratio"]["max"] - 1) < 1e-4
        )
    table = invoke("recalibrate", STATE_DICT, "--arch", ARCH, "--data", spec, "--batch-size", 8,
                   "--out", tmp_path / "t.pt")  # fmt: skip
    assert table.exit_code == 0, table.output
    assert "drift before" in table.stdout and "drift after" in table.stdout
    quick = invoke("recalibrate", STATE_DICT, "--arch", ARCH, "--data", spec, "--batch-size", 8,
                   "--out", tmp_path / "q.pt", "--no-drift", "-f", "json")  # fmt: skip
    assert quick.exit_code == 0, quick.output
    assert all(layer["drift_before"] is None for layer in json.loads(quick.stdout)["layers"])

"""Hostile and broken input through every command, as a user runs them (subprocesses):
one line on stderr, exit 2, bounded time, nothing written, input unchanged; Ctrl-C exits
130 leaving nothing partial (issue 5)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tests import corrupt

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
TIMEOUT = 120  # seconds: far above any honest failure, a hang fails the test


def bnfold(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bnfold", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_exit_2(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr


def broken_files(folder: Path) -> dict[str, Path]:
    """The corpus: every kind of broken input, built fresh."""
    good = folder / "good.pt"
    torch.save(corrupt.small_state_dict(), good)
    data = good.read_bytes()
    files = {
        "empty": folder / "empty.pt",
        "text": folder / "notes.pt",
        "wrong_magic": corrupt.random_bytes(folder, seed=1),
        "foreign_zip": corrupt.foreign_zip(folder),
    }
    files["empty"].write_bytes(b"")
    files["text"].write_text("weights: see the wiki\n")
    for fraction in (0.1, 0.5, 0.9):
        path = folder / f"cut_{fraction}.pt"
        path.write_bytes(data[: int(len(data) * fraction)])
        files[f"truncated_{fraction}"] = path
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    flipped[len(data) - 30] ^= 0x01
    files["bit_flipped"] = folder / "flipped.pt"
    files["bit_flipped"].write_bytes(bytes(flipped))
    onnx_bytes = (SAMPLES / "convnet.onnx").read_bytes()
    files["onnx_truncated"] = folder / "cut.onnx"
    files["onnx_truncated"].write_bytes(onnx_bytes[: len(onnx_bytes) // 2])
    outside = corrupt.onnx_conv_bn(var_location="../outside.bin")
    files["onnx_data_outside"] = folder / "outside.onnx"
    onnx.save(outside, str(files["onnx_data_outside"]))
    missing = corrupt.onnx_conv_bn(var_location="missing.bin")
    files["onnx_data_missing"] = folder / "missing.onnx"
    onnx.save(missing, str(files["onnx_data_missing"]))
    dangling = corrupt.onnx_conv_bn()
    dangling.graph.node[0].input[1] = "nowhere"
    files["onnx_dangling_input"] = folder / "dangling.onnx"
    onnx.save(dangling, str(files["onnx_dangling_input"]))
    return files


CORPUS = [
    "empty",
    "text",
    "wrong_magic",
    "foreign_zip",
    "truncated_0.1",
    "truncated_0.5",
    "truncated_0.9",
    "bit_flipped",
    "onnx_truncated",
    "onnx_data_outside",
    "onnx_data_missing",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return broken_files(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("name", CORPUS)
@pytest.mark.parametrize("command", ["inspect", "fuse", "check"])
def test_broken_input_gives_one_line_and_exit_2(corpus, name, command, tmp_path):
    """Every broken file, every command: exit 2, one `error:` line, no output, input intact."""
    path = corpus[name]
    digest = sha(path)
    args = [command, str(path)]
    out = tmp_path / "out.onnx"
    if command == "fuse":
        args += ["--out", str(out)]
    result = bnfold(*args)
    assert_one_line_exit_2(result)
    assert str(path.name) in result.stderr or "external data" in result.stderr
    assert sha(path) == digest
    assert list(tmp_path.iterdir()) == []


def test_onnx_with_a_dangling_input(corpus, tmp_path):
    """An ONNX graph reading a tensor nobody produces: fuse exits 2 and writes nothing."""
    result = bnfold("fuse", str(corpus["onnx_dangling_input"]), "--out", str(tmp_path / "o.onnx"))
    assert_one_line_exit_2(result)
    assert list(tmp_path.iterdir()) == []


def test_state_dict_with_nan_is_reported_by_inspect_and_refused_by_fuse(tmp_path):
    """NaN in a state_dict: inspect reports `nonfinite` (exit 0); fuse refuses (exit 2)."""
    sd = torch.load(SAMPLES / "mlp.state_dict.pt", weights_only=True)
    sd["bn1.running_var"][0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(sd, path)
    result = bnfold("inspect", str(path), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert "nonfinite" in result.stdout
    result = bnfold(
        "fuse",
        str(path),
        "--arch",
        f"{SAMPLES / 'archs.py'}:MLP",
        "--out",
        str(tmp_path / "o.onnx"),
    )
    assert_one_line_exit_2(result)
    assert "NaN or Inf" in result.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_mismatched_shapes_exit_2(tmp_path):
    """A state_dict that does not fit --arch: exit 2 with the mismatches listed."""
    sd = torch.load(SAMPLES / "mlp.state_dict.pt", weights_only=True)
    sd["fc1.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    for command in ("inspect", "fuse"):
        result = bnfold(command, str(path), "--arch", f"{SAMPLES / 'archs.py'}:MLP")
        assert_one_line_exit_2(result)
        assert "shape mismatch" in result.stderr


@pytest.mark.parametrize("command", ["inspect", "fuse"])
def test_hostile_pickle_never_runs(tmp_path, command):
    """A pickle whose loading would write a marker file: refused, and the marker never appears."""
    marker = tmp_path / "PWNED"
    evil = corrupt.hostile_torch_save(tmp_path, marker)
    args = [command, str(evil)] + (["--out", str(tmp_path / "o.onnx")] if command == "fuse" else [])
    result = bnfold(*args)
    assert_one_line_exit_2(result)
    assert "--trust-pickle" in result.stderr
    assert not marker.exists()


# ``python -m bnfold`` with Ctrl-C armed: a process started in the background by a shell
# without job control (a CI step, ``cmd &``) inherits SIGINT ignored, and Python keeps it
# so; the Ctrl-C tests would then test nothing (and fail: exit 0)
CTRL_C_ARMED = (
    "import runpy, signal, sys; "
    "signal.signal(signal.SIGINT, signal.default_int_handler); "
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
    "sys.argv[0] = 'bnfold'; "
    "runpy.run_module('bnfold', run_name='__main__', alter_sys=True)"
)


@pytest.fixture
def ctrl_c_armed():
    """SIGINT raises KeyboardInterrupt in this process for the test (see CTRL_C_ARMED)."""
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def test_ctrl_c_exits_130_and_leaves_nothing(tmp_path):
    """SIGINT in the middle of fuse: exit 130 promptly, no output, no temporary folder."""
    out = tmp_path / "out.onnx"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CTRL_C_ARMED,
            "fuse",
            str(SAMPLES / "convnet.state_dict.pt"),
            "--arch",
            f"{SAMPLES / 'archs.py'}:ConvNet",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".bnfold-tmp") for p in tmp_path.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # inside the export
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 10
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "error: interrupted"
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_swallowed_inside_a_step_still_stops(ctrl_c_armed):
    """A Ctrl-C whose KeyboardInterrupt library code swallows (C++ that clears Python
    errors) still ends the command with 130, at the end of the step it came in."""
    import typer

    from bnfold.cli.common import Progress, handle_errors

    @handle_errors
    def command() -> str:
        with Progress(enabled=False).step("Exporting"):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
            except KeyboardInterrupt:
                pass  # swallowed on its way, as it can be inside an exporter
        return "finished"

    with pytest.raises(typer.Exit) as e:
        command()
    assert e.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    # a later command in this process, with SIGINT ignored, does not inherit that Ctrl-C
    @handle_errors
    def later() -> str:
        with Progress(enabled=False).step("Loading"):
            return "finished"

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    assert later() == "finished"


def test_existing_output_needs_force_and_survives_failure(tmp_path):
    """An existing output is kept unless --force; a failing run never replaces it."""
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous")
    model = SAMPLES / "convnet.state_dict.pt"
    arch = f"{SAMPLES / 'archs.py'}:ConvNet"
    result = bnfold("fuse", str(model), "--arch", arch, "--out", str(out))
    assert_one_line_exit_2(result)
    npz = tmp_path / "wrong.npz"
    np.savez(npz, x=np.zeros((1, 5, 32, 32), np.float32))
    result = bnfold(
        "fuse", str(model), "--arch", arch, "--out", str(out), "--force", "--inputs", str(npz)
    )
    assert result.returncode == 2
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "wrong.npz"]


def test_fuse_never_modifies_its_input(tmp_path):
    """The input file hashes the same after fuse, for a state_dict and an ONNX file."""
    for source, extra in (
        (
            SAMPLES / "tokennet.state_dict.pt",
            ["--arch", f"{SAMPLES / 'archs.py'}:TokenNet", "--input-shape", "1,16,8"],
        ),
        (SAMPLES / "tokennet.onnx", []),
    ):
        digest = sha(source)
        result = bnfold("fuse", str(source), *extra, "--out", str(tmp_path / f"{source.name}.onnx"))
        assert result.returncode == 0, result.stderr
        assert sha(source) == digest

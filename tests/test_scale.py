"""Models over protobuf's 2 GB limit: fuse writes ONNX with external data, within 3x the
model's size of memory above the import baseline, and check passes it (issue 5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import onnx
import pytest
import torch

pytestmark = pytest.mark.slow

ARCH = textwrap.dedent("""
    from torch import nn

    def Big():
        layers = []
        for _ in range(10):
            layers += [nn.Linear(8192, 8192), nn.BatchNorm1d(8192)]
        return nn.Sequential(*layers)
""")


def run_measured(cmd: list[str], folder) -> tuple[int, float, str, str]:
    """Run ``cmd``; return exit code, its own peak RSS in MB (``wait4``), stdout, stderr."""
    out_path, err_path = folder / "stdout.txt", folder / "stderr.txt"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen
    return (
        proc.returncode,
        usage.ru_maxrss / 1024,
        out_path.read_text(),
        err_path.read_text(),
    )


def test_model_over_2gb_fuses_with_external_data_within_3x_memory(tmp_path):
    """A 2.7 GB model (zero-filled Linear layers + BN) fuses into .onnx + .onnx.data,
    verifies, and peaks at most 3x its size above the import baseline."""
    arch = tmp_path / "big.py"
    arch.write_text(ARCH)
    with torch.device("meta"):
        namespace: dict = {}
        exec(compile(ARCH, str(arch), "exec"), namespace)
        shapes = {k: v.shape for k, v in namespace["Big"]().state_dict().items()}
    state = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(5)
        elif k.endswith("running_var") or (k.endswith(".weight") and len(shape) == 1):
            state[k] = torch.full(shape, 2.0)
        else:
            state[k] = torch.zeros(shape)
    weights = tmp_path / "big.pt"
    torch.save(state, weights)
    del state
    size_mb = weights.stat().st_size / 2**20
    assert size_mb > 2048

    code, base_peak, _, _ = run_measured(
        [sys.executable, "-c", "import torch, onnx, onnxruntime, onnxscript, bnfold.pipeline"],
        tmp_path,
    )
    assert code == 0
    out = tmp_path / "big.onnx"
    code, peak, stdout, stderr = run_measured(
        [
            sys.executable,
            "-m",
            "bnfold",
            "fuse",
            str(weights),
            "--arch",
            f"{arch}:Big",
            "--out",
            str(out),
            "--format",
            "json",
        ],
        tmp_path,
    )
    assert code == 0, stderr
    report = json.loads(stdout)
    assert len(report["folded"]) == 10
    assert report["verification"]["passed"]
    assert (tmp_path / "big.onnx.data").stat().st_size > 2**31
    model = onnx.load(str(out), load_external_data=False)
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert (peak - base_peak) <= 3 * size_mb, (peak, base_peak, size_mb)
    code, _, stdout, stderr = run_measured(
        [sys.executable, "-m", "bnfold", "check", str(out), "--format", "json"], tmp_path
    )
    assert code == 0, stdout + stderr
    assert json.loads(stdout)["files"][0]["passed"]

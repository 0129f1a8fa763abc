"""The architectures people ship, end to end through ``bnfold fuse`` with no expert flags
(issue 14's proof): ultralytics YOLOv8n and YOLO11n (detection, -cls, -seg), torchvision
DeepLabV3 and LR-ASPP, smp Unet and DeepLabV3+, Hugging Face ResNet, RegNet, MobileViT and
ConvNeXt (no BatchNorm: the control), all built by tests/shipped.py with random weights and
realistic statistics, nothing downloaded.

For each: ``fuse`` exits 0 from a trusted pickle and from ``--arch``, leaves no more
BatchNormalization nodes than ``torch.onnx.export(dynamo=True)`` on the same module, and
its ONNX equals a float64 run of the original on a batch of 3 (bnfold is given batch 1),
every output compared. A detector torch cannot export ends in one ``error:`` line, exit 2.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.utils._pytree import tree_leaves

from tests.shipped import BY_NAME, CASES, Shipped

pytestmark = pytest.mark.slow

ATOL, RTOL = 1e-6, 1e-5  # bnfold's float32 defaults: max|err| <= atol + rtol * max|ref|
CHECK_BATCH = 3  # not the batch bnfold is given (1) nor the one it exports with (2)
TIMEOUT = 900  # seconds for one subprocess run: a hang fails the test
ROOT = Path(__file__).resolve().parent.parent
# Which models go through which route, besides the trusted pickle (every model). Each route
# is a whole fuse run (5-15 s a model on a quiet 2-core machine), so each route takes one
# model of each kind of builder, chosen for what it exercises:
# --arch: ultralytics' task class (its ClassificationModel prints a summary to stdout even
# with verbose=False), torchvision:NAME with no kwargs (its backbone weights must not be
# downloaded), smp's class, and tests/shipped.py for Hugging Face.
ARCH = [
    "yolov8n-cls",
    "deeplabv3_mobilenet_v3_large",
    "smp DeepLabV3Plus mobilenet_v2",
    "hf ResNet",
]
# .pt2: outputs torch.export must unflatten (YOLO's tuple of a tensor and a dict of tensors
# and lists, Hugging Face's ModelOutput dataclass, registered by a package not yet imported)
PT2 = ["yolov8n", "hf ResNet"]
EXPORTABLE = [c.name for c in CASES if c.exportable]


def _ids(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_")


@dataclass
class Built:
    """One model, saved the ways a user saves it, with what its outputs must be."""

    case: Shipped
    pickle: Path
    state_dict: Path
    pt2: Path | None
    batch1: torch.Tensor
    batch3: torch.Tensor
    reference1: list[np.ndarray]  # float64 outputs, pytree order
    reference3: list[np.ndarray]
    dynamo_bn: int  # BatchNormalization nodes torch.onnx.export(dynamo=True) leaves


def outputs_float64(model: torch.nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    """Every tensor of the model's output in float64, in pytree order (the order
    torch.export flattens outputs in: tuples and lists in order, dicts by insertion)."""
    with torch.no_grad():
        out = copy.deepcopy(model).double()(x.double())
    return [t.numpy() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def bn_nodes(path: Path) -> int:
    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(n.op_type == "BatchNormalization" for n in graph.node)


def dynamo_bn_count(model: torch.nn.Module, x: torch.Tensor, path: Path) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(model), (x.clone(),), str(path), dynamo=True)
    return bn_nodes(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each model built once for the module, whatever order its tests run in."""
    cache: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in cache:
            cache[name] = build(BY_NAME[name], tmp_path_factory)
        return cache[name]

    return get


@pytest.fixture
def built(request, models) -> Built:
    """The model a test names (``indirect``)."""
    return models(request.param)


def build(case: Shipped, tmp_path_factory) -> Built:
    """The model saved the ways a user saves it, with its float64 references and the
    exporter's BN count.  The [test] extra installs every package: a missing one fails
    here, it is never skipped."""
    folder = tmp_path_factory.mktemp(re.sub(r"\W+", "_", case.name))
    model = case.make()
    batch1 = torch.randn(case.shape, generator=torch.Generator().manual_seed(1))
    batch3 = torch.randn((CHECK_BATCH, *case.shape[1:]), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(batch1)  # a validation run, as a user's model has had (YOLO caches its anchors)
    reference3 = outputs_float64(model, batch3)
    # batch 1 is needed only where a .pt2's static batch may stay static
    reference1 = outputs_float64(model, batch1) if case.name in PT2 else []
    pickle, state_dict = folder / "model.pkl", folder / "model.state_dict.pt"
    torch.save(model, pickle)
    torch.save(model.state_dict(), state_dict)
    pt2 = None
    if case.name in PT2:  # the default torch.export a user runs: non-strict, static batch
        pt2 = folder / "model.pt2"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.export.save(torch.export.export(copy.deepcopy(model), (batch1.clone(),)), pt2)
    dynamo_bn = dynamo_bn_count(model, batch1, folder / "dynamo.onnx")
    return Built(case, pickle, state_dict, pt2, batch1, batch3, reference1, reference3, dynamo_bn)


def fuse(*args: str, fresh_process: bool = False) -> tuple[int, str, str]:
    """``bnfold fuse ... --format json``: exit code, stdout, stderr. In this process (no
    second import of torch) unless ``fresh_process``, as a user runs it: a .pt2 must load in
    a process that has not imported the package registering its output types (transformers'
    ModelOutput), and what an --arch builder prints on import must not reach stdout."""
    args = ("fuse", *args, "--format", "json")
    if fresh_process:
        result = subprocess.run(
            [sys.executable, "-m", "bnfold", *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
            cwd=ROOT,  # this checkout's bnfold
        )
        return result.returncode, result.stdout, result.stderr
    from typer.testing import CliRunner

    from bnfold.cli import app

    # third-party deprecation chatter is not what these tests pin (pytest makes warnings errors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def assert_equal_to_reference(path: Path, x: torch.Tensor, reference: list[np.ndarray]) -> None:
    """The ONNX file in onnxruntime (optimisations off, so its fusions hide nothing) equals
    the float64 reference on every output, within bnfold's float32 tolerance."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    (first,) = session.get_inputs()
    assert not isinstance(first.shape[0], int) or first.shape[0] == x.shape[0], (
        f"exported with a static batch {first.shape}: cannot run a batch of {x.shape[0]}"
    )
    got = session.run(None, {first.name: x.numpy()})
    names = [o.name for o in session.get_outputs()]
    assert len(got) == len(reference), (
        f"{len(got)} ONNX outputs {names}, {len(reference)} tensors in the model's output"
    )
    wrong = []
    for name, g, r in zip(names, got, reference, strict=True):
        if g.shape != r.shape:
            wrong.append(f"{name}: shape {g.shape} vs {r.shape}")
            continue
        error = float(np.abs(g.astype(np.float64) - r).max())
        allowed = ATOL + RTOL * float(np.abs(r).max())
        if not error <= allowed:
            wrong.append(f"{name}: max abs error {error:.3g} > {allowed:.3g}")
    assert not wrong, "; ".join(wrong)


def batch_is_dynamic(path: Path) -> bool:
    first = onnx.load(str(path), load_external_data=False).graph.input[0]
    return not first.type.tensor_type.shape.dim[0].HasField("dim_value")


def check_fused(
    b: Built, out: Path, code: int, stdout: str, stderr: str, *, static_ok: bool = False
) -> None:
    """Exit 0, verification passed, no more BN than the dynamo exporter, and every output
    equal to the float64 reference at batch 3 (at batch 1 where ``static_ok`` and the ONNX
    batch is static)."""
    assert code == 0, (stderr + stdout)[-3000:]
    try:
        report = json.loads(stdout)
    except ValueError:
        pytest.fail(f"stdout is not the JSON report alone: {stdout[:300]!r}")
    assert report["verification"]["passed"], report["verification"]
    left = bn_nodes(out)
    assert left <= b.dynamo_bn, (
        f"{left} BatchNormalization left; the dynamo exporter: {b.dynamo_bn}"
    )
    if static_ok and not batch_is_dynamic(out):
        assert_equal_to_reference(out, b.batch1, b.reference1)
    else:
        assert_equal_to_reference(out, b.batch3, b.reference3)


@pytest.mark.parametrize("built", EXPORTABLE, ids=_ids, indirect=True)
def test_fuse_a_trusted_pickle(built, tmp_path):
    """A pickled module with only --trust-pickle and --input-shape: exit 0, no more BN than
    the dynamo exporter, every output equal to float64 at another batch size."""
    out = tmp_path / "folded.onnx"
    shape = ",".join(map(str, built.case.shape))
    result = fuse(str(built.pickle), "--trust-pickle", "--input-shape", shape, "--out", str(out))
    check_fused(built, out, *result)


@pytest.mark.parametrize("built", ["yolov8n"], ids=_ids, indirect=True)
def test_fuse_at_the_batch_size_it_is_exported_with(built, tmp_path):
    """YOLO built by its --arch (its detection head has never run) and given batch 2, the
    batch bnfold exports a dynamic batch with: torch.export's trace left fake anchors
    cached in the detection head, and the next run at that batch size failed (exit 3).
    Exit 0, outputs equal at batch 3."""
    out = tmp_path / "folded.onnx"
    shape = ",".join(map(str, (2, *built.case.shape[1:])))
    args = [str(built.state_dict), "--arch", str(built.case.arch), "--input-shape", shape]
    if built.case.arch_kwargs:
        args += ["--arch-kwargs", json.dumps(built.case.arch_kwargs)]
    check_fused(built, out, *fuse(*args, "--out", str(out)))
    assert batch_is_dynamic(out)


@pytest.mark.parametrize("built", ARCH, ids=_ids, indirect=True)
def test_fuse_a_state_dict_with_its_arch(built, tmp_path):
    """A state_dict with the builder a user would name (torchvision:NAME with no kwargs must
    not download), in a fresh process (the builder's imports and prints are part of the run:
    ultralytics' ClassificationModel prints its summary to stdout even with verbose=False):
    exit 0, JSON alone on stdout, no more BN than the dynamo exporter, outputs equal at
    batch 3."""
    case = built.case
    out = tmp_path / "folded.onnx"
    args = [str(built.state_dict), "--arch", str(case.arch)]
    if case.arch_kwargs:
        args += ["--arch-kwargs", json.dumps(case.arch_kwargs)]
    args += ["--input-shape", ",".join(map(str, case.shape)), "--out", str(out)]
    check_fused(built, out, *fuse(*args, fresh_process=True))


@pytest.mark.parametrize("built", PT2, ids=_ids, indirect=True)
def test_fuse_a_pt2(built, tmp_path):
    """The default ``torch.export.export(model, (x,))`` saved as .pt2, with no flags at all
    (its batch is static: bnfold falls back to it by itself): exit 0, no more BN than the
    dynamo exporter, every output equal (at batch 3 if the ONNX batch is dynamic)."""
    assert built.pt2 is not None
    out = tmp_path / "folded.onnx"
    check_fused(
        built, out, *fuse(str(built.pt2), "--out", str(out), fresh_process=True), static_ok=True
    )


def test_a_detector_torch_cannot_capture_is_refused_in_one_line(tmp_path):
    """torchvision's Faster R-CNN (FrozenBatchNorm2d): torch.fx cannot trace it, torch.export
    cannot capture it (data-dependent shapes after NMS) and torch.onnx.export(dynamo=True)
    fails; bnfold says so in one ``error:`` line naming both captures, exit 2, as a pickle
    and with --arch: no traceback, no ANSI colour codes, nothing on stdout, no file."""
    case = BY_NAME["fasterrcnn_mobilenet_v3_large_320_fpn (FrozenBN)"]
    model = case.make()
    x = torch.randn(case.shape)
    with pytest.raises(Exception), warnings.catch_warnings():  # noqa: B017 - the premise
        warnings.simplefilter("ignore")
        torch.export.export(copy.deepcopy(model), (x.clone(),))
    with pytest.raises(Exception):  # noqa: B017 - the premise
        dynamo_bn_count(model, x, tmp_path / "dynamo.onnx")
    pickle, state_dict = tmp_path / "model.pkl", tmp_path / "model.state_dict.pt"
    torch.save(model, pickle)
    torch.save(model.state_dict(), state_dict)
    out = tmp_path / "folded.onnx"
    shape = ",".join(map(str, case.shape))
    for args in ([str(pickle), "--trust-pickle"], [str(state_dict), "--arch", str(case.arch)]):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "bnfold",
                "fuse",
                *args,
                "--input-shape",
                shape,
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
            cwd=ROOT,
            env={**os.environ, "NO_COLOR": "1"},
        )
        assert result.returncode == 2, (args, result.returncode, result.stderr[-3000:])
        assert result.stdout == "", result.stdout[-2000:]
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, result.stderr[-3000:]
        assert lines[0].startswith("error: "), lines[0]
        assert "fx" in lines[0] and "export" in lines[0], lines[0]  # each failure, in a few words
        assert "\x1b[" not in result.stderr, lines[0]
        assert not out.exists()

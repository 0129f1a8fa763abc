"""The CI gate: check ONNX files (``bnfold check``) and report per file and per check.

Checks, in order (a file that cannot be read at all is reported as unreadable, exit 2):

==================  ==============================================================
``checker``         onnx's full checker (``full_check=True``)
``shape_inference`` strict shape and type inference (run by the full checker)
``weights_finite``  no NaN/Inf in any floating-point initializer
``batchnorm``       at most ``max_bn`` BatchNormalization nodes (each one named)
``onnxruntime``     loads in onnxruntime (CPU) and runs on seeded random inputs (or
                    ``--inputs``); a symbolic first dimension is a batch of 1, other
                    symbolic dimensions need ``--input-shape``
``outputs_finite``  no NaN/Inf in any output
``reference``       with ``--reference``: outputs equal the original's within atol/rtol
==================  ==============================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnfold.errors import BnfoldError, LoadError
from bnfold.reports import CheckItem, CheckReport, FileCheck, OutputCheck

__all__ = ["CheckOptions", "check_file", "run_check"]


@dataclass
class CheckOptions:
    max_bn: int = 0
    input_shapes: Sequence[tuple[int, ...]] = ()
    inputs_npz: Path | None = None
    reference: Path | None = None
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    trust_pickle: bool = False
    atol: float | None = None
    rtol: float | None = None
    batches: int = 1
    seed: int = 0


def run_check(paths: Sequence[Path], opts: CheckOptions) -> CheckReport:
    """Check every file; one report, exit code from the worst file."""
    files = []
    for path in paths:
        try:
            files.append(check_file(path, opts))
        except LoadError as e:
            item = CheckItem("load", False, e.one_line())
            files.append(FileCheck(str(path), False, False, (item,), (), ()))
    unreadable = any(not f.readable for f in files)
    passed = all(f.passed for f in files)
    return CheckReport(
        files=tuple(files),
        passed=passed,
        exit_code=2 if unreadable else 0 if passed else 1,
        max_bn=opts.max_bn,
    )


def check_file(path: Path, opts: CheckOptions) -> FileCheck:
    """Run every check on one ONNX file; LoadError when it cannot be read as ONNX."""
    from bnfold.loading import ModelFormat, load_model

    loaded = load_model(path)
    if loaded.format is not ModelFormat.ONNX:
        raise LoadError(
            f"is a {loaded.format.value} file, not ONNX",
            path=path,
            hint="bnfold check takes ONNX files; bnfold fuse makes them",
        )
    model = loaded.onnx_model
    assert model is not None  # an ONNX load always carries its model
    # the checker (C++) runs in a thread while Python checks the weights and onnxruntime
    # builds its session: on two cores that hides most of its time
    with ThreadPoolExecutor(max_workers=1) as pool:
        checker = pool.submit(_checker, path)
        items, bn_nodes, comparison = _rest(model, path, opts)
        every = [*checker.result(), *items]
    return FileCheck(
        str(path), True, all(i.passed for i in every), tuple(every), bn_nodes, comparison
    )


def _rest(
    model: Any, path: Path, opts: CheckOptions
) -> tuple[list[CheckItem], tuple[str, ...], tuple[OutputCheck, ...]]:
    """Every check but the checker: weights, BatchNorm count, onnxruntime, reference."""
    items: list[CheckItem] = []
    items.append(_weights_finite(model))
    bn_nodes = tuple(
        n.name or n.output[0] for n in model.graph.node if n.op_type == "BatchNormalization"
    )
    ok = len(bn_nodes) <= opts.max_bn
    items.append(
        CheckItem(
            "batchnorm",
            ok,
            f"{len(bn_nodes)} BatchNormalization nodes (at most {opts.max_bn})"
            + (f": {', '.join(bn_nodes[:20])}" if bn_nodes else ""),
        )
    )
    batches = _batches(model, opts)
    run_items, outputs = _run(path, batches)
    items += run_items
    comparison: tuple[OutputCheck, ...] = ()
    if opts.reference is not None and outputs is not None:
        item, comparison = _compare(path, batches, opts)
        items.append(item)
    return items, bn_nodes, comparison


def _checker(path: Path) -> list[CheckItem]:
    import onnx

    try:
        # from the path: the C++ checker reads the file itself (and any external data),
        # which is faster than handing it the parsed model
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.shape_inference.InferenceError as e:
        return [CheckItem("checker", True, "valid"), CheckItem("shape_inference", False, _first(e))]
    except (onnx.checker.ValidationError, ValueError) as e:
        return [
            CheckItem("checker", False, _first(e)),
            CheckItem("shape_inference", False, "not run: the checker failed"),
        ]
    return [CheckItem("checker", True, "valid"), CheckItem("shape_inference", True, "consistent")]


def _weights_finite(model: Any) -> CheckItem:
    from onnx import numpy_helper

    bad = []
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad.append(tensor.name)
    if bad:
        return CheckItem(
            "weights_finite", False, f"NaN/Inf in {len(bad)} initializers: {', '.join(bad[:10])}"
        )
    return CheckItem("weights_finite", True, "all initializers finite")


def _batches(model: Any, opts: CheckOptions) -> list[list[Any]]:
    from bnfold.inputs import onnx_batches, read_npz

    if opts.inputs_npz is not None:
        return read_npz(opts.inputs_npz, as_numpy=True)
    return onnx_batches(model, opts.input_shapes, opts.batches, seed=opts.seed)


def _run(path: Path, batches: list[list[Any]]) -> tuple[list[CheckItem], list[Any] | None]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        outputs = []
        for batch in batches:
            if len(batch) != len(names):
                raise BnfoldError(f"the model takes {len(names)} inputs, got {len(batch)}")
            outputs.append(session.run(None, dict(zip(names, batch, strict=True))))
    except BnfoldError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
        return [
            CheckItem("onnxruntime", False, _first(e)),
            CheckItem("outputs_finite", False, "not run: onnxruntime failed"),
        ], None
    items = [CheckItem("onnxruntime", True, f"loads and runs on {len(batches)} input batch(es)")]
    out_names = [o.name for o in session.get_outputs()]
    bad = sorted(
        {
            out_names[i]
            for out in outputs
            for i, value in enumerate(out)
            if np.issubdtype(np.asarray(value).dtype, np.floating) and not np.isfinite(value).all()
        }
    )
    items.append(
        CheckItem(
            "outputs_finite",
            not bad,
            f"NaN/Inf in outputs {', '.join(bad)}" if bad else "all finite",
        )
    )
    return items, outputs


def _compare(
    path: Path, batches: list[list[Any]], opts: CheckOptions
) -> tuple[CheckItem, tuple[OutputCheck, ...]]:
    from bnfold.loading import load_model
    from bnfold.verify import verify_onnx, verify_onnx_pair

    assert opts.reference is not None
    reference = load_model(
        opts.reference, arch=opts.arch, arch_kwargs=opts.arch_kwargs, trust_pickle=opts.trust_pickle
    )
    if reference.onnx_model is not None:
        v = verify_onnx_pair(opts.reference, path, batches, atol=opts.atol, rtol=opts.rtol)
    elif reference.module is not None:
        import torch

        tensors = [[torch.from_numpy(np.asarray(a)) for a in batch] for batch in batches]
        v = verify_onnx(reference.module, path, tensors, atol=opts.atol, rtol=opts.rtol)
    else:
        raise BnfoldError(
            "--reference is a bare state_dict",
            path=opts.reference,
            hint="pass --arch to build its architecture",
        )
    message = (
        f"max abs error {v.max_abs_error:.3g}, max rel error {v.max_rel_error:.3g} "
        f"(atol {v.atol:g}, rtol {v.rtol:g}) against {opts.reference}"
    )
    return CheckItem("reference", v.passed, message), v.outputs


def _first(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]

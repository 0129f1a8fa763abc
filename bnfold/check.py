"""The CI gate: check ONNX files (``bnfold check``) and report per file and per check.

Checks, in order (a file that cannot be read at all is reported as unreadable, exit 2):

==================  ==============================================================
``checker``         onnx's full checker (``full_check=True``)
``shape_inference`` strict shape and type inference (run by the full checker)
``weights_finite``  no NaN/Inf in any floating-point initializer or Constant tensor
                    (subgraphs' too)
``batchnorm``       at most ``max_bn`` BatchNormalization nodes, subgraphs' and
                    functions' included (each one named with its place)
``onnxruntime``     loads in onnxruntime (CPU) and runs on seeded random inputs (or
                    ``--inputs``); a symbolic first dimension is a batch of 1, other
                    symbolic dimensions need ``--input-shape``
``outputs_finite``  no NaN/Inf in any output
``reference``       with ``--reference``: outputs equal the original's within atol/rtol
==================  ==============================================================
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

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
    """Run every check on one ONNX file; LoadError when it cannot be read as ONNX.

    One thread, in this order: onnx's checker holds the GIL while it runs, so a thread
    beside it would gain little.
    """
    from bnfold.onnx_fold import batchnorm_nodes, quiet_ir

    proto = _load(path)
    with quiet_ir():
        model = ir.serde.deserialize_model(proto)  # wraps the proto's tensors, no copy
        bn_nodes = tuple(label for label, _ in batchnorm_nodes(model))
        items = [_weights_finite(model), _batchnorm(bn_nodes, opts)]
    batches = _batches(proto, opts)
    del model, proto  # onnxruntime and the checker read the file themselves
    checker = _checker(path)
    run_items, outputs = _run(path, batches)
    items += run_items
    comparison: tuple[OutputCheck, ...] = ()
    if opts.reference is not None and outputs is not None:
        item, comparison = _compare(path, batches, opts)
        items.append(item)
    every = [*checker, *items]
    return FileCheck(
        str(path), True, all(i.passed for i in every), tuple(every), bn_nodes, comparison
    )


def _load(path: Path) -> Any:
    """The ONNX model as load_model reads it (external data too); LoadError otherwise."""
    from bnfold.loading import ModelFormat, load_model

    loaded = load_model(path)
    if loaded.format is not ModelFormat.ONNX:
        raise LoadError(
            f"is a {loaded.format.value} file, not ONNX",
            path=path,
            hint="bnfold check takes ONNX files; bnfold fuse makes them",
        )
    assert loaded.onnx_model is not None  # an ONNX load always carries its model
    return loaded.onnx_model


def _tensors(model: ir.Model) -> Iterator[tuple[str, np.ndarray | None]]:
    """Every initializer (subgraphs' too) and every Constant node's tensor (the weights of
    paddle2onnx's files) as an array; None when its data cannot be read."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            yield str(value.name), _array(value.const_value)
    for graph in (model.graph, *model.functions.values()):
        for node in ir.traversal.RecursiveGraphIterator(graph):
            attr = node.attributes.get("value")
            if node.op_type == "Constant" and attr is not None and attr.type == ir.AttributeType.TENSOR:
                yield str(node.outputs[0].name), _array(attr.as_tensor())


def _array(tensor: Any) -> np.ndarray | None:
    try:
        return np.asarray(tensor.numpy())
    except Exception:  # noqa: BLE001 - bytes that do not make the tensor they claim to
        return None


def _batchnorm(bn_nodes: tuple[str, ...], opts: CheckOptions) -> CheckItem:
    return CheckItem(
        "batchnorm",
        len(bn_nodes) <= opts.max_bn,
        f"{len(bn_nodes)} BatchNormalization nodes (at most {opts.max_bn})"
        + (f": {', '.join(bn_nodes[:20])}" if bn_nodes else ""),
    )


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


def _weights_finite(model: ir.Model) -> CheckItem:
    bad = []
    for name, array in _tensors(model):
        if array is None:
            bad.append(f"{name} (unreadable)")
        elif _floating(array) and not np.isfinite(array).all():
            bad.append(name)
    if bad:
        return CheckItem(
            "weights_finite", False, f"NaN/Inf in {len(bad)} initializers: {', '.join(bad[:10])}"
        )
    return CheckItem("weights_finite", True, "all initializers finite")


def _floating(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"


def _batches(model: Any, opts: CheckOptions) -> list[list[Any]]:
    from bnfold.inputs import onnx_batches, read_npz

    if opts.inputs_npz is not None:
        return read_npz(opts.inputs_npz, as_numpy=True)
    return onnx_batches(model, opts.input_shapes, opts.batches, seed=opts.seed)


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # the basic graph rewrites only: every node still gets its kernel and the model still
    # runs, which is what this check proves; the layout rewrites of the default level
    # double the session's build time and are onnxruntime's own business
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(path: Path, batches: list[list[Any]]) -> tuple[list[CheckItem], list[Any] | None]:
    try:
        session = _session(path)
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

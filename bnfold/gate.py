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
    beside it would gain little.  The file is read with onnx alone: neither torch nor
    onnx-ir (which imports sympy, a quarter of a second) is imported.
    """
    model = _load(path)
    bn_nodes = _bn_nodes(model)
    items = [_weights_finite(model), _batchnorm(bn_nodes, opts)]
    batches = _batches(model, opts)
    del model  # the checker and onnxruntime read the file themselves
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
    """The ONNX model: parsed straight from the mapped file, or as load_model reads it.

    ``onnx.load`` reads the whole file into memory before parsing it; parsing the mapped
    file saves that copy (on the 100 MB ResNet-50, 0.1-0.2 s of check's 0.5 s on this
    project's 2-core machine: the difference between 1.0x and 1.3x onnxruntime alone).
    Anything the mapped parse does not take (another format, external data, a broken
    file) goes to load_model, whose checks and errors are the ones to report.
    """
    from bnfold.loading import ModelFormat, load_model

    mapped = _parse_mapped(path)
    if mapped is not None:
        return mapped
    loaded = load_model(path)
    if loaded.format is not ModelFormat.ONNX:
        raise LoadError(
            f"is a {loaded.format.value} file, not ONNX",
            path=path,
            hint="bnfold check takes ONNX files; bnfold fuse makes them",
        )
    assert loaded.onnx_model is not None  # an ONNX load always carries its model
    return loaded.onnx_model


def _parse_mapped(path: Path) -> Any:
    """onnx's parser on the mapped file; None unless that gives a whole model with all its
    tensors inside."""
    import mmap

    import onnx
    from google.protobuf.message import DecodeError
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        with (
            path.open("rb") as f,
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm,
            memoryview(mm) as view,
        ):
            model = onnx.ModelProto.FromString(view)  # the parser copies what it keeps
    except (OSError, ValueError, DecodeError, RuntimeError):
        return None
    if model.ir_version <= 0 or not model.opset_import or not model.HasField("graph"):
        return None
    if any(uses_external_data(t) for t in _get_all_tensors(model)):
        return None  # load_model keeps external data inside the model's folder
    return model


def _graphs(model: Any) -> Iterator[tuple[str, Any]]:
    """(place, graph) for the main graph, every subgraph (``if/then_branch/``) and every
    model-local function (``function:name/``): the places ``onnx_fold.batchnorm_nodes``
    gives, which inspect and fuse report."""
    import onnx

    def walk(graph: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        yield prefix, graph
        for node in graph.node:
            label = prefix + (node.name or (node.output[0] if node.output else "") or node.op_type)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g, f"{label}/{attr.name}/")
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for i, sub in enumerate(attr.graphs):
                        yield from walk(sub, f"{label}/{attr.name}[{i}]/")

    yield from walk(model.graph, "")
    for function in model.functions:
        yield from walk(function, f"function:{function.name}/")


def _bn_nodes(model: Any) -> tuple[str, ...]:
    """Every BatchNormalization node's name, with its place; repeated names get ``#2``."""
    names = [
        prefix + (node.name or (node.output[0] if node.output else "") or node.op_type)
        for prefix, graph in _graphs(model)
        for node in graph.node
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")
    ]
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return tuple(out)


def _tensors(model: Any) -> Iterator[tuple[str, np.ndarray | None]]:
    """Every initializer (subgraphs' too) and every Constant node's tensor (paddle2onnx
    keeps its weights there) as an array; None when its data cannot be read."""
    import onnx

    for _, graph in _graphs(model):
        for tensor in getattr(graph, "initializer", ()):  # functions have none
            yield tensor.name, _array(tensor)
        for node in graph.node:
            if node.op_type != "Constant":
                continue
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    yield (node.output[0] if node.output else node.name), _array(attr.t)


def _array(tensor: Any) -> np.ndarray | None:
    from onnx import numpy_helper

    try:
        return numpy_helper.to_array(tensor)
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


def _weights_finite(model: Any) -> CheckItem:
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

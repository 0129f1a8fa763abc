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

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnfold.errors import BnfoldError, LoadError
from bnfold.memory import freed_memory_reused
from bnfold.protowire import key, varint
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
    with freed_memory_reused():
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

    One thread, in this order on purpose: onnx's checker holds the GIL while it runs, so
    a thread beside it gains little, and onnxruntime, built right after it, reuses the
    memory the checker's copy of the model has just freed instead of faulting in fresh
    pages (on a 100 MB model those page faults cost more than either's own work).
    """
    model, arrays = _read(path)
    bn_nodes = _bn_nodes(model)
    items = [_weights_finite(arrays), _batchnorm(bn_nodes, opts)]
    batches = _batches(model, opts)
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


def _read(path: Path) -> tuple[Any, Iterator[tuple[str, np.ndarray]]]:
    """The model and its initializers as (name, array).

    A file with all its weights inside is mapped and walked without copying them
    (``_walk``); anything else (external data, a file the walk does not take) is read by
    load_model, whose errors are the ones to report.
    """
    from onnx import numpy_helper

    walked = _walk(path)
    if walked is not None:
        return walked
    model = _load(path)
    return model, ((t.name, numpy_helper.to_array(t)) for t in model.graph.initializer)


# --------------------------------------------------------------------------- the walk
# ONNX files are protobuf: each field is a varint key (number << 3 | wire type) and a
# value. Parsing a 100 MB file copies every weight into freshly allocated memory twice
# (the read, then the message); the walk below maps the file, cuts the bytes of each
# initializer's raw_data out of the message and parses only the rest (names, shapes,
# nodes, inputs), so protobuf still validates every byte but the weights, which numpy
# reads in place.

_MODEL_IR_VERSION_KEY = 1 << 3  # ModelProto.ir_version, a varint
_MODEL_GRAPH = 7  # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_TENSOR_RAW_DATA = 9  # TensorProto.raw_data


class _Unwalkable(Exception):
    """Not a file the walk takes: load_model reads it (and reports what is wrong)."""


def _walk(path: Path) -> tuple[Any, Iterator[tuple[str, np.ndarray]]] | None:
    """The model without raw_data payloads and its initializers as views of the mapped
    file; None when the walk does not take the file (external data, anything odd)."""
    import mmap

    import onnx
    from google.protobuf.message import DecodeError

    if sys.byteorder != "little":  # ONNX raw_data is little-endian
        return None
    try:
        with path.open("rb") as f:
            buf = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        # the ir_version field, which every serializer writes first: no zip, pickle, text
        # or safetensors file starts so and also parses as a model below, so the walk
        # never takes a file load_model would have called something else
        if buf[0] != _MODEL_IR_VERSION_KEY:
            return None
        spans: list[tuple[int, int, tuple[int, int] | None]] = []
        model = onnx.ModelProto.FromString(_strip(buf, spans))
    except (OSError, ValueError, RuntimeError, DecodeError, _Unwalkable):
        return None
    if model.ir_version <= 0 or not model.opset_import or not model.HasField("graph"):
        return None
    initializers = model.graph.initializer
    if len(initializers) != len(spans) or any(
        t.data_location == onnx.TensorProto.EXTERNAL or t.external_data for t in initializers
    ):
        return None
    return model, _arrays(buf, initializers, spans)


def _strip(buf: memoryview, spans: list[tuple[int, int, tuple[int, int] | None]]) -> bytes:
    """The ModelProto in ``buf`` without its initializers' raw_data; ``spans`` gets, per
    initializer in order, the bounds of its TensorProto and of its raw_data (or None)."""
    out = bytearray()
    for number, wire, start, value, end in _fields(buf, 0, len(buf)):
        if number != _MODEL_GRAPH or wire != 2:
            out += buf[start:end]
            continue
        graph = bytearray()
        for g_number, g_wire, g_start, g_value, g_end in _fields(buf, value, end):
            if g_number != _GRAPH_INITIALIZER or g_wire != 2:
                graph += buf[g_start:g_end]
                continue
            tensor = bytearray()
            raw = None
            for t_number, t_wire, t_start, t_value, t_end in _fields(buf, g_value, g_end):
                if t_number == _TENSOR_RAW_DATA and t_wire == 2:
                    raw = (t_value, t_end)  # the last one counts, as in protobuf
                else:
                    tensor += buf[t_start:t_end]
            spans.append((g_value, g_end, raw))
            graph += key(_GRAPH_INITIALIZER) + varint(len(tensor)) + tensor
        out += key(_MODEL_GRAPH) + varint(len(graph)) + graph
    return bytes(out)


def _arrays(
    buf: memoryview, initializers: Any, spans: list[tuple[int, int, tuple[int, int] | None]]
) -> Iterator[tuple[str, np.ndarray]]:
    """Each initializer as numpy_helper.to_array gives it: a view of raw_data when that is
    a plain little-endian array of the right size, else the tensor parsed whole."""
    import onnx
    from onnx import helper, numpy_helper

    for header, (start, end, raw) in zip(initializers, spans, strict=True):
        if raw is not None and header.data_type in _PLAIN and not header.HasField("segment"):
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(header.data_type))
            count = 1
            for d in header.dims:
                count *= d
            if min(header.dims, default=0) >= 0 and raw[1] - raw[0] == count * dtype.itemsize:
                yield header.name, np.frombuffer(buf[raw[0] : raw[1]], dtype)
                continue
        yield header.name, numpy_helper.to_array(onnx.TensorProto.FromString(buf[start:end]))


# TensorProto data types numpy reads from raw_data as they are (to_array's frombuffer)
_PLAIN = frozenset((1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13))


def _fields(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(number, wire type, start, value start, end) of each field of the message in
    ``buf[pos:end]``."""
    while pos < end:
        start = pos
        field_key, pos = _read_varint(buf, pos, end)
        wire = field_key & 7
        if wire == 0:
            value = pos
            _, pos = _read_varint(buf, pos, end)
        elif wire == 2:
            size, value = _read_varint(buf, pos, end)
            pos = value + size
        elif wire in (1, 5):
            value = pos
            pos += 8 if wire == 1 else 4
        else:  # groups: not in ONNX
            raise _Unwalkable
        if pos > end:
            raise _Unwalkable
        yield field_key >> 3, wire, start, value, pos


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while pos < end and shift < 64:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise _Unwalkable


def _batchnorm(bn_nodes: tuple[str, ...], opts: CheckOptions) -> CheckItem:
    return CheckItem(
        "batchnorm",
        len(bn_nodes) <= opts.max_bn,
        f"{len(bn_nodes)} BatchNormalization nodes (at most {opts.max_bn})"
        + (f": {', '.join(bn_nodes[:20])}" if bn_nodes else ""),
    )


def _bn_nodes(model: Any) -> tuple[str, ...]:
    return tuple(
        n.name or n.output[0] for n in model.graph.node if n.op_type == "BatchNormalization"
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


def _weights_finite(arrays: Iterator[tuple[str, np.ndarray]]) -> CheckItem:
    bad = [
        name
        for name, array in arrays
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all()
    ]
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

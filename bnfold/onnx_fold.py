"""Fold BatchNormalization inside an ONNX graph (models bnfold did not export), on onnx-ir.

Which layers a BN folds into, in which direction, along which axis and what breaks a
forward fold come from ``rules.RULES`` (the table the PyTorch route reads too: an ONNX
operator is a layer kind there); the maths is ``folding.py``'s, float64 inside, rounded
once.  Per BatchNormalization of the main graph, in graph order, the pass matches, checks
and rewrites, like onnxscript's rewriter (``rules/common/_fuse_batchnorm.py``):

- backward, ``layer -> [Add] -> [layout ops] -> BN``: into Conv, ConvTranspose (any
  ``group``), Gemm (``transB`` either way, ``alpha``/``beta``) or MatMul.  An ``Add`` of a
  constant with one value per output channel is the layer's bias; a MatMul without one
  gets an ``Add``.
- forward, ``BN -> [layout ops] -> layer``: into Conv (no zero padding), Gemm, MatMul.

Layout ops are Reshape, Flatten, Transpose, Squeeze, Unsqueeze and Identity.  A fold is
made only when it is proven exact; anything else keeps the BN with a reason code:

- the BN's parameters and the layer's weights are constants: initializers that are not
  graph inputs (a graph input overrides its initializer at run time), Constant nodes, or
  Identity/Cast/Reshape/Flatten/Squeeze/Unsqueeze/Transpose of those (paddle2onnx keeps
  every weight in a Constant node);
- every tensor the fold changes is read by the next node of the pattern only, inside
  subgraphs too (onnx-ir counts a subgraph's read of an outer tensor as a use).  Shape
  and Size read only a tensor's shape, which a fold keeps, so they do not count;
- the weight is read by this layer only (a bias read elsewhere gets a private copy);
- the BN's channel axis (axis 1) lands on the layer's channel axis (``ChannelAxis``):
  trivially for a Conv or Gemm next to the BN, through layout ops or a MatMul of unknown
  rank with the shapes onnx infers.

BatchNormalization nodes inside If/Loop/Scan subgraphs and functions stay (``subgraph``).
After the pairwise folds, ``merge_onnx.py`` merges parallel Conv branches and identity
BatchNormalization nodes summed by ``Add``/``Sum`` into one Conv (``rules.MERGE``); BNs
that a merge leaves next to a Conv are then tried again.
The rewrite keeps node names, graph inputs (initializers listed as inputs too) and outputs,
metadata and opsets: a backward fold gives the BN's output name to the tensor that now
carries its values, so everything downstream is untouched; only the constants that folds
orphaned (the BN's parameters, replaced weights and the Constant nodes that made them) go.

torch is imported only when a fold computes (``folding.py``), not with this module.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from bnfold.rules import ChannelAxis, Direction, FoldRule, Reason, onnx_rule

if TYPE_CHECKING:
    import onnx
    import torch

    from bnfold.fold_torch import Decision
    from bnfold.reports import MergedSite

__all__ = [
    "BN_KIND",
    "OnnxBatchNorm",
    "OnnxFoldOutcome",
    "batchnorm_nodes",
    "describe",
    "fold_model",
    "fold_onnx",
]

BN_KIND = "ONNX BatchNormalization"
_ONNX_DOMAINS = ("", "ai.onnx")
_LAYOUT = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"})
_SHAPE_READERS = frozenset({"Shape", "Size"})  # they read a tensor's shape, not its values
_CONSTANT_OPS = frozenset(
    {"Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"}
)
_CAST_TO = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.DOUBLE: np.float64,
    ir.DataType.INT32: np.int32,
    ir.DataType.INT64: np.int64,
}
_MAX_CHAIN = 32  # constant chains longer than this are not followed


@dataclass
class OnnxFoldOutcome:
    model: onnx.ModelProto
    decisions: list[Decision]
    merges: list[MergedSite] = field(default_factory=list)  # branch merges (merge_onnx.py)


class _Declined(Exception):
    def __init__(self, reason: Reason, detail: str):
        super().__init__(reason.value)
        self.reason, self.detail = reason, detail


@contextlib.contextmanager
def _quiet_ir() -> Iterator[None]:
    """Keep onnx-ir's log quiet: it warns about what it repairs while reading an invalid
    file (an input no node produces), and bnfold's stderr carries one line per error."""
    logger = logging.getLogger("onnx_ir")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _to_ir(model: onnx.ModelProto) -> ir.Model:
    with _quiet_ir():
        # the IR wraps the proto's tensors without copying them, and never writes to them
        return ir.serde.deserialize_model(model)


# --------------------------------------------------------------------------- finding BNs


def _label(node: ir.Node) -> str:
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs else None
    return out or node.op_type


def batchnorm_nodes(model: ir.Model) -> list[tuple[str, ir.Node]]:
    """Every BatchNormalization node with its name: in graph order, a subgraph's at its
    node (``loop/body/bn``), functions' last (``function:name/bn``); repeated names get
    ``#2``, ``#3``."""
    found = [
        (label, node)
        for label, node in _all_nodes(model)
        if node.op_type == "BatchNormalization" and node.domain in _ONNX_DOMAINS
    ]
    seen: dict[str, int] = {}
    out = []
    for label, node in found:
        seen[label] = seen.get(label, 0) + 1
        out.append((label if seen[label] == 1 else f"{label}#{seen[label]}", node))
    return out


def _all_nodes(model: ir.Model) -> Iterator[tuple[str, ir.Node]]:
    yield from _walk(model.graph, "")
    for function in model.functions.values():
        yield from _walk(function, f"function:{function.name}/")


def _walk(graph: ir.Graph | ir.Function, prefix: str) -> Iterator[tuple[str, ir.Node]]:
    for node in graph:
        label = prefix + _label(node)
        yield label, node
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from _walk(attr.as_graph(), f"{label}/{attr.name}/")
            elif attr.type == ir.AttributeType.GRAPHS:
                for i, sub in enumerate(attr.as_graphs()):
                    yield from _walk(sub, f"{label}/{attr.name}[{i}]/")


# --------------------------------------------------------------------------- constants


def _constant(value: ir.Value | None, depth: int = 0) -> np.ndarray | None:
    """The value of a tensor the file fixes, or None.

    Initializers that are not graph inputs (a graph input overrides its initializer at
    run time), Constant nodes, and Identity, Cast, Reshape, Flatten, Squeeze, Unsqueeze and
    Transpose of constants, evaluated with numpy (exact: they move or convert values).
    """
    if value is None or value.is_graph_input() or depth > _MAX_CHAIN:
        return None
    if value.is_initializer():
        return _array(value.const_value)
    node = value.producer()
    if node is None or node.domain not in _ONNX_DOMAINS or len(node.outputs) != 1:
        return None
    try:
        if node.op_type == "Constant":
            return _constant_node(node)
        if node.op_type in _CONSTANT_OPS:
            return _evaluate(node, depth)
    except (ValueError, TypeError, IndexError, KeyError, OverflowError):
        return None  # an op the file gets wrong: not a constant bnfold can read
    return None


def _array(tensor: Any) -> np.ndarray | None:
    if tensor is None:
        return None
    try:
        return np.asarray(tensor.numpy())
    except Exception:  # noqa: BLE001 - a tensor onnx-ir cannot read (external, odd dtype)
        return None


def _constant_node(node: ir.Node) -> np.ndarray | None:
    if len(node.attributes) != 1:
        return None
    ((name, attr),) = node.attributes.items()
    if name == "value":
        return _array(attr.as_tensor())
    if name in ("value_float", "value_floats"):
        return np.asarray(attr.value, dtype=np.float32)
    if name in ("value_int", "value_ints"):
        return np.asarray(attr.value, dtype=np.int64)
    return None  # sparse or string constants


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def _ints_attr(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else [int(i) for i in attr.as_ints()]


def _evaluate(node: ir.Node, depth: int) -> np.ndarray | None:
    """One constant op on constant inputs, as the ONNX operator defines it."""
    x = _constant(node.inputs[0] if node.inputs else None, depth + 1)
    if x is None:
        return None
    op = node.op_type
    if op == "Identity":
        return x
    if op == "Cast":
        target = _CAST_TO.get(ir.DataType(_int_attr(node, "to", 0)))
        if target is None or (
            np.issubdtype(x.dtype, np.floating) and np.issubdtype(target, np.integer)
        ):
            return None  # float -> int is undefined out of range; exotic targets
        return x.astype(target)
    if op == "Transpose":
        perm = _ints_attr(node, "perm")
        return np.transpose(x, perm)
    if op == "Flatten":
        axis = _int_attr(node, "axis", 1)
        axis = axis + x.ndim if axis < 0 else axis
        return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
    axes = _ints_attr(node, "axes") if op != "Reshape" else None
    operand = _constant(node.inputs[1], depth + 1) if len(node.inputs) > 1 else None
    if op == "Reshape":
        shape = operand if operand is not None else _ints_attr(node, "shape")
        if shape is None:
            return None
        dims = [int(d) for d in np.asarray(shape).reshape(-1)]
        if not _int_attr(node, "allowzero", 0):
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return x.reshape(dims)
    if axes is None and operand is not None:
        axes = [int(a) for a in np.asarray(operand).reshape(-1)]
    if op == "Squeeze":
        return np.squeeze(x, axis=None if axes is None else tuple(a % x.ndim for a in axes))
    if axes is None:  # Unsqueeze needs its axes
        return None
    rank = x.ndim + len(axes)
    out = x
    for a in sorted(a % rank for a in axes):
        out = np.expand_dims(out, a)
    return out


def _private(value: ir.Value, node: ir.Node) -> bool:
    """Whether ``node`` is the only reader of ``value`` and of the constants it comes from."""
    if value.is_graph_output() or value.is_graph_input():
        return False
    if [u.node for u in value.uses()] != [node]:
        return False
    producer = value.producer()
    if producer is None or producer.op_type == "Constant":
        return True
    return (
        bool(producer.inputs)
        and producer.inputs[0] is not None
        and _private(producer.inputs[0], producer)
    )


# --------------------------------------------------------------------------- shapes


class _Shapes:
    """Tensor shapes: the file's own, completed by onnx's shape inference, run once when a
    fold first needs a shape the file does not state (the file's value_info is kept)."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.inferred: dict[ir.Value, tuple[int | None, ...]] | None = None

    def __call__(self, value: ir.Value) -> tuple[int | None, ...] | None:
        own = _dims(value.shape)
        if own is not None and None not in own:
            return own
        if self.inferred is None:
            self.inferred = _infer_shapes(self.model)
        return self.inferred.get(value, own)

    def note(self, new: ir.Value, like: ir.Value) -> None:
        """A value a fold made has the shape of ``like``."""
        if self.inferred is not None and like in self.inferred:
            self.inferred[new] = self.inferred[like]


def _dims(shape: Any) -> tuple[int | None, ...] | None:
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in shape)


def _infer_shapes(model: ir.Model) -> dict[ir.Value, tuple[int | None, ...]]:
    """onnx's shape inference on the main graph, handed a copy without the big weights
    (they go in as graph inputs of their shape); the model itself is left as it was."""
    import onnx

    graph = model.graph
    inits = list(graph.initializers.values())
    n_inputs = len(graph.inputs)
    try:
        with _quiet_ir():
            graph.initializers.clear()
            for value in inits:
                tensor = value.const_value
                if tensor is not None and tensor.nbytes <= 1024:  # shapes for Reshape etc.
                    graph.initializers.add(value)
                elif not value.is_graph_input():
                    if tensor is not None:
                        value.shape = value.shape or ir.Shape(tensor.shape.numpy())
                        value.dtype = value.dtype or tensor.dtype
                    graph.inputs.append(value)
            proto = ir.serde.serialize_model(model)
    finally:
        while len(graph.inputs) > n_inputs:
            graph.inputs.pop()
        graph.initializers.clear()
        for value in inits:
            graph.initializers.add(value)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - shapes are a bonus; folds that need them decline
        return {}
    by_name: dict[str, tuple[int | None, ...]] = {}
    g = inferred.graph
    for info in (*g.value_info, *g.input, *g.output):
        t = info.type.tensor_type
        if t.HasField("shape"):
            by_name[info.name] = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim
            )
    values = [*graph.inputs, *graph.initializers.values()]
    values += [out for node in graph for out in node.outputs]
    return {v: by_name[v.name] for v in values if v.name in by_name}


def _aligned(
    shapes: _Shapes, start: ir.Value, axis: int, path: list[ir.Node], end: ir.Value, end_axis: int
) -> bool | None:
    """Whether channel ``axis`` of ``start`` lands on ``end_axis`` of ``end`` through the
    layout ops of ``path``; None when shapes are missing.

    In row-major order an element's channel is ``(flat index // inner) % channels``
    (``inner``: the product of the sizes after the channel axis), and Reshape, Flatten,
    Squeeze, Unsqueeze and Identity keep the flat index; so the channels sit on the axis of
    the same size whose following sizes multiply to ``inner``.  Transpose moves that axis.
    """
    src, dst = shapes(start), shapes(end)
    if src is None or dst is None:
        return None
    if not (-len(src) <= axis < len(src) and -len(dst) <= end_axis < len(dst)):
        return False  # a tensor without that axis
    axis %= len(src)
    channels, tail = src[axis], src[axis + 1 :]
    if channels is None or None in tail:
        return None
    inner = math.prod(tail)  # type: ignore[arg-type]  # checked: no None
    for node in path:
        if node.op_type != "Transpose":
            continue
        before = shapes(node.inputs[0]) if node.inputs[0] is not None else None
        after = shapes(node.outputs[0])
        if before is None or after is None:
            return None
        at = _axis_of(before, channels, inner)
        if at is None:
            return None if None in before else False
        perm = _ints_attr(node, "perm") or list(range(len(before)))[::-1]
        new_at = perm.index(at)
        rest = after[new_at + 1 :]
        if None in rest:
            return None
        inner = math.prod(rest)  # type: ignore[arg-type]
    end_axis %= len(dst)
    rest = dst[end_axis + 1 :]
    if dst[end_axis] is None or None in rest:
        return None
    return dst[end_axis] == channels and math.prod(rest) == inner  # type: ignore[arg-type]


def _axis_of(shape: tuple[int | None, ...], channels: int, inner: int) -> int | None:
    for axis, size in enumerate(shape):
        rest = shape[axis + 1 :]
        if size == channels and None not in rest and math.prod(rest) == inner:  # type: ignore[arg-type]
            return axis
    return None


# --------------------------------------------------------------------------- the BN


@dataclass(frozen=True)
class _BN:
    s: torch.Tensor  # float64 scale and shift of the eval-mode BN: s * x + t
    t: torch.Tensor
    params: tuple[ir.Value, ...]


def _bn_params(bn: ir.Node) -> list[np.ndarray | None]:
    inputs = list(bn.inputs[1:5]) + [None] * max(0, 5 - len(bn.inputs))
    return [_constant(v) for v in inputs[:4]]


def _training(bn: ir.Node, opset: int) -> str | None:
    """Why the BN normalises with batch statistics, or None."""
    if _int_attr(bn, "training_mode", 0):
        return "training_mode=1 (batch statistics)"
    if any(out.name for out in bn.outputs[1:]):
        return "it outputs running statistics (training mode)"
    if opset < 7 and not _int_attr(bn, "is_test", 0):
        return "is_test=0 (training mode, opset < 7)"
    return None


def _bn_affine(bn: ir.Node, opset: int, shapes: _Shapes) -> _BN:
    import torch

    from bnfold.folding import all_finite, bn_affine

    why = _training(bn, opset)
    if why:
        raise _Declined(Reason.TRAIN_MODE, why)
    names = ("scale", "B", "input_mean", "input_var")
    inputs = list(bn.inputs[1:5])
    if len(inputs) < 4 or any(v is None for v in inputs):
        raise _Declined(
            Reason.NO_RUNNING_STATS,
            f"{len([v for v in inputs if v is not None])} of its 4 parameters and statistics "
            "are given",
        )
    arrays = [_constant(v) for v in inputs]
    for name, value, array in zip(names, inputs, arrays, strict=True):
        if array is None:
            assert value is not None
            why = (
                "a graph input (overridable at run time)" if value.is_graph_input() else "computed"
            )
            raise _Declined(Reason.NOT_CONSTANT, f"its {name} {value.name!r} is {why}")
    shapes_of = [a.shape for a in arrays if a is not None]
    if any(len(s) != 1 for s in shapes_of) or len(set(shapes_of)) != 1:
        raise _Declined(
            Reason.BN_PARAMETERS,
            "parameter shapes " + ", ".join(str(list(s)) for s in shapes_of),
        )
    if any(not _floating(a) for a in arrays if a is not None):
        raise _Declined(Reason.BN_PARAMETERS, "parameters that are not floating point")
    if bn.attributes.get("spatial") is not None and not _int_attr(bn, "spatial", 1):
        x = shapes(bn.inputs[0]) if bn.inputs[0] is not None else None
        if x is None or len(x) != 2:
            raise _Declined(
                Reason.BN_PARAMETERS,
                "spatial=0: one value per activation" + ("" if x else " (input rank unknown)"),
            )
    eps_attr = bn.attributes.get("epsilon")
    eps = 1e-5 if eps_attr is None else float(eps_attr.as_float())
    scale, bias, mean, var = (torch.from_numpy(a.astype(np.float64)) for a in arrays)  # type: ignore[union-attr]
    s, t = bn_affine(mean, var, scale, bias, eps)
    if not all_finite(s, t, var, scale, bias, mean):
        raise _Declined(Reason.NONFINITE_STATS, "NaN/Inf in the BN's parameters or statistics")
    return _BN(s, t, tuple(v for v in inputs if v is not None))


def _floating(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.as_float())


def _torch(array: np.ndarray) -> torch.Tensor:
    """A torch view of a constant's array (bfloat16, which numpy lacks, widened to float32:
    exact).  onnx-ir's arrays are read-only views of the file's bytes; the folding maths
    never writes to its inputs, so torch's warning about read-only arrays does not apply."""
    import torch

    if array.dtype.name == "bfloat16":
        array = array.astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _torch_dtype(array: np.ndarray) -> torch.dtype:
    import torch

    if array.dtype.name == "bfloat16":
        return torch.bfloat16
    return {np.float16: torch.float16, np.float32: torch.float32, np.float64: torch.float64}[
        array.dtype.type
    ]


def _per_channel(const: np.ndarray, rank: int, axis: int, channels: int) -> np.ndarray | None:
    """``const`` as one float64 value per channel, if adding it to a rank-``rank`` tensor adds
    one value per index of ``axis`` (sizes: ``channels`` or 1 there, 1 elsewhere)."""
    if const.ndim > rank:
        return None
    shape = (1,) * (rank - const.ndim) + tuple(const.shape)
    axis %= rank
    if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(const.astype(np.float64).reshape(-1), (channels,)).copy()


def _channel_shape(shape: tuple[int, ...], rank: int, axis: int, channels: int) -> list[int]:
    """The shape of a per-channel constant replacing one of ``shape`` (same broadcast)."""
    from_end = rank - axis % rank
    out = [1] * max(len(shape), from_end)
    out[len(out) - from_end] = channels
    return out


def _pads_zeros(node: ir.Node) -> bool:
    auto = node.attributes.get("auto_pad")
    mode = auto.as_string() if auto is not None else "NOTSET"
    return any(_ints_attr(node, "pads") or []) or mode in ("SAME_UPPER", "SAME_LOWER")


# --------------------------------------------------------------------------- layers


@dataclass
class _Layer:
    """A Conv, ConvTranspose, Gemm or MatMul as a fold sees it."""

    node: ir.Node
    rule: FoldRule
    w: torch.Tensor  # the weight in PyTorch's layout: Gemm and MatMul weights as (out, in)
    dtype: torch.dtype  # the weight's dtype in the file
    transposed: bool  # ``w`` is the file's weight transposed
    groups: int
    channels: int  # output channels (backward fold) or input features (forward fold)
    rank: int | None  # rank of the tensor it writes (backward) or reads (forward)
    axis: int  # the channel axis in that tensor (negative: from the end)
    bias: np.ndarray | None  # what it adds itself, one float64 per output channel
    bias_input: bool  # it takes a bias at input 2 (Conv, ConvTranspose, Gemm)

    def file_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w.T.contiguous() if self.transposed else w


def _layer(node: ir.Node, rule: FoldRule, shapes: _Shapes) -> _Layer:
    """The layer's weight and bias, checked; _Declined when it cannot be folded into."""
    op, label = node.op_type, _label(node)
    value = node.inputs[1] if len(node.inputs) > 1 else None
    w = _constant(value)
    if value is None or w is None:
        why = " (a graph input)" if value is not None and value.is_graph_input() else ""
        raise _Declined(Reason.NOT_CONSTANT, f"{label}'s weight is not a constant{why}")
    if not _private(value, node):
        raise _Declined(Reason.SHARED_WEIGHTS, f"{value.name} is shared")
    if not _floating(w) or w.dtype.name not in ("float16", "float32", "float64", "bfloat16"):
        raise _Declined(Reason.UNSUPPORTED_LAYER, f"{label}'s weight is {w.dtype}")
    backward = rule.direction is Direction.BACKWARD
    groups = _int_attr(node, "group", 1) if op in ("Conv", "ConvTranspose") else 1
    rank: int | None
    axis = 1 if rule.channel_axis is ChannelAxis.BEFORE_SPATIAL else -1
    if op in ("Conv", "ConvTranspose"):
        if w.ndim < 3:
            raise _Declined(Reason.UNSUPPORTED_LAYER, f"{label}'s weight is {w.ndim}-D")
        if groups < 1 or w.shape[0] % groups:
            raise _Declined(
                Reason.UNSUPPORTED_LAYER,
                f"{label}'s {w.shape[0]} channels do not split into {groups} groups",
            )
        w_t, transposed, rank = _torch(w), False, w.ndim
        out_ch = w.shape[0] if op == "Conv" else w.shape[1] * groups
        channels = out_ch if backward else w.shape[1] * groups
    else:  # Gemm, MatMul: y = x @ W (+ C)
        if w.ndim != 2:
            raise _Declined(Reason.UNSUPPORTED_LAYER, f"{label}'s weight is {w.ndim}-D")
        trans_b = op == "Gemm" and _int_attr(node, "transB", 0)
        w_t, transposed = _torch(w if trans_b else w.T), not trans_b
        out_ch = w_t.shape[0]
        channels = out_ch if backward else w_t.shape[1]
        if op == "Gemm":
            rank = 2
            if not backward and _int_attr(node, "transA", 0):
                axis = 0  # A is (features, rows)
        else:
            a = shapes(node.inputs[0]) if node.inputs[0] is not None else None
            rank = len(a) if a else None
    bias = None
    if op != "MatMul" and len(node.inputs) > 2 and node.inputs[2] is not None:
        b = _constant(node.inputs[2])
        if b is None:
            raise _Declined(Reason.NOT_CONSTANT, f"{label}'s bias is not a constant")
        if op == "Gemm":
            beta = _float_attr(node, "beta", 1.0)
            if beta != 0.0:
                bias = _per_channel(b, 2, 1, out_ch)
                if bias is None:
                    raise _Declined(
                        Reason.CHANNEL_MISMATCH,
                        f"{label}'s C {list(b.shape)} is not one value per output feature",
                    )
                bias = bias * beta
        elif b.shape != (out_ch,):
            raise _Declined(Reason.UNSUPPORTED_LAYER, f"{label}'s bias is {list(b.shape)}")
        else:
            bias = b.astype(np.float64)
    return _Layer(
        node,
        rule,
        w_t,
        _torch_dtype(w),
        transposed,
        groups,
        channels,
        rank,
        axis,
        bias,
        op != "MatMul",
    )


# --------------------------------------------------------------------------- the pass


@dataclass
class _Write:
    """Give ``node``'s input ``index`` the constant ``tensor``."""

    node: ir.Node
    index: int
    tensor: torch.Tensor
    base: str  # a name for it when a new initializer is needed


@dataclass
class _Plan:
    """A proven fold, not applied yet: nothing is changed before every check has passed."""

    layer: _Layer
    writes: list[_Write] = field(default_factory=list)
    beta_one: bool = False  # Gemm: the new C is the whole bias (beta=1)
    drop_bias: bool = False  # the layer's own bias went into the Add's constant
    add_after: ir.Node | None = None  # insert Add(its output, add_bias) after this node
    add_bias: torch.Tensor | None = None
    last: ir.Value | None = None  # backward: the tensor that takes over the BN's output


class _Pass:
    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self.shapes = _Shapes(model)
        self.names = {
            v.name
            for g in model.graphs()
            for v in (*g.inputs, *g.initializers.values(), *(o for n in g for o in n.outputs))
            if v.name
        }

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def fold(self, label: str, bn: ir.Node) -> Decision:
        from bnfold.fold_torch import Decision

        try:
            if bn.graph is not self.graph:
                raise _Declined(Reason.SUBGRAPH, f"{label} is inside a subgraph or a function")
            if not bn.inputs or bn.inputs[0] is None or not bn.outputs:
                raise _Declined(Reason.NO_NEIGHBOUR, "it has no input or no output")
            affine = _bn_affine(bn, self.opset, self.shapes)
            try:
                plan = self.backward(bn, affine)
            except _Declined as back:
                try:
                    plan = self.forward(bn, affine)
                except _Declined as fwd:
                    main = fwd if back.reason is Reason.NO_NEIGHBOUR else back
                    other = back if main is fwd else fwd
                    raise _Declined(main.reason, f"{main.detail}; {other.detail}") from None
        except _Declined as e:
            return Decision(label, BN_KIND, reason=e.reason, detail=e.detail)
        self.apply(bn, plan)
        for value in affine.params:
            self.release(value)
        rule = plan.layer.rule
        return Decision(
            label, BN_KIND, into=_label(plan.layer.node), direction=rule.direction, rule=rule.name
        )

    # ----------------------------------------------------------------------- matching

    def readers(self, value: ir.Value) -> list[tuple[ir.Node, int]]:
        """Who reads ``value``'s values (Shape and Size read only its shape, which folds
        keep); a graph output counts as a reader nobody can change."""
        out = [
            (u.node, u.idx)
            for u in value.uses()
            if not (u.node.op_type in _SHAPE_READERS and u.node.domain in _ONNX_DOMAINS)
        ]
        return [*out, (None, -1)] if value.is_graph_output() else out  # type: ignore[list-item]

    def only_reader(self, value: ir.Value, node: ir.Node) -> bool:
        return [n for n, _ in self.readers(value)] == [node]

    def layout(self, node: ir.Node | None) -> bool:
        return node is not None and node.op_type in _LAYOUT and node.domain in _ONNX_DOMAINS

    def rule(self, node: ir.Node, direction: Direction) -> FoldRule | None:
        return onnx_rule(node.op_type, direction) if node.domain in _ONNX_DOMAINS else None

    def backward(self, bn: ir.Node, affine: _BN) -> _Plan:
        x = bn.inputs[0]
        assert x is not None  # fold() checked
        path: list[ir.Node] = []
        node = x.producer()
        while self.layout(node) and node is not None and node.inputs[0] is not None:
            path.insert(0, node)
            node = node.inputs[0].producer()
        if node is None:
            source = path[0].inputs[0] if path else x
            where = "a graph input" if source is not None and source.is_graph_input() else "no node"
            raise _Declined(Reason.NO_NEIGHBOUR, f"input comes from {where}")
        add = None
        if node.op_type == "Add" and node.domain in _ONNX_DOMAINS:
            add, node = node, self.bias_add_layer(node)
        rule = self.rule(node, Direction.BACKWARD)
        if rule is None:
            raise _Declined(Reason.NO_NEIGHBOUR, f"input comes from {node.op_type} {_label(node)}")
        # every tensor the fold changes is read by the next node of the pattern only
        chain = [node, *([add] if add is not None else []), *path]
        for changed, reader in zip(chain, [*chain[1:], bn], strict=True):
            if not self.only_reader(changed.outputs[0], reader):
                raise _Declined(
                    Reason.PRODUCER_SHARED_OUTPUT, f"{_label(changed)}'s output has other uses"
                )
        layer = _layer(node, rule, self.shapes)
        c = affine.s.shape[0]
        if layer.channels != c:
            raise _Declined(
                Reason.CHANNEL_MISMATCH, f"{_label(node)} has {layer.channels} outputs, the BN {c}"
            )
        rank = layer.rank or len(self.shapes(node.outputs[0]) or ()) or None
        bias = layer.bias
        if add is not None:  # a constant added per output channel is the layer's bias
            k = 1 - add.inputs.index(node.outputs[0])
            const = _constant(add.inputs[k])
            assert const is not None  # bias_add_layer found it
            per = None if rank is None else _per_channel(const, rank, layer.axis, c)
            if per is None:
                raise _Declined(
                    Reason.NEEDS_SHAPES if rank is None else Reason.CHANNEL_MISMATCH,
                    f"{_label(add)}'s constant {list(const.shape)} is not one value per output "
                    "channel" + (" (the layer's rank is unknown)" if rank is None else ""),
                )
            bias = per if bias is None else bias + per
            add_shape = tuple(const.shape)
        if path or not (layer.axis == 1 or (rank == 2 and layer.axis == -1)):
            self.align((add or node).outputs[0], layer.axis, path, x, 1, node, bn)
        folded = self.fold_backward(layer, bias, affine)
        plan = _Plan(layer, [_Write(node, 1, layer.file_weight(folded.weight), _label(node))])
        tail: ir.Node | None = None  # the node whose output carries the folded values
        if add is not None:
            assert rank is not None
            shape = _channel_shape(add_shape, rank, layer.axis, c)
            plan.writes.append(_Write(add, k, folded.bias.reshape(shape), f"{_label(add)}_bias"))
            plan.drop_bias = layer.bias_input and len(node.inputs) > 2
            tail = add
        elif layer.bias_input:
            plan.writes.append(_Write(node, 2, folded.bias, f"{_label(node)}_bnfold_bias"))
            plan.beta_one = node.op_type == "Gemm"
            tail = node
        else:  # MatMul without a bias: a new Add carries the shift
            plan.add_after, plan.add_bias = node, folded.bias
        tail = path[-1] if path else tail
        plan.last = tail.outputs[0] if tail is not None else None  # None: the new Add's
        return plan

    def bias_add_layer(self, add: ir.Node) -> ir.Node:
        """The layer whose output ``add`` adds a constant to (that constant is its bias)."""
        inputs = list(add.inputs)
        consts = [_constant(v) is not None for v in inputs]
        if len(inputs) != 2 or None in inputs or consts.count(True) != 1:
            raise _Declined(Reason.NO_NEIGHBOUR, f"input comes from Add {_label(add)}")
        layer = inputs[consts.index(False)].producer()  # type: ignore[union-attr]
        if layer is None or self.rule(layer, Direction.BACKWARD) is None:
            raise _Declined(Reason.NO_NEIGHBOUR, f"input comes from Add {_label(add)}")
        return layer

    def forward(self, bn: ir.Node, affine: _BN) -> _Plan:
        value = bn.outputs[0]
        path: list[ir.Node] = []
        while True:
            readers = self.readers(value)
            where = "the BN's output" if not path else f"{_label(path[-1])}'s output"
            if len(readers) != 1:
                raise _Declined(
                    Reason.OUTPUT_SHARED if len(readers) > 1 else Reason.NO_NEIGHBOUR,
                    f"{where} has {len(readers)} uses" if readers else f"{where} is not read",
                )
            ((node, index),) = readers
            if node is None:
                raise _Declined(Reason.NO_NEIGHBOUR, f"{where} is a graph output")
            if node.graph is not bn.graph:
                raise _Declined(Reason.NO_NEIGHBOUR, f"{where} is read inside a subgraph")
            if not (self.layout(node) and index == 0):
                break
            path.append(node)
            value = node.outputs[0]
        rule = self.rule(node, Direction.FORWARD)
        if rule is None or index != 0:
            raise _Declined(Reason.NO_NEIGHBOUR, f"output goes to {node.op_type} {_label(node)}")
        if rule.zero_padding_breaks and _pads_zeros(node):
            raise _Declined(Reason.ZERO_PADDING, f"{_label(node)} pads with zeros")
        layer = _layer(node, rule, self.shapes)
        c = affine.s.shape[0]
        if layer.channels != c:
            raise _Declined(
                Reason.CHANNEL_MISMATCH,
                f"{_label(node)} reads {layer.channels} features, the BN has {c} channels",
            )
        x = bn.inputs[0]
        assert x is not None
        if path or not (layer.axis == 1 or (layer.rank == 2 and layer.axis == -1)):
            self.align(x, 1, path, value, layer.axis, node, bn)
        plan = _Plan(layer)
        op = node.op_type
        t = affine.t
        if op == "Gemm":
            t = t * _float_attr(node, "alpha", 1.0)  # y = alpha * (s x + t) B + beta C
        bias = layer.bias
        add = None
        if op == "MatMul":
            add, bias = self.matmul_bias_add(node, layer)
        folded = self.fold_forward(layer, bias, affine.s, t)
        plan.writes.append(_Write(node, 1, layer.file_weight(folded.weight), _label(node)))
        if op == "MatMul":
            if add is None:
                plan.add_after, plan.add_bias = node, folded.bias
            else:
                k = 1 - add.inputs.index(node.outputs[0])
                const = _constant(add.inputs[k])
                assert const is not None and layer.rank is not None
                shape = _channel_shape(const.shape, layer.rank, -1, folded.bias.shape[0])
                plan.writes.append(
                    _Write(add, k, folded.bias.reshape(shape), f"{_label(add)}_bias")
                )
        else:
            plan.writes.append(_Write(node, 2, folded.bias, f"{_label(node)}_bnfold_bias"))
            plan.beta_one = op == "Gemm"
        return plan

    def matmul_bias_add(self, node: ir.Node, layer: _Layer) -> tuple[ir.Node | None, Any]:
        """The Add after a MatMul that adds one constant per output feature (its bias),
        with that bias, or (None, None)."""
        out = node.outputs[0]
        readers = self.readers(out)
        if len(readers) != 1 or readers[0][0] is None or layer.rank is None:
            return None, None
        add = readers[0][0]
        if add.op_type != "Add" or add.domain not in _ONNX_DOMAINS or len(add.inputs) != 2:
            return None, None
        other = add.inputs[1 - readers[0][1]]
        const = _constant(other)
        if const is None:
            return None, None
        per = _per_channel(const, layer.rank, -1, layer.w.shape[0])
        return (add, per) if per is not None else (None, None)

    def align(
        self,
        start: ir.Value,
        axis: int,
        path: list[ir.Node],
        end: ir.Value,
        end_axis: int,
        layer: ir.Node,
        bn: ir.Node,
    ) -> None:
        ok = _aligned(self.shapes, start, axis, path, end, end_axis)
        if ok is None:
            raise _Declined(Reason.NEEDS_SHAPES, f"{_label(layer)} <-> {_label(bn)}")
        if not ok:
            raise _Declined(
                Reason.CHANNEL_MISMATCH,
                f"the BN's channels do not line up with {_label(layer)}'s"
                + (f" through {', '.join(_label(n) for n in path)}" if path else ""),
            )

    def fold_backward(self, layer: _Layer, bias: np.ndarray | None, affine: _BN) -> Any:
        from bnfold.folding import fold_backward

        b = None if bias is None else _torch(np.asarray(bias, dtype=np.float64))
        folded = fold_backward(
            layer.w, b, affine.s, affine.t, layer.rule.kind, layer.groups, dtype=layer.dtype
        )
        if folded.overflow:
            raise _Declined(Reason.OVERFLOW, f"folding overflows {_label(layer.node)}'s dtype")
        return folded

    def fold_forward(
        self, layer: _Layer, bias: np.ndarray | None, s: torch.Tensor, t: torch.Tensor
    ) -> Any:
        from bnfold.folding import fold_forward

        b = None if bias is None else _torch(np.asarray(bias, dtype=np.float64))
        folded = fold_forward(layer.w, b, s, t, layer.rule.kind, layer.groups, dtype=layer.dtype)
        if folded.overflow:
            raise _Declined(Reason.OVERFLOW, f"folding overflows {_label(layer.node)}'s dtype")
        return folded

    # ----------------------------------------------------------------------- rewriting

    def apply(self, bn: ir.Node, plan: _Plan) -> None:
        node = plan.layer.node
        for write in plan.writes:
            self.write(write)
        if plan.drop_bias:
            old = node.inputs[2]
            node.resize_inputs(2)
            if old is not None:
                self.release(old)
        if plan.beta_one and _float_attr(node, "beta", 1.0) != 1.0:
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        if plan.add_after is not None:
            assert plan.add_bias is not None
            new = self.insert_add(plan.add_after, plan.add_bias)
            plan.last = plan.last or new
        out = bn.outputs[0]
        if plan.layer.rule.direction is Direction.FORWARD:
            x = bn.inputs[0]
            assert x is not None
            out.replace_all_uses_with(x)
            self.graph.remove(bn, safe=True)
            return
        last = plan.last
        assert last is not None
        name = out.name
        out.replace_all_uses_with(last, replace_graph_outputs=True)
        self.graph.remove(bn, safe=True)
        # everything downstream, graph outputs included, keeps its names and declared types
        last.name = name
        last.type = out.type or last.type
        last.shape = out.shape or last.shape

    def write(self, write: _Write) -> None:
        """The constant input becomes ``tensor``: in place when only this node reads a
        plain initializer, else a new initializer (a shared one stays for its other
        readers; a private Constant chain is removed and its name reused)."""
        from onnx_ir.tensor_adapters import TorchTensor

        node, index = write.node, write.index
        old = node.inputs[index] if len(node.inputs) > index else None
        tensor = TorchTensor(write.tensor)
        private = old is not None and _private(old, node)
        if old is not None and private and old.is_initializer():
            tensor.name = old.name
            old.const_value = tensor
            old.shape, old.dtype = ir.Shape(tensor.shape), tensor.dtype
            return
        new = ir.Value(shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
        if len(node.inputs) <= index:
            node.resize_inputs(index + 1)
        node.replace_input_with(index, new)
        name = None
        if old is not None:
            if private:
                name = old.name
            self.release(old)
        new.name = name or self.fresh(write.base)
        tensor.name = new.name
        new.const_value = tensor
        self.graph.register_initializer(new)

    def insert_add(self, node: ir.Node, bias: torch.Tensor) -> ir.Value:
        """Put ``Add(output, bias)`` after ``node``; the Add's output takes over every
        reader and the name of ``node``'s output."""
        from onnx_ir.tensor_adapters import TorchTensor

        out = node.outputs[0]
        uses = list(out.uses())
        tensor = TorchTensor(bias, name=self.fresh(f"{_label(node)}_bnfold_bias"))
        const = ir.Value(
            name=tensor.name,
            shape=ir.Shape(tensor.shape),
            type=ir.TensorType(tensor.dtype),
            const_value=tensor,
        )
        self.graph.register_initializer(const)
        add = ir.Node("", "Add", [out, const], name=self.fresh(f"{_label(node)}_bnfold_add"))
        new = add.outputs[0]
        for use in uses:
            use.node.replace_input_with(use.idx, new)
        for i, o in enumerate(self.graph.outputs):
            if o is out:
                self.graph.outputs[i] = new
        name = out.name
        out.name = self.fresh(f"{name}_bnfold_matmul")
        new.name = name
        new.shape, new.type = out.shape, out.type
        self.graph.insert_after(node, add)
        self.shapes.note(new, out)
        return new

    def release(self, value: ir.Value) -> None:
        """Drop ``value`` if a fold left it unread: an initializer, or the Constant (and
        Identity, Cast, ...) nodes that made it."""
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            return
        if value.is_initializer():
            graph = value.graph
            if graph is not None and value.name is not None:
                graph.initializers.pop(value.name, None)
            return
        node = value.producer()
        if (
            node is None
            or node.graph is None
            or node.domain not in _ONNX_DOMAINS
            or node.op_type not in _CONSTANT_OPS | {"Constant"}
            or any(o.uses() or o.is_graph_output() for o in node.outputs)
        ):
            return
        inputs = [v for v in node.inputs if v is not None]
        node.graph.remove(node, safe=True)
        for v in inputs:
            self.release(v)


# --------------------------------------------------------------------------- entry points


def fold_model(model: ir.Model) -> list[Decision]:
    """Fold every BatchNormalization of ``model`` that folds exactly, in place; one
    decision per BatchNormalization node (subgraphs' and functions' included)."""
    return _fold_and_merge(model)[0]


def _fold_and_merge(model: ir.Model) -> tuple[list[Decision], list[MergedSite]]:
    """The pairwise folds, then the branch merges of ``merge_onnx.py`` (which need the
    branches' BNs folded first), then the pairwise folds again for the BNs a merge gave a
    layer to fold into (a BN after the sum now follows the merged Conv)."""
    from bnfold.merge_onnx import merge_branches

    with _quiet_ir():
        work = _Pass(model)
        found = batchnorm_nodes(model)
        decisions = [work.fold(label, bn) for label, bn in found]
        merges = merge_branches(work, found, decisions)
        if merges:
            for i, (label, bn) in enumerate(found):
                if not decisions[i].folded and bn.graph is work.graph:
                    again = work.fold(label, bn)
                    if again.folded:
                        decisions[i] = again
        return decisions, merges


def fold_onnx(model: onnx.ModelProto) -> OnnxFoldOutcome:
    """Fold every BatchNormalization that folds exactly; ``model`` is not modified (the fold
    works on an onnx-ir view that shares its tensors and never writes to them).  When
    nothing folds, the outcome's model is ``model`` itself: the file comes out untouched."""
    ir_model = _to_ir(model)
    decisions, merges = _fold_and_merge(ir_model)
    if not any(d.folded for d in decisions) and not merges:
        return OnnxFoldOutcome(model, decisions)
    with _quiet_ir():
        proto = ir.serde.serialize_model(ir_model)
    return OnnxFoldOutcome(proto, decisions, merges)


@dataclass(frozen=True)
class OnnxBatchNorm:
    """One BatchNormalization node as ``inspect`` reports it (parameters before folding)."""

    name: str
    channels: int  # the first axis of its statistics (or parameters); 0 when none is known
    epsilon: float
    momentum: float
    training: bool
    scale: np.ndarray | None  # float64, flattened; None when not a constant
    bias: np.ndarray | None
    mean: np.ndarray | None
    var: np.ndarray | None
    decision: Decision


def describe(model: onnx.ModelProto) -> list[OnnxBatchNorm]:
    """Every BatchNormalization node of ``model`` with its constants and fold decision."""
    ir_model = _to_ir(model)
    with _quiet_ir():
        found = batchnorm_nodes(ir_model)
        params = [_bn_params(bn) for _, bn in found]
    decisions = {d.bn: d for d in fold_model(ir_model)}
    opset = ir_model.opset_imports.get("", 1)
    out = []
    for (label, bn), arrays in zip(found, params, strict=True):
        scale, bias, mean, var = (_wide(a) for a in arrays)
        first = next(
            (a for a in (arrays[3], arrays[2], arrays[0], arrays[1]) if a is not None), None
        )
        out.append(
            OnnxBatchNorm(
                name=label,
                channels=0 if first is None else int(first.shape[0] if first.ndim else 1),
                epsilon=_float_attr(bn, "epsilon", 1e-5),
                momentum=_float_attr(bn, "momentum", 0.9),
                training=_training(bn, opset) is not None,
                scale=scale,
                bias=bias,
                mean=mean,
                var=var,
                decision=decisions[label],
            )
        )
    return out


def _wide(a: np.ndarray | None) -> np.ndarray | None:
    if a is None:
        return None
    try:
        return np.asarray(a, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return None

"""Fold BatchNormalization inside an ONNX graph (models bnfold did not export).

The same maths as ``folding.py`` (float64 inside, one rounding), applied to
initializers:

- backward into the producer of the BN's input: Conv, ConvTranspose (any ``group``),
  Gemm (``transB`` either way, ``C`` created or updated), MatMul with an optional
  ``Add`` of a constant bias, also through Reshape/Flatten/Transpose/Identity when the
  inferred shapes prove the channels line up (LeViT's MatMul -> Reshape -> BN);
- forward into the consumer of its output: Conv without zero padding, Gemm.

A fold happens only when the layer's weights are initializers that no other node
uses, and every tensor on the path has one consumer.  Node names, graph inputs and
outputs, metadata and opsets are kept: a backward fold renames the producer's output
to the BN's output, so everything downstream is untouched.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnfold.fold_torch import Decision
from bnfold.rules import Direction, Reason

__all__ = ["OnnxFoldOutcome", "fold_onnx"]

_LAYOUT = {"Reshape", "Flatten", "Transpose", "Identity", "Squeeze", "Unsqueeze"}


@dataclass
class OnnxFoldOutcome:
    model: Any  # onnx.ModelProto
    decisions: list[Decision]


class _Declined(Exception):
    def __init__(self, reason: Reason, detail: str):
        super().__init__(reason.value)
        self.reason, self.detail = reason, detail


class _Graph:
    """Indexes over one ONNX graph, kept current as folds rewrite it."""

    def __init__(self, model: Any):
        import onnx
        from onnx import numpy_helper

        self.model = model
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.arrays: dict[str, np.ndarray] = {}
        self._np = numpy_helper
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
            infos = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        except Exception:  # noqa: BLE001 - shapes are a bonus; folds that need them decline
            infos = []
        self.shapes: dict[str, list[int | None]] = {}
        for info in infos:
            t = info.type.tensor_type
            if t.HasField("shape"):
                self.shapes[info.name] = [
                    d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim
                ]
        self.reindex()

    def reindex(self) -> None:
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.uses = Counter(i for n in self.graph.node for i in n.input if i)
        for out in self.graph.output:
            self.uses[out.name] += 1
        self.graph_outputs = {o.name for o in self.graph.output}

    def array(self, name: str) -> np.ndarray | None:
        if name not in self.inits:
            return None
        if name not in self.arrays:
            self.arrays[name] = self._np.to_array(self.inits[name])
        return self.arrays[name]

    def set_array(self, name: str, value: np.ndarray) -> None:
        new = self._np.from_array(value, name)
        if name in self.inits:
            self.inits[name].CopyFrom(new)
        else:
            self.graph.initializer.append(new)
            self.inits[name] = self.graph.initializer[-1]
        self.arrays[name] = value

    def fresh_name(self, base: str) -> str:
        taken = set(self.inits) | set(self.producer) | {i.name for i in self.graph.input}
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        return name

    def consumers(self, name: str) -> list[Any]:
        return [n for n in self.graph.node if name in n.input]


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _set_attr(node: Any, name: str, value: Any) -> None:
    from onnx import helper

    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def fold_onnx(model: Any) -> OnnxFoldOutcome:
    """Fold every BatchNormalization that folds exactly; ``model`` itself is not modified."""
    model = copy.deepcopy(model)
    g = _Graph(model)
    decisions: list[Decision] = []
    for bn in list(g.graph.node):
        if bn.op_type != "BatchNormalization":
            continue
        name = bn.name or bn.output[0]
        try:
            s, t = _affine(g, bn)
            try:
                into, direction, rule = _backward(g, bn, s, t)
            except _Declined as back:
                try:
                    into, direction, rule = _forward(g, bn, s, t)
                except _Declined as fwd:
                    main = fwd if back.reason is Reason.NO_NEIGHBOUR else back
                    other = back if main is fwd else fwd
                    raise _Declined(main.reason, f"{main.detail}; {other.detail}") from None
        except _Declined as e:
            decisions.append(
                Decision(name, "ONNX BatchNormalization", reason=e.reason, detail=e.detail)
            )
            continue
        _drop_node(g, bn)
        decisions.append(
            Decision(name, "ONNX BatchNormalization", into=into, direction=direction, rule=rule)
        )
    _drop_unused_initializers(g)
    return OnnxFoldOutcome(model, decisions)


def _affine(g: _Graph, bn: Any) -> tuple[np.ndarray, np.ndarray]:
    attrs = _attrs(bn)
    if attrs.get("training_mode", 0) or len([o for o in bn.output if o]) > 1:
        raise _Declined(Reason.TRAIN_MODE, "training_mode=1 (batch statistics)")
    arrays = [g.array(i) for i in bn.input[1:5]]
    if any(a is None for a in arrays):
        raise _Declined(Reason.NOT_CONSTANT, "scale, bias, mean or var is not an initializer")
    scale, bias, mean, var = (a.astype(np.float64) for a in arrays)  # type: ignore[union-attr]
    if not all(np.isfinite(a).all() for a in (scale, bias, mean, var)):
        raise _Declined(Reason.NONFINITE_STATS, "NaN/Inf in the BN's initializers")
    s = scale / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
    return s, bias - mean * s


def _single_use(g: _Graph, name: str) -> bool:
    return g.uses[name] == 1 and name not in g.graph_outputs


def _weights_private(g: _Graph, node: Any, indices: tuple[int, ...]) -> None:
    """Weights (index 1) must be initializers only this node uses; a shared bias
    (exporters deduplicate identical ones, e.g. zeros) gets a private copy instead."""
    for i in indices:
        if i < len(node.input) and node.input[i]:
            if node.input[i] not in g.inits:
                raise _Declined(Reason.NOT_CONSTANT, f"{node.name}'s input {i} is not constant")
            if g.uses[node.input[i]] != 1 and i == 1:
                raise _Declined(Reason.SHARED_WEIGHTS, f"{node.input[i]} is shared")
    for i in indices:
        if i != 1 and i < len(node.input) and node.input[i] and g.uses[node.input[i]] != 1:
            array = g.array(node.input[i])
            assert array is not None
            name = g.fresh_name(f"{node.name or node.output[0]}_bias")
            g.set_array(name, array.copy())
            node.input[i] = name
            g.reindex()


def _law_ok(
    g: _Graph, start: str, start_axis: int, path: list[Any], end: str, end_axis: int
) -> bool:
    """Whether channel ``start_axis`` of tensor ``start`` lands on ``end_axis`` of ``end``."""
    src = g.shapes.get(start)
    dst = g.shapes.get(end)
    if src is None or dst is None:
        return False
    axis = start_axis % len(src)
    tail = src[axis + 1 :]
    if src[axis] is None or any(d is None for d in tail):
        return False
    channels: int = src[axis]  # type: ignore[assignment]  # checked not None above
    inner: int = math.prod(tail)  # type: ignore[arg-type]
    for node in path:
        if node.op_type == "Transpose":
            shape = g.shapes.get(node.input[0])
            if shape is None:
                return False
            at = _axis_of(shape, channels, inner)
            if at is None:
                return False
            perm = _attrs(node).get("perm", list(range(len(shape)))[::-1])
            out = g.shapes.get(node.output[0])
            if out is None:
                return False
            new_at = list(perm).index(at)
            rest = out[new_at + 1 :]
            if any(d is None for d in rest):
                return False
            inner = math.prod(rest)  # type: ignore[arg-type]
    return _axis_of(dst, channels, inner) == end_axis % len(dst)


def _axis_of(shape: list[int | None], channels: int, inner: int) -> int | None:
    for axis in range(len(shape)):
        rest = shape[axis + 1 :]
        if (
            shape[axis] == channels
            and all(d is not None for d in rest)
            and math.prod(
                rest  # type: ignore[arg-type]
            )
            == inner
        ):
            return axis
    return None


def _backward(g: _Graph, bn: Any, s: np.ndarray, t: np.ndarray) -> tuple[str, Direction, str]:
    x = bn.input[0]
    path: list[Any] = []
    node = g.producer.get(x)
    while node is not None and node.op_type in _LAYOUT:
        if not _single_use(g, node.output[0]):
            raise _Declined(Reason.PRODUCER_SHARED_OUTPUT, f"{node.name} has other consumers")
        path.insert(0, node)
        node = g.producer.get(node.input[0])
    if node is None:
        raise _Declined(Reason.NO_NEIGHBOUR, "input comes from a graph input")
    out = node.output[0]
    if not _single_use(g, out):
        raise _Declined(Reason.PRODUCER_SHARED_OUTPUT, f"{node.name}'s output has other uses")
    op = node.op_type
    c = s.shape[0]
    into = node.name or node.output[0]
    if op in ("Conv", "ConvTranspose"):
        if path and not _law_ok(g, out, 1, path, x, 1):
            raise _Declined(Reason.CHANNEL_MISMATCH, f"channels do not survive {path[0].name}")
        _weights_private(g, node, (1, 2))
        w = g.array(node.input[1])
        assert w is not None
        groups = int(_attrs(node).get("group", 1))
        out_ch = w.shape[0] if op == "Conv" else w.shape[1] * groups
        if out_ch != c:
            raise _Declined(Reason.CHANNEL_MISMATCH, f"{node.name} has {out_ch} outputs, BN {c}")
        if op == "Conv":
            new_w = w.astype(np.float64) * s.reshape(-1, *[1] * (w.ndim - 1))
        else:
            grouped = w.astype(np.float64).reshape(
                groups, w.shape[0] // groups, w.shape[1], *w.shape[2:]
            )
            new_w = (grouped * s.reshape(groups, 1, w.shape[1], *[1] * (w.ndim - 2))).reshape(
                w.shape
            )
        _write_bias(g, node, 2, s, t, w.dtype)
        g.set_array(node.input[1], new_w.astype(w.dtype))
        rule = "conv_bn" if op == "Conv" else "convtranspose_bn"
    elif op == "Gemm":
        if not _law_ok(g, out, 1, path, x, 1):
            raise _Declined(
                Reason.NEEDS_SHAPES if out not in g.shapes else Reason.CHANNEL_MISMATCH,
                f"{node.name} -> {bn.name}",
            )
        _weights_private(g, node, (1, 2))
        attrs = _attrs(node)
        w = g.array(node.input[1])
        assert w is not None
        trans_b = int(attrs.get("transB", 0))
        if (w.shape[0] if trans_b else w.shape[1]) != c:
            raise _Declined(Reason.CHANNEL_MISMATCH, f"{node.name} does not output {c} features")
        new_w = w.astype(np.float64) * (s.reshape(-1, 1) if trans_b else s.reshape(1, -1))
        beta = float(attrs.get("beta", 1.0))
        if len(node.input) > 2 and node.input[2] and beta != 0.0:
            bias = g.array(node.input[2])
            assert bias is not None
            if bias.size not in (1, c) or bias.ndim > 2:
                raise _Declined(Reason.CHANNEL_MISMATCH, f"{node.name}'s C is not per feature")
            new_c = np.broadcast_to(bias.astype(np.float64).reshape(-1), (c,)) * s + t / beta
            g.set_array(node.input[2], new_c.astype(bias.dtype))
        else:
            _set_attr(node, "beta", 1.0)
            name = g.fresh_name(f"{node.name or node.output[0]}_bnfold_C")
            g.set_array(name, t.astype(w.dtype))
            _set_input(node, 2, name)
        g.set_array(node.input[1], new_w.astype(w.dtype))
        rule = "linear_bn"
    elif op in ("MatMul", "Add"):
        rule, matmul, tail = _backward_matmul(g, node, path, x, s, t)
        into = matmul.name or matmul.output[0]
        if not path:
            node = tail  # a new Add may now end the chain
    else:
        raise _Declined(Reason.NO_NEIGHBOUR, f"input comes from {op} {node.name}")
    # the last node before the BN now produces the BN's output tensor
    last = path[-1] if path else node
    last.output[0] = bn.output[0]
    return into, Direction.BACKWARD, rule


def _backward_matmul(
    g: _Graph, node: Any, path: list[Any], x: str, s: np.ndarray, t: np.ndarray
) -> tuple[str, Any, Any]:
    """Fold into MatMul (+ Add); returns the rule, the MatMul and the node ending the layer."""
    add = None
    if node.op_type == "Add":
        add = node
        const = [i for i in node.input if i in g.inits]
        other = [i for i in node.input if i not in g.inits]
        if len(const) != 1 or len(other) != 1:
            raise _Declined(Reason.NO_NEIGHBOUR, f"input comes from Add {node.name}")
        node = g.producer.get(other[0])
        if node is None or node.op_type != "MatMul" or not _single_use(g, node.output[0]):
            raise _Declined(Reason.NO_NEIGHBOUR, f"input comes from Add {add.name}")
    w = g.array(node.input[1])
    if w is None or w.ndim != 2:
        raise _Declined(Reason.NOT_CONSTANT, f"{node.name}'s weight is not a 2-D initializer")
    if not _law_ok(g, (add or node).output[0], -1, path, x, 1):
        raise _Declined(
            Reason.NEEDS_SHAPES
            if (add or node).output[0] not in g.shapes
            else Reason.CHANNEL_MISMATCH,
            f"{node.name} -> BN",
        )
    _weights_private(g, node, (1,))
    c = s.shape[0]
    if w.shape[1] != c:
        raise _Declined(Reason.CHANNEL_MISMATCH, f"{node.name} does not output {c} features")
    if add is not None:
        bias_name = next(i for i in add.input if i in g.inits)
        if g.uses[bias_name] != 1:
            raise _Declined(Reason.SHARED_WEIGHTS, f"{bias_name} is shared")
        bias = g.array(bias_name)
        assert bias is not None
        if bias.size not in (1, c):
            raise _Declined(Reason.CHANNEL_MISMATCH, f"{add.name}'s bias is not per feature")
        new_b = np.broadcast_to(bias.astype(np.float64).reshape(-1), (c,)) * s + t
        g.set_array(
            bias_name, new_b.reshape(bias.shape if bias.size == c else (c,)).astype(bias.dtype)
        )
    else:  # a new Add carries the shift
        from onnx import helper

        bias_name = g.fresh_name(f"{node.name or node.output[0]}_bnfold_bias")
        g.set_array(bias_name, t.astype(w.dtype))
        mid = g.fresh_name(f"{node.output[0]}_bnfold_mm")
        add_node = helper.make_node(
            "Add", [mid, bias_name], [node.output[0]], name=g.fresh_name(f"{node.name}_bnfold_add")
        )
        node.output[0] = mid
        index = next(i for i, n in enumerate(g.graph.node) if n is node or n == node)
        g.graph.node.insert(index + 1, add_node)
        g.reindex()
        add = g.graph.node[index + 1]
    g.set_array(node.input[1], (w.astype(np.float64) * s.reshape(1, -1)).astype(w.dtype))
    return "linear_bn", node, add


def _forward(g: _Graph, bn: Any, s: np.ndarray, t: np.ndarray) -> tuple[str, Direction, str]:
    y = bn.output[0]
    if not _single_use(g, y):
        raise _Declined(
            Reason.OUTPUT_SHARED if g.uses[y] > 1 else Reason.NO_NEIGHBOUR,
            "the BN's output has several uses" if g.uses[y] > 1 else "its output is a graph output",
        )
    (consumer,) = g.consumers(y)
    if consumer.input[0] != y:
        raise _Declined(Reason.NO_NEIGHBOUR, f"output goes to {consumer.op_type} {consumer.name}")
    op = consumer.op_type
    attrs = _attrs(consumer)
    if op == "Conv":
        pads = attrs.get("pads", [])
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if any(pads) or auto in ("SAME_UPPER", "SAME_LOWER"):
            raise _Declined(Reason.ZERO_PADDING, f"{consumer.name} pads with zeros")
        _weights_private(g, consumer, (1, 2))
        w = g.array(consumer.input[1])
        assert w is not None
        groups = int(attrs.get("group", 1))
        c_out, c_in_g = w.shape[0], w.shape[1]
        if c_in_g * groups != s.shape[0]:
            raise _Declined(Reason.CHANNEL_MISMATCH, f"{consumer.name} input channels differ")
        w64 = w.astype(np.float64).reshape(groups, c_out // groups, c_in_g, -1)
        new_w = (w64 * s.reshape(groups, 1, c_in_g, 1)).reshape(w.shape)
        shift = np.einsum("goik,gi->go", w64, t.reshape(groups, c_in_g)).reshape(c_out)
        _add_to_bias(g, consumer, 2, shift, w.dtype)
        g.set_array(consumer.input[1], new_w.astype(w.dtype))
        rule = "bn_conv"
    elif op == "Gemm" and not attrs.get("transA", 0):
        shape = g.shapes.get(bn.input[0])
        if shape is None or len(shape) != 2:
            raise _Declined(Reason.NEEDS_SHAPES, f"{bn.name} -> {consumer.name}")
        _weights_private(g, consumer, (1, 2))
        w = g.array(consumer.input[1])
        assert w is not None
        trans_b = int(attrs.get("transB", 0))
        w_oi = w.T if not trans_b else w  # (out, in)
        if w_oi.shape[1] != s.shape[0]:
            raise _Declined(Reason.CHANNEL_MISMATCH, f"{consumer.name} input features differ")
        new_oi = w_oi.astype(np.float64) * s.reshape(1, -1)
        alpha = float(attrs.get("alpha", 1.0))
        shift = alpha * (w_oi.astype(np.float64) @ t)
        beta = float(attrs.get("beta", 1.0))
        if beta == 0.0:
            raise _Declined(Reason.NO_NEIGHBOUR, f"{consumer.name} has beta=0")
        _add_to_bias(g, consumer, 2, shift / beta, w.dtype)
        g.set_array(consumer.input[1], (new_oi if trans_b else new_oi.T).astype(w.dtype))
        rule = "bn_linear"
    else:
        raise _Declined(Reason.NO_NEIGHBOUR, f"output goes to {op} {consumer.name}")
    consumer.input[0] = bn.input[0]
    return consumer.name or consumer.output[0], Direction.FORWARD, rule


def _set_input(node: Any, index: int, name: str) -> None:
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = name


def _write_bias(g: _Graph, node: Any, index: int, s: np.ndarray, t: np.ndarray, dtype: Any) -> None:
    """b' = b * s + t for a backward fold (b created when the layer had none)."""
    if index < len(node.input) and node.input[index]:
        b = g.array(node.input[index])
        assert b is not None
        g.set_array(node.input[index], (b.astype(np.float64) * s + t).astype(b.dtype))
    else:
        name = g.fresh_name(f"{node.name or node.output[0]}_bnfold_bias")
        g.set_array(name, t.astype(dtype))
        _set_input(node, index, name)


def _add_to_bias(g: _Graph, node: Any, index: int, shift: np.ndarray, dtype: Any) -> None:
    if index < len(node.input) and node.input[index]:
        b = g.array(node.input[index])
        assert b is not None
        if b.size != shift.size:
            raise _Declined(Reason.CHANNEL_MISMATCH, f"{node.name}'s bias is not per output")
        g.set_array(
            node.input[index],
            (b.astype(np.float64).reshape(-1) + shift).reshape(b.shape).astype(b.dtype),
        )
    else:
        name = g.fresh_name(f"{node.name or node.output[0]}_bnfold_bias")
        g.set_array(name, shift.astype(dtype))
        _set_input(node, index, name)


def _drop_node(g: _Graph, node: Any) -> None:
    g.graph.node.remove(node)
    g.reindex()


def _drop_unused_initializers(g: _Graph) -> None:
    used = {i for n in g.graph.node for i in n.input} | {o.name for o in g.graph.output}
    keep = [t for t in g.graph.initializer if t.name in used]
    if len(keep) != len(g.graph.initializer):
        del g.graph.initializer[:]
        g.graph.initializer.extend(keep)

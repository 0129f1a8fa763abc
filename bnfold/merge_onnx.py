"""Merge parallel branches summed by ``Add``/``Sum`` into one Conv, in an ONNX graph (issue 18).

Re-parameterizable blocks (RepVGG, MobileOne, RepConv) compute
``BN_a(conv_kxk(x)) + BN_b(conv_1x1(x)) + BN_c(x)``.  Once the pairwise folds of
``onnx_fold.py`` have put ``BN_a`` and ``BN_b`` into their convs, what is left is parallel
Convs reading one ``x``, an identity branch (a BatchNormalization of ``x``, or ``x``
itself) and a tree of ``Add`` (or ``Sum``) nodes.  ``rules.MERGE`` names the pattern and
``folding.merge_parallel`` is the maths (float64 inside, rounded once)::

    sum_i conv(x, W_i, b_i) + sum_j (s_j * x + t_j) = conv(x, W, b)

The tree may also hold ``Sub`` (its second operand counts negatively) and ``Mul`` by a
constant of one value per channel (FastViT's RepMixer, ``x + gamma * (mixer(x) -
norm(x))``): each branch then has a coefficient per output channel, which scales its
weight, bias and identity affine in float64 before the merge.  A constant summed in (one
value per channel; MobileOne's legacy export adds ``Constant(0)``) goes into the bias.

The Conv with the largest kernel is kept and given ``W``, ``b`` and the merged padding;
the other branch Convs, the identity BatchNormalization nodes and the sum nodes go, and the
kept Conv's output takes the name of the sum's output.  Summands that are not branches of
``x`` but are added once (``r + conv_a(x) + conv_b(x) + bn(x)``) stay, in one ``Add`` (or
``Sum``) with the merged Conv in the sum's place.  A sum that does not merge is tried again
one level down (``(conv_a(x) + conv_b(x) + bn(x)) - r`` merges the inner sum).

A merge is made only when it is proven exact; otherwise every identity BatchNormalization
on the sum stays, with the ``merge_*`` reason of the first condition that fails:

- every branch reads the same tensor (``merge_inputs_differ``);
- a branch's output is read by the sum only (``merge_branch_shared``; uses in subgraphs
  count, as in the pairwise folds);
- no sum broadcasts: the operand shapes onnx knows agree (``merge_geometry``; where
  shapes are unknown the checks below prove them equal: one ``x``, one stride, one
  centre, one channel count);
- the Convs share rank, strides, output channels and, on every axis where a kernel is
  wider than 1, dilation (``merge_geometry``), and ``group`` (``merge_groups``);
- padding keeps the kernel centres aligned: per axis, ``2 * pad - dilation * (k - 1)``
  is the same for every branch at the start and at the end, and every kernel centres in
  the largest (``merge_padding``).  ``auto_pad`` ``SAME_*`` is turned into the pads it
  means (from the input's size when a stride is not 1: ``merge_padding_mode`` when that
  size is unknown);
- an identity branch is a 1-kernel with stride 1 and no padding: it needs every stride 1
  (``merge_geometry``), offset 0 and odd kernels (``merge_padding``), and
  ``C_in == C_out`` (``merge_groups``); its BatchNormalization must be a plain one
  (the checks of the pairwise folds);
- weights and biases are constants (``not_constant``), floating point of one dtype
  (``unsupported_layer``).  The merge writes new tensors, so a weight that other nodes
  read too stays for them unchanged.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from bnfold.onnx_fold import (
    _ONNX_DOMAINS,
    BN_KIND,
    _bn_affine,
    _constant,
    _Declined,
    _floating,
    _ints_attr,
    _label,
    _Pass,
    _per_channel,
    _torch,
    _torch_dtype,
    _Write,
)
from bnfold.reports import MergedSite
from bnfold.rules import MERGE, Reason

if TYPE_CHECKING:
    import torch

    from bnfold.fold_torch import Decision

__all__ = ["merge_branches"]

# an identity BN keeps the reason of the pairwise pass unless it only said "no layer
# next to it": then the merge's reason says more
_NEIGHBOUR_REASONS = frozenset(
    {Reason.NO_NEIGHBOUR, Reason.PRODUCER_SHARED_OUTPUT, Reason.OUTPUT_SHARED}
)
# a sum that does not merge is tried again without its root: a smaller sum's reason is the
# more precise one
_MERGE_REASONS = frozenset(r for r in Reason if r.value.startswith("merge_"))


# a leaf's coefficient in the sum: a sign (``Sub``) and the constants that scale it (``Mul``)
_Coef = tuple[int, tuple[tuple[ir.Value, np.ndarray], ...]]


@dataclass
class _Tree:
    """A sum of several values: the sum nodes (root first) and the summed values (leaves,
    with repeats when a value is summed twice), each with its coefficient."""

    root: ir.Node
    nodes: list[ir.Node]
    leaves: list[ir.Value]
    coefs: list[_Coef]


@dataclass
class _Conv:
    """A conv branch: its constants and its geometry with explicit pads."""

    node: ir.Node
    w: np.ndarray
    b: np.ndarray | None
    group: int
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    begin: tuple[int, ...]
    end: tuple[int, ...]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.w.shape[2:])


@dataclass
class _Merged:
    """A proven merge, not applied yet."""

    keep: ir.Node
    convs: list[_Conv]
    bns: list[ir.Node]  # identity BatchNormalization nodes
    skips: int  # plain identity branches (``x`` itself)
    x: ir.Value
    weight: torch.Tensor
    bias: torch.Tensor
    pads: list[int]
    dilations: list[int]
    kernel: list[int]


def _is_sum(node: ir.Node | None) -> bool:
    """A node of a sum tree: ``Add``/``Sum`` (``rules.MERGE``), and the two linear operations
    that keep a sum of branches a sum of branches: ``Sub`` (a negative coefficient) and
    ``Mul`` by a constant (a coefficient per channel, checked in the plan; FastViT's
    RepMixer computes ``x + gamma * (mixer(x) - norm(x))``)."""
    if node is None or node.domain not in _ONNX_DOMAINS or not node.inputs:
        return False
    if any(v is None for v in node.inputs):
        return False
    op, n = node.op_type, len(node.inputs)
    if op in MERGE.sum.onnx_ops:
        return op != "Add" or n == 2
    if op == "Sub":
        return n == 2
    if op == "Mul" and n == 2:
        consts = [_constant(v) for v in node.inputs]
        return [c is not None and _floating(c) for c in consts].count(True) == 1
    return False


def _operands(node: ir.Node, coef: _Coef) -> list[tuple[ir.Value, _Coef]]:
    """The values a sum-tree node combines, each with its coefficient."""
    sign, scales = coef
    inputs: list[ir.Value] = list(node.inputs)  # type: ignore[arg-type]  # _is_sum: no None
    if node.op_type == "Sub":
        return [(inputs[0], coef), (inputs[1], (-sign, scales))]
    if node.op_type == "Mul":
        k = 0 if _constant(inputs[0]) is not None else 1
        const = _constant(inputs[k])
        assert const is not None  # _is_sum checked
        return [(inputs[1 - k], (sign, (*scales, (inputs[k], const))))]
    return [(v, coef) for v in inputs]


def _is(node: ir.Node | None, op: str) -> bool:
    return node is not None and node.op_type == op and node.domain in _ONNX_DOMAINS


def _absorbed(node: ir.Node) -> bool:
    """Whether ``node``'s output is summed by one other sum node only (it is part of that
    node's tree, not a root)."""
    out = node.outputs[0]
    readers = {id(u.node): u.node for u in out.uses()}
    if out.is_graph_output() or len(readers) != 1:
        return False
    (reader,) = readers.values()
    return _is_sum(reader) and reader.graph is node.graph


def _reads(value: ir.Value, x: ir.Value) -> bool:
    """Whether ``value`` is a branch of ``x``: ``x`` itself, a Conv or BatchNormalization of
    it, or a constant (a bias)."""
    producer = value.producer()
    return (
        value is x
        or _constant(value) is not None
        or (
            (_is(producer, "Conv") or _is(producer, "BatchNormalization"))
            and producer is not None
            and bool(producer.inputs)
            and producer.inputs[0] is x
        )
    )


def _tree(root: ir.Node) -> _Tree:
    tree = _Tree(root, [root], [], [])
    stack = list(reversed(_operands(root, (1, ()))))
    while stack:
        value, coef = stack.pop()
        producer = value.producer()
        if producer is not None and _is_sum(producer) and _absorbed(producer):
            if producer not in tree.nodes:
                tree.nodes.append(producer)
            stack.extend(reversed(_operands(producer, coef)))
        else:
            tree.leaves.append(value)
            tree.coefs.append(coef)
    return tree


# --------------------------------------------------------------------------- the pass


class _Merger:
    def __init__(self, work: _Pass, found: list[tuple[str, ir.Node]], decisions: list[Decision]):
        self.work = work
        self.graph = work.graph
        self.decisions = decisions
        self.index = {id(bn): i for i, (_, bn) in enumerate(found)}
        self.pairwise = [d.detail for d in decisions]  # why the pairwise pass kept each BN
        self.merges: list[MergedSite] = []

    def run(self) -> list[MergedSite]:
        for node in list(self.graph):
            if node.graph is self.graph and _is_sum(node) and not _absorbed(node):
                self.attempt(node)
        return self.merges

    def attempt(self, root: ir.Node) -> None:
        """Merge the sum at ``root``; when it does not merge, the sums it is made of, one
        level down at a time (``(conv_a(x) + conv_b(x) + bn(x)) + r`` merges the inner sum
        and keeps the outer ``Add``)."""
        todo = [root]
        while todo:
            node = todo.pop()
            if node.graph is not self.graph:
                continue  # merged away by an earlier sum
            tree = _tree(node)
            convs = [v for v in tree.leaves if _is(v.producer(), "Conv")]
            if len([v for v in tree.leaves if _constant(v) is None]) < 2 or not convs:
                continue  # one branch plus constants is a bias, not a merge
            x, main, identity_bns = self.branch_input(tree)
            rest: list[int] = []  # leaves that do not read x, summed after the merged conv
            try:
                if x is None:
                    x, rest = self.split(tree, main)
                merged = self.plan(tree, x, rest)
            except _Declined as e:
                self.declined(tree, identity_bns, e)
                inner = {id(n) for n in tree.nodes[1:]}
                children = [v.producer() for v in node.inputs if v is not None]
                todo += reversed([c for c in children if c is not None and id(c) in inner])
                continue
            self.apply(tree, merged, [tree.leaves[i] for i in rest])
            others = [v.producer() for v in (tree.leaves[i] for i in rest)]
            stayed = [n for n in others if _is(n, "BatchNormalization") and n is not None]
            detail = f"it reads another tensor than the branches merged into {_label(merged.keep)}"
            self.declined(tree, stayed, _Declined(Reason.MERGE_INPUTS, detail))

    def split(self, tree: _Tree, main: ir.Value | None) -> tuple[ir.Value, list[int]]:
        """When not every branch reads one tensor: ``main``, the tensor most branches read,
        and the leaves that do not read it, if the merge can leave those in a plain sum
        (each added once, neither subtracted nor scaled) and still merges two branches."""
        declined = _Declined(
            Reason.MERGE_INPUTS,
            f"the values summed by {_label(tree.root)} are not all read from one tensor",
        )
        if main is None:
            raise declined
        rest = [i for i, v in enumerate(tree.leaves) if not _reads(v, main)]
        kept = [v for i, v in enumerate(tree.leaves) if i not in rest]
        plain = all(tree.coefs[i] == (1, ()) for i in rest)
        convs = [v for v in kept if _is(v.producer(), "Conv")]
        if not plain or not convs or len([v for v in kept if _constant(v) is None]) < 2:
            raise declined
        return main, rest

    def branch_input(self, tree: _Tree) -> tuple[ir.Value | None, ir.Value | None, list[ir.Node]]:
        """The tensor every branch reads (None if there is none), the tensor most branches
        read, and the identity BatchNormalization nodes: those reading that one (and, when
        the branches read different tensors, any BN next to no other layer)."""
        candidates: list[ir.Value] = []
        for value in tree.leaves:
            producer = value.producer()
            if _is(producer, "Conv") or _is(producer, "BatchNormalization"):
                assert producer is not None
                if producer.inputs and producer.inputs[0] is not None:
                    candidates.append(producer.inputs[0])

        counts = Counter(id(c) for c in candidates)
        by_id = {id(c): c for c in candidates}
        ranked = sorted(by_id.values(), key=lambda c: -counts[id(c)])
        x = next((c for c in ranked if all(_reads(v, c) for v in tree.leaves)), None)
        main = x if x is not None else (ranked[0] if ranked else None)
        bns = []
        for value in tree.leaves:
            producer = value.producer()
            if (
                _is(producer, "BatchNormalization")
                and producer is not None
                and producer not in bns
                and (producer.inputs[0] is main or (x is None and self.only_neighbour(producer)))
            ):
                bns.append(producer)
        return x, main, bns

    def only_neighbour(self, bn: ir.Node) -> bool:
        i = self.index.get(id(bn))
        reasons = _MERGE_REASONS | {Reason.NO_NEIGHBOUR}
        return i is not None and self.decisions[i].reason in reasons

    def declined(self, tree: _Tree, bns: list[ir.Node], e: _Declined) -> None:
        for bn in bns:
            i = self.index.get(id(bn))
            if i is None:
                continue
            old = self.decisions[i]
            if old.reason not in _NEIGHBOUR_REASONS | _MERGE_REASONS:
                continue  # a reason of its own (training mode, not constant, ...) says more
            where = "" if _label(tree.root) in e.detail else f" (the sum {_label(tree.root)})"
            self.decisions[i] = replace(
                old, reason=e.reason, detail=f"{e.detail}{where}; {self.pairwise[i]}"
            )

    # ----------------------------------------------------------------------- checks

    def plan(self, tree: _Tree, x: ir.Value, rest: list[int]) -> _Merged:
        in_tree = {id(n) for n in tree.nodes}
        conv_nodes: list[tuple[ir.Node, _Coef]] = []
        bns: list[tuple[ir.Node, _Coef]] = []
        skips: list[_Coef] = []
        consts: list[tuple[ir.Value, np.ndarray, _Coef]] = []  # constants summed in: a bias
        for i, (value, coef) in enumerate(zip(tree.leaves, tree.coefs, strict=True)):
            producer = value.producer()
            if i in rest:
                continue
            if value is x:
                skips.append(coef)
                continue
            const = _constant(value)
            if const is not None:
                consts.append((value, const, coef))
                continue
            assert producer is not None  # branch_input found it reading x
            if value.is_graph_output() or any(id(u.node) not in in_tree for u in value.uses()):
                raise _Declined(
                    Reason.MERGE_BRANCH_SHARED,
                    f"{_label(producer)}'s output is also used outside the sum",
                )
            (conv_nodes if producer.op_type == "Conv" else bns).append((producer, coef))
        self.check_shapes(tree)
        convs = [self.conv(node, x) for node, _ in conv_nodes]
        first = convs[0]
        rank = first.w.ndim
        c_out, c_in_g, group = first.w.shape[0], first.w.shape[1], first.group
        for conv in convs[1:]:
            label = _label(conv.node)
            if conv.w.ndim != rank or conv.w.shape[0] != c_out:
                raise _Declined(
                    Reason.MERGE_GEOMETRY,
                    f"{label}'s weight is {list(conv.w.shape)}, {_label(first.node)}'s "
                    f"{list(first.w.shape)}",
                )
            if conv.strides != first.strides:
                raise _Declined(
                    Reason.MERGE_GEOMETRY,
                    f"{label} has strides {list(conv.strides)}, {_label(first.node)} "
                    f"{list(first.strides)}",
                )
            if conv.group != group or conv.w.shape[1] != c_in_g:
                raise _Declined(
                    Reason.MERGE_GROUPS,
                    f"{label} has group {conv.group} and {conv.w.shape[1]} input channels per "
                    f"group, {_label(first.node)} {group} and {c_in_g}",
                )
        dims = rank - 2
        branches = [(c.kernel, c.dilations, c.begin, c.end, _label(c.node)) for c in convs]
        if bns or skips:
            if any(s != 1 for s in first.strides):
                raise _Declined(
                    Reason.MERGE_GEOMETRY,
                    f"an identity branch meets {_label(first.node)}, which has strides "
                    f"{list(first.strides)}",
                )
            if c_in_g * group != c_out:
                raise _Declined(
                    Reason.MERGE_GROUPS,
                    f"an identity branch needs as many input as output channels; "
                    f"{_label(first.node)} reads {c_in_g * group} and writes {c_out}",
                )
            ones, zeros = (1,) * dims, (0,) * dims
            branches.append((ones, ones, zeros, zeros, "the identity branch"))
        kernel, dilations, pads = _centred(branches)
        dtypes = {str(c.w.dtype) for c in convs}
        if len(dtypes) != 1:
            raise _Declined(Reason.UNSUPPORTED_LAYER, f"conv weights of dtypes {sorted(dtypes)}")
        import torch

        def per_channel(value: ir.Value, const: np.ndarray, what: str) -> np.ndarray:
            per = _per_channel(const, rank, 1, c_out) if _floating(const) else None
            if per is None:
                raise _Declined(
                    Reason.MERGE_GEOMETRY,
                    f"the sum {what} {value.name}, a constant of shape {list(const.shape)} "
                    "that is not one value per output channel",
                )
            return per

        def factor(coef: _Coef) -> np.ndarray:
            sign, scales = coef
            out = np.full(c_out, float(sign))
            for value, const in scales:
                out = out * per_channel(value, const, "scales a branch by")
            return out

        identities = []
        for bn, coef in bns:
            affine = _bn_affine(bn, self.work.opset, self.work.shapes)
            if affine.s.shape[0] != c_out:
                raise _Declined(
                    Reason.MERGE_GROUPS,
                    f"{_label(bn)} has {affine.s.shape[0]} channels, the convs {c_out}",
                )
            a = torch.from_numpy(factor(coef))
            identities.append((a * affine.s, a * affine.t))
        for coef in skips:
            a = torch.from_numpy(factor(coef))
            identities.append((a, torch.zeros_like(a)))
        shift = np.zeros(c_out)
        for value, const, coef in consts:
            shift += factor(coef) * per_channel(value, const, "adds")
        factors = [factor(coef) for _, coef in conv_nodes]
        folded = self.merge(convs, factors, identities, group, shift if consts else None)
        keep = next((c.node for c in convs if list(c.kernel) == kernel), first.node)
        return _Merged(
            keep,
            convs,
            [bn for bn, _ in bns],
            len(skips),
            x,
            folded.weight,
            folded.bias,
            pads,
            dilations,
            kernel,
        )

    def check_shapes(self, tree: _Tree) -> None:
        """No sum broadcasts: operand shapes that onnx knows agree, axis by axis."""
        for node in tree.nodes:
            # constants summed in are checked to be one value per channel (plan)
            values = [
                v for v in (*node.inputs, node.outputs[0]) if v is not None and _constant(v) is None
            ]
            shapes = [self.work.shapes(v) for v in values]
            known = [s for s in shapes if s is not None]
            if len({len(s) for s in known}) > 1 or any(
                len({s[a] for s in known if s[a] is not None}) > 1
                for a in range(len(known[0]) if known else 0)
            ):
                shown = ", ".join("?" if s is None else str(list(s)) for s in shapes[:-1])
                raise _Declined(
                    Reason.MERGE_GEOMETRY,
                    f"{_label(node)} broadcasts: operands of shapes {shown}",
                )

    def conv(self, node: ir.Node, x: ir.Value) -> _Conv:
        label = _label(node)
        value = node.inputs[1] if len(node.inputs) > 1 else None
        w = _constant(value)
        if value is None or w is None:
            raise _Declined(Reason.NOT_CONSTANT, f"{label}'s weight is not a constant")
        if not _floating(w) or w.dtype.name not in ("float16", "float32", "float64", "bfloat16"):
            raise _Declined(Reason.UNSUPPORTED_LAYER, f"{label}'s weight is {w.dtype}")
        group = int(node.attributes["group"].as_int()) if "group" in node.attributes else 1
        if w.ndim < 3 or group < 1 or w.shape[0] % group:
            raise _Declined(
                Reason.UNSUPPORTED_LAYER, f"{label}'s weight {list(w.shape)} with group {group}"
            )
        b = None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            b = _constant(node.inputs[2])
            if b is None:
                raise _Declined(Reason.NOT_CONSTANT, f"{label}'s bias is not a constant")
            if b.shape != (w.shape[0],) or not _floating(b):
                raise _Declined(Reason.UNSUPPORTED_LAYER, f"{label}'s bias is {list(b.shape)}")
        dims = w.ndim - 2
        kernel = [int(k) for k in w.shape[2:]]
        strides = tuple(_ints_attr(node, "strides") or [1] * dims)
        dilations = tuple(_ints_attr(node, "dilations") or [1] * dims)
        if len(strides) != dims or len(dilations) != dims:
            raise _Declined(Reason.UNSUPPORTED_LAYER, f"{label}'s strides or dilations")
        auto = node.attributes.get("auto_pad")
        mode = auto.as_string() if auto is not None else "NOTSET"
        if mode in ("NOTSET", "VALID"):
            pads = _ints_attr(node, "pads") if mode == "NOTSET" else None
            pads = pads or [0] * (2 * dims)
            if len(pads) != 2 * dims:
                raise _Declined(Reason.UNSUPPORTED_LAYER, f"{label}'s pads {pads}")
            begin, end = tuple(pads[:dims]), tuple(pads[dims:])
        elif mode in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = self.same_pads(node, x, mode, kernel, strides, dilations)
        else:
            raise _Declined(Reason.MERGE_PADDING_MODE, f"{label} has auto_pad {mode}")
        return _Conv(node, w, b, group, strides, dilations, begin, end)

    def same_pads(
        self,
        node: ir.Node,
        x: ir.Value,
        mode: str,
        kernel: list[int],
        strides: tuple[int, ...],
        dilations: tuple[int, ...],
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The pads ``auto_pad=SAME_*`` means (ONNX's Conv definition): a total of
        ``(ceil(n / s) - 1) * s + d * (k - 1) + 1 - n``, which is ``d * (k - 1)`` when the
        stride is 1, whatever the input size ``n``; SAME_UPPER puts the odd one at the end."""
        shape = self.work.shapes(x)
        begin, end = [], []
        for a, (k, s, d) in enumerate(zip(kernel, strides, dilations, strict=True)):
            if s == 1:
                total = d * (k - 1)
            else:
                n = shape[2 + a] if shape is not None and len(shape) == len(kernel) + 2 else None
                if n is None:
                    raise _Declined(
                        Reason.MERGE_PADDING_MODE,
                        f"{_label(node)} has auto_pad {mode} with stride {s}: its pads depend "
                        "on the input's size, which is unknown",
                    )
                total = max(0, (math.ceil(n / s) - 1) * s + d * (k - 1) + 1 - n)
            small, big = total // 2, total - total // 2
            begin.append(small if mode == "SAME_UPPER" else big)
            end.append(big if mode == "SAME_UPPER" else small)
        return tuple(begin), tuple(end)

    def merge(
        self,
        convs: list[_Conv],
        factors: list[np.ndarray],
        identities: list[Any],
        group: int,
        shift: np.ndarray | None,
    ) -> Any:
        """The merged (W, b) of the convs each times its coefficient (one per output
        channel, in float64) and the identities; ``shift``: constants the sum adds."""
        import torch

        from bnfold.folding import merge_parallel

        kernels = []
        for c, a in zip(convs, factors, strict=True):
            w, b = _torch(c.w), None if c.b is None else np.asarray(c.b, dtype=np.float64) * a
            if (a != 1.0).any():
                w = w.to(torch.float64) * torch.from_numpy(a).reshape(-1, *[1] * (w.dim() - 1))
            kernels.append((w, None if b is None else _torch(b)))
        if shift is not None:
            w0, b0 = kernels[0]
            kernels[0] = (w0, _torch(shift if b0 is None else b0.numpy() + shift))
        folded = merge_parallel(kernels, identities, group, dtype=_torch_dtype(convs[0].w))
        if folded.overflow:
            raise _Declined(Reason.OVERFLOW, f"the merged weights overflow {convs[0].w.dtype}")
        return folded

    # ----------------------------------------------------------------------- rewriting

    def apply(self, tree: _Tree, merged: _Merged, rest: list[ir.Value]) -> None:
        """Rewrite: the kept conv gets the merged weights and takes over the sum's output
        (or, with ``rest``, an ``Add``/``Sum`` of it and ``rest`` does, in the root's place);
        the sum nodes, the other branch convs and the identity BNs go."""
        from bnfold.fold_torch import Decision

        work, keep = self.work, merged.keep
        label = _label(keep)
        work.write(_Write(keep, 1, merged.weight, label))
        work.write(_Write(keep, 2, merged.bias, f"{label}_bnfold_bias"))
        attrs = keep.attributes
        attrs.pop("auto_pad", None)
        attrs["pads"] = ir.AttrInt64s("pads", merged.pads)
        attrs["dilations"] = ir.AttrInt64s("dilations", merged.dilations)
        if "kernel_shape" in attrs:
            attrs["kernel_shape"] = ir.AttrInt64s("kernel_shape", merged.kernel)
        # the kept conv's output (or the new sum) takes over the sum's output, name and type
        out, last = tree.root.outputs[0], keep.outputs[0]
        total = last
        if rest:
            op = "Add" if len(rest) == 1 else "Sum"
            node = ir.Node("", op, [last, *rest], name=tree.root.name)
            self.graph.insert_after(tree.root, node)
            total = node.outputs[0]
        name = out.name
        out.replace_all_uses_with(total, replace_graph_outputs=True)
        total.name = name
        total.type = out.type or total.type
        total.shape = out.shape or total.shape
        gone = [c.node for c in merged.convs if c.node is not keep]
        gone = list({id(n): n for n in gone}.values())
        bns = list({id(n): n for n in merged.bns}.values())
        constants = [v for n in (*gone, *bns) for v in n.inputs[1:] if v is not None]
        constants += [
            v for n in tree.nodes for v in n.inputs if v is not None and _constant(v) is not None
        ]
        self.graph.remove([*tree.nodes, *gone, *bns], safe=True)
        for value in constants:
            work.release(value)
        gone_labels = {_label(n) for n in gone}
        for i, d in enumerate(self.decisions):
            if d.into in gone_labels:  # a BN folded into a branch that is now ``keep``
                self.decisions[i] = replace(
                    d, into=label, detail=f"folded into {d.into}, merged into {label}"
                )
        for bn in bns:
            i = self.index[id(bn)]
            self.decisions[i] = Decision(
                self.decisions[i].bn,
                BN_KIND,
                into=label,
                rule=MERGE.name,
                detail=f"an identity branch of the sum {name}, merged into {label}",
            )
        self.merges.append(
            MergedSite(
                into=label,
                rule=MERGE.name,
                convs=tuple(_label(c.node) for c in merged.convs),
                identity_bns=tuple(self.decisions[self.index[id(bn)]].bn for bn in bns),
                skips=merged.skips,
            )
        )


def _centred(
    branches: list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...], str]],
) -> tuple[list[int], list[int], list[int]]:
    """The merged kernel size, dilations and pads of branches ``(kernel, dilations, begin
    pads, end pads, label)``, or _Declined when their centres do not line up.

    Output ``i`` of a branch reads input ``i * stride - begin + d * j``, ``j < k``: its
    centre is at ``i * stride - (2 * begin - d * (k - 1)) / 2``.  Branches whose doubled
    offsets ``2 * begin - d * (k - 1)`` (and the same at the end) agree have the same centre
    and the same output size, and the smaller kernel sits in the middle of the larger one
    when both have the same dilation and their sizes differ by an even number.
    """
    dims = len(branches[0][0])
    kernel, dilations, begin, end = [], [], [], []
    for a in range(dims):
        wide = {d[a] for k, d, *_ in branches if k[a] > 1}
        if len(wide) > 1:
            raise _Declined(
                Reason.MERGE_GEOMETRY,
                f"dilations {sorted(wide)} on axis {a} of kernels wider than 1",
            )
        d = wide.pop() if wide else 1
        size = max(k[a] for k, *_ in branches)
        starts = {2 * b[a] - dil[a] * (k[a] - 1) for k, dil, b, _, _ in branches}
        ends = {2 * e[a] - dil[a] * (k[a] - 1) for k, dil, _, e, _ in branches}
        odd = [lab for k, _, _, _, lab in branches if (size - k[a]) % 2]
        if len(starts) > 1 or len(ends) > 1 or odd:
            shown = ", ".join(
                f"{lab}: kernel {k[a]}, pads {b[a]}/{e[a]}" for k, _, b, e, lab in branches
            )
            why = (
                f"{', '.join(odd)} has no centre tap in a kernel of {size}"
                if odd
                else "kernel centres do not line up"
            )
            raise _Declined(Reason.MERGE_PADDING, f"axis {a}: {why} ({shown})")
        kernel.append(size)
        dilations.append(d)
        begin.append((starts.pop() + d * (size - 1)) // 2)
        end.append((ends.pop() + d * (size - 1)) // 2)
    return kernel, dilations, begin + end


# --------------------------------------------------------------------------- entry point


def merge_branches(
    work: _Pass, found: list[tuple[str, ir.Node]], decisions: list[Decision]
) -> list[MergedSite]:
    """Merge every sum of parallel branches in ``work``'s graph that merges exactly, in
    place.  ``found``: the BatchNormalization nodes the pairwise pass saw, with its
    ``decisions`` (updated here: identity BNs merged or kept with a ``merge_*`` reason, BNs
    folded into a branch that went now name the Conv that stays)."""
    return _Merger(work, found, decisions).run()

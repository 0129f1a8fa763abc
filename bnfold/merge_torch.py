"""Branch merging on a captured PyTorch graph: parallel convs and identity branches that
read one tensor and meet in a sum become one conv (rule ``rules.MERGE``).

RepVGG, MobileOne and FastViT blocks compute ``BN_a(conv_kxk(x)) + BN_b(conv_1x1(x)) +
BN_c(x)``.  Once the pairwise pass has folded ``BN_a`` and ``BN_b`` into their convs, the
sum is one conv (``folding.merge_parallel``)::

    sum_i a_i * conv(x, W_i, b_i) + sum_j a_j * (s_j * x + t_j) + c = conv(x, W, b)

where ``a`` are the coefficients the sum gives each branch (1, or ``alpha`` of
``torch.add``/``aten.add``, -1 for a subtracted branch) and ``c`` the numbers it adds.
A sum is the tree of ``+``/``-`` nodes whose partial results are used only by the next
node of the tree (``a + b + c`` is two adds, ``x += y`` one); its leaves are found through
nodes that pass values unchanged (``nn.Identity``, dropout in eval).  Branches that read
the same ``x`` merge; every other leaf stays, added to the merged conv.

A group of branches merges only when every check holds, else it declines with a reason
(``Reason.MERGE_*`` and the pass's own codes) that the pass gives the BN that stays: the
identity branch's BN, or a BN reading the sum.  The checks: the sum's operands have its
shape at every shape set (no broadcasting); each branch's output feeds only the sum; the
convs are plain torch layers without hooks, of one rank, dtype and output channel count,
with the same groups, stride and dilation (a 1x1 kernel may ignore dilation), paddings
that keep their centres aligned and one padding mode among the branches that pad; an
identity branch needs stride 1, centred padding, an odd kernel and ``C_in == C_out``.
A conv called elsewhere too (or whose weights are read elsewhere) is fine: the merge makes
a new conv and never writes to the old one.

``scale_convs`` serves the same end: a merged conv whose output is multiplied by a constant
per channel (timm's ``LayerScale2d``) takes the scale into its weights, so that the sum
around it (FastViT's ``x + gamma * (mixer(x) - norm(x))``) merges in the next round.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnfold import folding
from bnfold.graph import (
    BNSite,
    FunctionalLayer,
    attribute,
    functional_layer,
    has_hooks,
    is_plain,
    shape_of,
    shape_sets,
    submodule,
    value_users,
)
from bnfold.rules import MERGE, FoldKind, Reason

__all__ = ["Merge", "merge_branches", "scale_convs", "value_source"]

_aten = torch.ops.aten


@dataclass(frozen=True)
class Merge:
    """One group of parallel branches: merged into ``into``, or declined with ``reason``."""

    rule: str
    convs: tuple[str, ...]  # the conv branches (their layers' names in the model)
    identities: tuple[str, ...]  # the BNs on identity branches
    skips: int  # plain skips (the input itself, summed)
    into: str | None = None  # the merged conv's path in the graph module
    reason: Reason | None = None
    detail: str = ""
    bn_nodes: tuple[fx.Node, ...] = field(default=(), compare=False, repr=False)
    root: fx.Node | None = field(default=None, compare=False, repr=False)  # the sum


class MergeDeclined(Exception):
    def __init__(self, reason: Reason, detail: str):
        super().__init__(reason.value)
        self.reason, self.detail = reason, detail


# --------------------------------------------------------------------------- sums


def _resolve(name: str) -> object:
    """A rule's function name ("operator.add", "torch.add", "aten.add.Tensor") as the object;
    methods ("Tensor.add") stay names (fx calls them as ``call_method``)."""
    if name.startswith("operator."):
        return getattr(operator, name.split(".", 1)[1])
    if name.startswith("torch."):
        return getattr(torch, name.split(".", 1)[1])
    if name.startswith("F."):
        return getattr(F, name[2:])
    _, op, overload = name.split(".")
    return getattr(getattr(_aten, op), overload)


@functools.cache
def _tables() -> tuple[frozenset[object], frozenset[str], frozenset[object], dict[object, int]]:
    """Sum functions, sum methods, subtraction functions/methods, conv functions -> rank."""
    names = MERGE.sum.torch_functions
    functions = frozenset(_resolve(n) for n in names if not n.startswith("Tensor."))
    methods = frozenset(n.split(".", 1)[1] for n in names if n.startswith("Tensor."))
    subs = frozenset(
        {operator.sub, operator.isub, torch.sub, _aten.sub.Tensor, _aten.sub_.Tensor, "sub", "sub_"}
    )
    # subtraction is a sum with a negative sign: not in the rule's table of sums
    convs = {_resolve(n): int(n.split("conv", 1)[1][0]) for n in MERGE.layer.torch_functions}
    return functions, methods, subs, convs


@dataclass
class _Operand:
    value: Any  # an fx.Node, or a number
    coef: float


def _sum_operands(node: fx.Node) -> list[_Operand] | None:
    """``node``'s operands with their signs when it is a sum (``a + b``, ``a += b``,
    ``torch.add(a, b, alpha=k)``, ``a - b``, their aten forms), else None.  ``out=`` or any
    other keyword makes it no sum bnfold rewrites."""
    functions, methods, subs, _ = _tables()
    if node.op == "call_function":
        try:
            is_add = node.target in functions
            is_sub = node.target in subs
        except TypeError:  # an unhashable target
            return None
    elif node.op == "call_method":
        is_add, is_sub = node.target in methods, node.target in subs
    else:
        return None
    if not (is_add or is_sub) or len(node.args) != 2:
        return None
    if set(node.kwargs) - {"alpha"}:
        return None
    alpha = node.kwargs.get("alpha", 1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return None
    a, b = node.args
    if not all(_operand_ok(v) for v in (a, b)):
        return None
    return [_Operand(a, 1.0), _Operand(b, (-1.0 if is_sub else 1.0) * float(alpha))]


def _operand_ok(value: object) -> bool:
    if isinstance(value, fx.Node):
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_COPIES = frozenset({_aten.alias.default, _aten.clone.default, _aten.contiguous.default})


def _passes_values(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A node whose output is its input, unchanged: ``nn.Identity``, dropout in eval (plain
    torch classes without hooks), ``contiguous``/``clone``."""
    if node.op == "call_method":
        return node.target in ("contiguous", "clone") and len(node.args) == 1 and not node.kwargs
    if node.op == "call_function":
        if node.target in (_aten.dropout.default, F.dropout):  # p, train: in eval, the input
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
            return train is False
        try:
            return node.target in _COPIES and len(node.args) == 1
        except TypeError:  # an unhashable target
            return False
    if node.op != "call_module":
        return False
    m = submodule(gm, str(node.target))
    if has_hooks(m) or not is_plain(m) or len(node.args) != 1 or node.kwargs:
        return False
    if isinstance(m, nn.Identity):
        return True
    dropouts = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
    return isinstance(m, dropouts) and (not m.training or m.p == 0)


@dataclass
class _Leaf:
    top: fx.Node  # the operand the sum reads
    source: fx.Node  # the node under the value-passing chain
    chain: list[fx.Node]  # top .. the node above source
    coef: float
    exclusive: bool  # every node from source to top feeds only the next one


@dataclass
class _Tree:
    root: fx.Node
    sums: list[fx.Node]
    leaves: list[_Leaf]
    constant: float  # the numbers the tree adds, with their coefficients
    inner: list[fx.Node]  # value-passing nodes between sums


def _walk(gm: fx.GraphModule, operand: fx.Node) -> tuple[fx.Node, list[fx.Node], bool]:
    """Down from ``operand`` through value-passing nodes: (source, chain, exclusive)."""
    chain: list[fx.Node] = []
    exclusive = True
    v = operand
    while True:
        exclusive = exclusive and len(value_users(v)) == 1
        if not _passes_values(gm, v) or not isinstance(v.args[0], fx.Node):
            return v, chain, exclusive
        chain.append(v)
        v = v.args[0]


def value_source(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """``node``, or the node under the value-passing nodes above it."""
    while _passes_values(gm, node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _tree(gm: fx.GraphModule, root: fx.Node) -> _Tree:
    """The sum tree under ``root``: its sum nodes, leaves and constants."""
    tree = _Tree(root, [], [], 0.0, [])
    stack: list[tuple[fx.Node, float]] = [(root, 1.0)]
    while stack:
        node, coef = stack.pop()
        tree.sums.append(node)
        for op in _sum_operands(node) or ():
            c = coef * op.coef
            if not isinstance(op.value, fx.Node):
                tree.constant += c * float(op.value)
                continue
            source, chain, exclusive = _walk(gm, op.value)
            if exclusive and _sum_operands(source) is not None:
                tree.inner += chain
                stack.append((source, c))
            else:
                tree.leaves.append(_Leaf(op.value, source, chain, c, exclusive))
    return tree


def _roots(gm: fx.GraphModule) -> list[fx.Node]:
    """Sum nodes that no other sum absorbs (their value goes elsewhere than one sum)."""
    roots = []
    for node in gm.graph.nodes:
        if _sum_operands(node) is None:
            continue
        v, users = node, value_users(node)
        while len(users) == 1 and _passes_values(gm, users[0]):
            v = users[0]
            users = value_users(v)
        if len(users) == 1 and _sum_operands(users[0]) is not None:
            continue
        roots.append(node)
    return roots


# --------------------------------------------------------------------------- branches


@dataclass
class _Conv:
    leaf: _Leaf
    node: fx.Node
    layer: nn.Module | FunctionalLayer
    name: str  # the layer's name in the model
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str


@dataclass
class _Identity:
    leaf: _Leaf
    site: BNSite | None  # None: a plain skip
    s: torch.Tensor | None = None
    t: torch.Tensor | None = None


def _conv(gm: fx.GraphModule, leaf: _Leaf, names: dict[str, str]) -> _Conv | None:
    """The conv at ``leaf.source`` (a module, or a functional call on constant weights)."""
    node = leaf.source
    if node.op == "call_module":
        m = submodule(gm, str(node.target))
        classes = tuple(getattr(nn, n) for n in MERGE.layer.torch_modules)
        if not isinstance(m, classes) or len(node.args) != 1 or node.kwargs:
            return None
        target = str(node.target)
        return _Conv(
            leaf,
            node,
            m,
            names.get(target, target),
            m.weight,  # type: ignore[arg-type]
            m.bias,  # type: ignore[arg-type]
            tuple(m.stride),  # type: ignore[arg-type]
            m.padding if isinstance(m.padding, str) else tuple(m.padding),  # type: ignore[arg-type]
            tuple(m.dilation),  # type: ignore[arg-type]
            int(m.groups),  # type: ignore[arg-type]
            str(m.padding_mode),
        )
    if node.op != "call_function":
        return None
    try:
        dims = _tables()[3].get(node.target)
    except TypeError:
        return None
    layer = functional_layer(gm, node) if dims is not None else None
    if layer is None or dims is None:
        return None
    args = list(node.args) + [None] * 7
    kw = node.kwargs

    def arg(i: int, key: str, default: Any) -> Any:
        value = args[i] if args[i] is not None else kw.get(key, default)
        return default if value is None else value

    def each(value: Any) -> tuple[int, ...] | None:
        items = list(value) if isinstance(value, (list, tuple)) else [value] * dims
        if len(items) == 1:
            items *= dims
        if len(items) != dims or not all(isinstance(i, int) for i in items):
            return None
        return tuple(items)

    stride, dilation = each(arg(3, "stride", 1)), each(arg(5, "dilation", 1))
    raw = arg(4, "padding", 0)
    padding = raw if isinstance(raw, str) else each(raw)
    if stride is None or dilation is None or padding is None:
        return None
    weight_name = layer.weight_target
    name = names.get(weight_name, weight_name)
    return _Conv(
        leaf,
        node,
        layer,
        name.rsplit(".", 1)[0] if name.endswith(".weight") else name,
        layer.weight,
        layer.bias,
        stride,
        padding,
        dilation,
        layer.groups,
        "zeros",
    )


def _pads(conv: _Conv) -> tuple[int, ...]:
    """Padding per spatial axis (one side); MergeDeclined when it is not symmetric."""
    k = conv.weight.shape[2:]
    if conv.padding == "valid":
        return (0,) * len(k)
    if conv.padding == "same":
        total = [d * (size - 1) for d, size in zip(conv.dilation, k, strict=True)]
        if any(t % 2 for t in total):
            raise MergeDeclined(
                Reason.MERGE_PADDING, f"{conv.name}: padding='same' pads one side more"
            )
        return tuple(t // 2 for t in total)
    return tuple(conv.padding)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the pass


@dataclass
class _Group:
    root: fx.Node
    x: fx.Node
    convs: list[_Conv]
    identities: list[_Identity]

    def names(self) -> tuple[tuple[str, ...], tuple[str, ...], int]:
        bns = tuple(i.site.name for i in self.identities if i.site is not None)
        skips = sum(i.site is None for i in self.identities)
        return tuple(c.name for c in self.convs), bns, skips

    def branches(self) -> list[_Conv | _Identity]:
        return [*self.convs, *self.identities]

    def bn_nodes(self) -> tuple[fx.Node, ...]:
        return tuple(i.site.node for i in self.identities if i.site is not None)


def merge_branches(
    gm: fx.GraphModule,
    sites: Sequence[BNSite],
    *,
    shapes_known: bool,
    names: dict[str, str],
    check_layer: Any,
    check_bn: Any,
) -> list[Merge]:
    """Merge every group of parallel branches in ``gm``'s sums; one ``Merge`` per group
    (merged or declined), and, for a BN identity branch whose input no conv of its sum
    reads, a declined ``Merge`` naming it.

    ``sites`` are the BNs still in the graph; ``names`` maps a layer's target after the
    pairwise pass to its name in the model; ``check_layer(module)`` and ``check_bn(site)``
    are the pass's own checks (hooks, plain classes, eval mode, statistics), raising an
    exception with ``reason`` and ``detail``.
    """
    by_node = {site.node: site for site in sites}
    merges: list[Merge] = []
    for root in _roots(gm):
        if getattr(root, "_erased", False):  # inside a tree rewritten before
            continue
        tree = _tree(gm, root)
        groups, stray, conv_inputs = _groups(gm, tree, by_node, names, check_bn)
        for site in stray:
            merges.append(
                Merge(
                    MERGE.name,
                    (),
                    (site.name,),
                    0,
                    reason=Reason.MERGE_INPUTS,
                    detail=f"{site.name} reads {site.input}, the summed convs read "
                    + ", ".join(sorted(str(x) for x in conv_inputs)),
                    bn_nodes=(site.node,),
                )
            )
        if not groups:
            continue
        try:
            _check_shapes(tree, shapes_known)
            _check_in_place(gm, tree, by_node)
        except MergeDeclined as e:
            merges += [_declined(g, e) for g in groups]
            continue
        ready: list[tuple[_Group, folding.Folded, dict[str, Any]]] = []
        for group in groups:
            try:
                ready.append((group, *_merged(group, check_layer, tree.constant * (not ready))))
            except MergeDeclined as e:
                merges.append(_declined(group, e))
            except Exception as e:  # the pass's own decline (hooks, custom layers)
                reason = getattr(e, "reason", None)
                if not isinstance(reason, Reason):
                    raise
                merges.append(_declined(group, MergeDeclined(reason, getattr(e, "detail", ""))))
        if ready:
            merges += _rewrite(gm, tree, ready)
    return merges


def _declined(group: _Group, e: MergeDeclined) -> Merge:
    convs, bns, skips = group.names()
    return Merge(
        MERGE.name,
        convs,
        bns,
        skips,
        reason=e.reason,
        detail=e.detail,
        bn_nodes=group.bn_nodes(),
        root=group.root,
    )


def _groups(
    gm: fx.GraphModule,
    tree: _Tree,
    by_node: dict[fx.Node, BNSite],
    names: dict[str, str],
    check_bn: Any,
) -> tuple[list[_Group], list[BNSite], list[fx.Node]]:
    """The tree's branches grouped by the tensor they read (groups with a conv and at least
    two branches), and the BN identity branches that read a tensor no conv reads."""
    convs: list[_Conv] = []
    bns: list[_Identity] = []
    for leaf in tree.leaves:
        conv = _conv(gm, leaf, names)
        if conv is not None:
            convs.append(conv)
            continue
        site = by_node.get(leaf.source)
        if site is None or not isinstance(site.input, fx.Node):
            continue
        try:
            check_bn(site)
        except Exception as e:  # it stays with the reason the pass gave it
            if not isinstance(getattr(e, "reason", None), Reason):
                raise
            continue
        affine = site.affine()
        if affine is not None:
            bns.append(_Identity(leaf, site, *affine))
    inputs: list[fx.Node] = []
    for c in convs:
        x = c.node.args[0]
        if isinstance(x, fx.Node) and x not in inputs:
            inputs.append(x)
    groups = []
    for x in inputs:
        members = [c for c in convs if c.node.args[0] is x]
        identities = [i for i in bns if i.site is not None and i.site.input is x]
        identities += [_Identity(leaf, None) for leaf in tree.leaves if x in _path(leaf)]
        if len(members) + len(identities) >= 2:
            groups.append(_Group(tree.root, x, members, identities))
    stray = [i.site for i in bns if i.site is not None and inputs and i.site.input not in inputs]
    return groups, stray, inputs


def _path(leaf: _Leaf) -> list[fx.Node]:
    """The nodes from the operand the sum reads down to the leaf's source."""
    return [*leaf.chain, leaf.source]


def _check_shapes(tree: _Tree, shapes_known: bool) -> None:
    """Every operand of every sum of the tree has the sum's shape at every shape set: a
    sum that broadcasts is no sum of parallel branches."""
    root = tree.root
    if not shapes_known or shape_of(root) is None:
        raise MergeDeclined(Reason.NEEDS_SHAPES, f"{root.name}: the sum's shapes are unknown")
    for k in range(max(1, shape_sets(root.graph.owning_module))):  # type: ignore[arg-type]
        for node in tree.sums:
            out = shape_of(node, k)
            for op in _sum_operands(node) or ():
                if isinstance(op.value, fx.Node) and shape_of(op.value, k) != out:
                    raise MergeDeclined(
                        Reason.MERGE_GEOMETRY,
                        f"{node.name} broadcasts {shape_of(op.value, k)} to {out}",
                    )


_IN_PLACE = frozenset(
    {operator.iadd, operator.isub, _aten.add_.Tensor, _aten.sub_.Tensor, "add_", "sub_"}
)


def _check_in_place(gm: fx.GraphModule, tree: _Tree, by_node: dict[fx.Node, BNSite]) -> None:
    """An in-place sum (``a += b``, ``a.add_(b)``) writes into ``a``: the rewritten sum,
    which writes nowhere, computes the same only when ``a`` is a new tensor nothing else
    reads (a conv's or BN's output, a partial sum), not a view of a tensor read later."""
    for node in tree.sums:
        try:
            in_place = node.target in _IN_PLACE
        except TypeError:  # an unhashable target
            continue
        written = node.args[0]
        if not in_place or not isinstance(written, fx.Node):
            continue
        source, _, exclusive = _walk(gm, written)
        fresh = source in tree.sums or source in by_node or _is_conv(gm, source)
        if not (exclusive and fresh):
            raise MergeDeclined(
                Reason.MERGE_BRANCH_SHARED,
                f"{node.name} writes in place into {written.name}, which may be read elsewhere",
            )


def _is_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        classes = tuple(getattr(nn, n) for n in MERGE.layer.torch_modules)
        return isinstance(submodule(gm, str(node.target)), classes)
    try:
        return node.op == "call_function" and node.target in _tables()[3]
    except TypeError:
        return False


def _merged(
    group: _Group, check_layer: Any, constant: float
) -> tuple[folding.Folded, dict[str, Any]]:
    """The merged conv's (weight, bias) and settings, or MergeDeclined."""
    convs, identities = group.convs, group.identities
    for item in group.branches():
        if not item.leaf.exclusive and not (isinstance(item, _Identity) and item.site is None):
            raise MergeDeclined(
                Reason.MERGE_BRANCH_SHARED,
                f"{item.leaf.source.name}'s output is also used outside the sum",
            )
    for c in convs:
        if isinstance(c.layer, nn.Module):
            check_layer(c.layer)
    first = convs[0]
    rank = first.weight.dim()
    for c in convs[1:]:
        if c.weight.dim() != rank or c.weight.shape[0] != first.weight.shape[0]:
            raise MergeDeclined(
                Reason.MERGE_GEOMETRY,
                f"{c.name} has weight {tuple(c.weight.shape)}, {first.name} "
                f"{tuple(first.weight.shape)}",
            )
        if c.weight.dtype != first.weight.dtype:
            raise MergeDeclined(
                Reason.UNSUPPORTED_LAYER,
                f"{c.name} is {c.weight.dtype}, {first.name} {first.weight.dtype}",
            )
        if c.groups != first.groups or c.weight.shape[1] != first.weight.shape[1]:
            raise MergeDeclined(
                Reason.MERGE_GROUPS, f"{c.name} has groups={c.groups}, {first.name} {first.groups}"
            )
        if c.stride != first.stride:
            raise MergeDeclined(
                Reason.MERGE_GEOMETRY,
                f"{c.name} has stride {c.stride}, {first.name} {first.stride}",
            )
    dims = rank - 2
    size = [max(c.weight.shape[2 + d] for c in convs) for d in range(dims)]
    dilation = []
    for d in range(dims):  # a 1-tap axis reads one position whatever its dilation
        used = {c.dilation[d] for c in convs if c.weight.shape[2 + d] > 1}
        if len(used) > 1:
            raise MergeDeclined(
                Reason.MERGE_GEOMETRY,
                "dilations differ: " + ", ".join(f"{c.name} {c.dilation}" for c in convs),
            )
        dilation.append(used.pop() if used else first.dilation[d])
    # twice the offset of each branch's window centre from the output position's input
    offsets = set()
    for c in convs:
        pads = _pads(c)
        k = c.weight.shape[2:]
        offsets.add(tuple(2 * pads[d] - c.dilation[d] * (k[d] - 1) for d in range(dims)))
        if any((size[d] - k[d]) % 2 for d in range(dims)):
            raise MergeDeclined(
                Reason.MERGE_PADDING,
                f"{c.name}'s kernel {tuple(k)} has no centre in {tuple(size)}",
            )
    if len(offsets) > 1:
        raise MergeDeclined(
            Reason.MERGE_PADDING,
            "padding does not centre the kernels: "
            + ", ".join(
                f"{c.name} kernel {tuple(c.weight.shape[2:])} padding {_pads(c)}" for c in convs
            ),
        )
    (offset,) = offsets
    padding = tuple((offset[d] + dilation[d] * (size[d] - 1)) // 2 for d in range(dims))
    modes = {c.padding_mode for c in convs if any(_pads(c))}
    if len(modes) > 1:
        raise MergeDeclined(
            Reason.MERGE_PADDING_MODE,
            "padding modes differ: " + ", ".join(f"{c.name} {c.padding_mode}" for c in convs),
        )
    c_out = int(first.weight.shape[0])
    groups = first.groups
    if identities:
        if any(s != 1 for s in first.stride):
            raise MergeDeclined(
                Reason.MERGE_GEOMETRY, f"an identity branch beside stride {first.stride}"
            )
        if any(offset) or any(k % 2 == 0 for k in size):
            raise MergeDeclined(
                Reason.MERGE_PADDING,
                f"an identity branch beside kernel {tuple(size)} padded off centre",
            )
        if int(first.weight.shape[1]) * groups != c_out:
            raise MergeDeclined(
                Reason.MERGE_GROUPS,
                f"an identity branch beside {first.name}: "
                f"{int(first.weight.shape[1]) * groups} input channels, {c_out} output",
            )
        for n in range(max(1, shape_sets(group.x.graph.owning_module))):  # type: ignore[arg-type]
            shape = shape_of(group.x, n)
            if shape is None or len(shape) != rank or shape[1] != c_out:
                raise MergeDeclined(
                    Reason.CHANNEL_MISMATCH,
                    f"{group.x.name} of shape {shape} is not batched with {c_out} channels",
                )
        for i in identities:
            if i.site is not None and i.site.channels != c_out:
                raise MergeDeclined(
                    Reason.CHANNEL_MISMATCH, f"{i.site.name} has {i.site.channels} channels"
                )
    kernels = []
    for n, c in enumerate(convs):
        w, b = c.weight, c.bias
        if c.leaf.coef != 1.0:
            w = w.detach().to(torch.float64) * c.leaf.coef
            b = b.detach().to(torch.float64) * c.leaf.coef if b is not None else None
        if n == 0 and constant != 0.0:
            base = (
                b.detach().to(torch.float64)
                if b is not None
                else torch.zeros(c_out, dtype=torch.float64)
            )
            b = base + constant
        kernels.append((w, b))
    affines = []
    for i in identities:
        if i.site is None:
            s = torch.ones(c_out, dtype=torch.float64)
            t = torch.zeros(c_out, dtype=torch.float64)
        else:
            s, t = i.s, i.t  # type: ignore[assignment]
        affines.append((s * i.leaf.coef, t * i.leaf.coef))
    dtype = first.weight.dtype
    merged = folding.merge_parallel(kernels, affines, groups=groups, dtype=dtype)
    if merged.overflow:
        raise MergeDeclined(Reason.OVERFLOW, f"merged values exceed {dtype}")
    settings = {
        "dims": dims,
        "stride": first.stride,
        "padding": padding,
        "dilation": tuple(dilation),
        "groups": groups,
        "padding_mode": modes.pop() if modes else "zeros",
        "requires_grad": bool(first.weight.requires_grad),
        "device": first.weight.device,
    }
    return merged, settings


# --------------------------------------------------------------------------- rewriting


def _rewrite(
    gm: fx.GraphModule, tree: _Tree, ready: list[tuple[_Group, folding.Folded, dict[str, Any]]]
) -> list[Merge]:
    """Replace the tree by the merged convs plus the leaves that stay."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    aten = isinstance(tree.root.target, torch._ops.OpOverload)
    merged_leaves: set[int] = set()
    removed: set[fx.Node] = {*tree.sums, *tree.inner}
    for group, _, _ in ready:
        for item in group.branches():
            merged_leaves.add(id(item.leaf))
            if isinstance(item, _Identity) and item.site is None:
                # a plain skip: the value-passing nodes above x that fed only the sum go
                path = _path(item.leaf)
                above = path[: path.index(group.x)]
                if all(len(n.users) == 1 for n in above):
                    removed.update(above)
                continue
            removed.add(item.leaf.source)
            removed.update(item.leaf.chain)
        for i in group.identities:
            if i.site is not None:
                removed.update(i.site.extra_nodes)
    first = min(removed, key=order.__getitem__)
    merges, outputs = [], []
    for group, (w, b, _), settings in ready:
        with graph.inserting_before(first):
            node, into = _install(gm, group, w, b, settings, aten)
        node.meta = dict(tree.root.meta)
        outputs.append(node)
        convs, bns, skips = group.names()
        merges.append(Merge(MERGE.name, convs, bns, skips, into=into, bn_nodes=group.bn_nodes()))
    result = outputs[0]
    stays = [(o, 1.0) for o in outputs[1:]]
    stays += [(leaf.top, leaf.coef) for leaf in tree.leaves if id(leaf) not in merged_leaves]
    with graph.inserting_before(tree.root):
        for value, coef in stays:
            if aten:
                kwargs: dict[str, Any] = {"alpha": coef} if coef != 1.0 else {}
                result = graph.call_function(_aten.add.Tensor, (result, value), kwargs)
            elif coef == 1.0:
                result = graph.call_function(operator.add, (result, value))
            else:
                result = graph.call_function(torch.add, (result, value), {"alpha": coef})
            result.meta = dict(tree.root.meta)
    tree.root.replace_all_uses_with(result)
    for node in sorted(removed, key=order.__getitem__, reverse=True):
        # what is left reads only the shape (``x.ndim`` asserts): the merged conv's is equal
        node.replace_all_uses_with(outputs[0])
        graph.erase_node(node)
    return merges


def _install(
    gm: fx.GraphModule,
    group: _Group,
    w: torch.Tensor,
    b: torch.Tensor,
    settings: dict[str, Any],
    aten: bool,
) -> tuple[fx.Node, str]:
    """The merged conv's node (before the graph's insertion point) and its name: a new
    ``nn.ConvNd`` module when the branches were modules, else a functional call on new
    constants, as the pass installs folded functional layers."""
    largest = max(group.convs, key=lambda c: c.weight.shape[2:].numel())
    modules = all(isinstance(c.layer, nn.Module) for c in group.convs)
    base = largest.name.replace(".", "_") + "_merged"
    return _new_conv(gm, base, group.x, modules, w, b, settings, aten)


def _new_conv(
    gm: fx.GraphModule,
    base: str,
    x: fx.Node,
    module: bool,
    w: torch.Tensor,
    b: torch.Tensor,
    settings: dict[str, Any],
    aten: bool,
) -> tuple[fx.Node, str]:
    """A new conv on ``x`` named after ``base``: an ``nn.ConvNd`` module, or a functional
    (``aten`` or ``F``) call on new constants ``name.weight``, ``name.bias``."""
    dims = settings["dims"]
    name, k = base, 1
    while hasattr(gm, name):
        k += 1
        name = f"{base}{k}"
    if module:
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        conv = cls(
            int(w.shape[1]) * settings["groups"],
            int(w.shape[0]),
            tuple(w.shape[2:]),  # type: ignore[arg-type]
            stride=settings["stride"],
            padding=settings["padding"],
            dilation=settings["dilation"],
            groups=settings["groups"],
            bias=True,
            padding_mode=settings["padding_mode"],
            device="meta",
            dtype=w.dtype,
        )
        rg = settings["requires_grad"]
        conv.weight = nn.Parameter(w.to(settings["device"]), requires_grad=rg)
        conv.bias = nn.Parameter(b.to(settings["device"]), requires_grad=rg)
        gm.add_submodule(name, conv)
        return gm.graph.call_module(name, (x,)), name
    holder = nn.Module()  # constants named like a layer's: ``name.weight``, ``name.bias``
    holder.register_parameter("weight", nn.Parameter(w.to(settings["device"]), False))
    holder.register_parameter("bias", nn.Parameter(b.to(settings["device"]), False))
    gm.add_submodule(name, holder)
    w_node = gm.graph.get_attr(name + ".weight")
    b_node = gm.graph.get_attr(name + ".bias")
    target: Any = (
        (_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default)[dims - 1]
        if aten
        else (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    )
    args = (
        x,
        w_node,
        b_node,
        list(settings["stride"]),
        list(settings["padding"]),
        list(settings["dilation"]),
        settings["groups"],
    )
    return gm.graph.call_function(target, args), name


# --------------------------------------------------------------------------- scaled convs

_MULS = frozenset(
    {operator.mul, operator.imul, torch.mul, _aten.mul.Tensor, _aten.mul_.Tensor, "mul", "mul_"}
)


def scale_convs(gm: fx.GraphModule, names: dict[str, str], check_layer: Any) -> int:
    """Fold a constant per-channel scale of a conv's output into the conv (``conv(x) *
    gamma``, timm's ``LayerScale2d``; exact: ``W' = gamma * W``, ``b' = gamma * b`` in
    float64, rounded once), so that a sum it feeds can merge.  FastViT's RepMixer computes
    ``x + gamma * (mixer(x) - norm(x))``: once the difference has merged into one conv,
    the scale folds into it and the sum with ``x`` merges too.  The number of convs
    rewritten; a conv that is not plain, or whose output something else reads, stays."""
    done = 0
    for node in list(gm.graph.nodes):
        found = _scaled_conv(gm, node, names)
        if found is None:
            continue
        conv, scale = found
        if isinstance(conv.layer, nn.Module):
            try:
                check_layer(conv.layer)
            except Exception as e:  # hooks, a subclass: it stays as it is
                if not isinstance(getattr(e, "reason", None), Reason):
                    raise
                continue
        dtype = conv.weight.dtype
        zero = torch.zeros_like(scale)
        w, b, overflow = folding.fold_backward(
            conv.weight, conv.bias, scale, zero, FoldKind.CONV_OUT, conv.groups, dtype
        )
        if overflow:
            continue
        try:
            padding: tuple[int, ...] | str = _pads(conv)
        except MergeDeclined:
            padding = conv.padding
        settings = {
            "dims": conv.weight.dim() - 2,
            "stride": conv.stride,
            "padding": padding,
            "dilation": conv.dilation,
            "groups": conv.groups,
            "padding_mode": conv.padding_mode,
            "requires_grad": bool(conv.weight.requires_grad),
            "device": conv.weight.device,
        }
        x = conv.node.args[0]
        assert isinstance(x, fx.Node)
        aten = isinstance(conv.node.target, torch._ops.OpOverload)
        module = isinstance(conv.layer, nn.Module)
        with gm.graph.inserting_before(conv.node):
            new, name = _new_conv(
                gm, conv.name.replace(".", "_") + "_scaled", x, module, w, b, settings, aten
            )
        new.meta = dict(node.meta)
        names[name if module else name + ".weight"] = conv.name + ("" if module else ".weight")
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        for old in _path(conv.leaf):  # from the product's operand down to the conv
            old.replace_all_uses_with(new)  # what is left reads only the shape
            gm.graph.erase_node(old)
        done += 1
    return done


def _scaled_conv(
    gm: fx.GraphModule, node: fx.Node, names: dict[str, str]
) -> tuple[_Conv, torch.Tensor] | None:
    """(the conv, the scale per output channel in float64) when ``node`` multiplies a
    conv's output, which nothing else reads, by a constant that varies along the channels
    only, without changing its shape or dtype."""
    try:
        if node.op not in ("call_function", "call_method") or node.target not in _MULS:
            return None
    except TypeError:  # an unhashable target
        return None
    if len(node.args) != 2 or node.kwargs:
        return None
    for i in (0, 1):
        value, other = node.args[i], node.args[1 - i]
        if not isinstance(value, fx.Node) or (i == 1 and node.target in _IN_PLACE_MULS):
            continue  # an in-place product writes into its first operand: the conv's
        source, chain, exclusive = _walk(gm, value)
        conv = _conv(gm, _Leaf(value, source, chain, 1.0, exclusive), names) if exclusive else None
        if conv is None:
            continue
        scale = _channel_constant(gm, other, conv, node)
        if scale is not None:
            return conv, scale
    return None


_IN_PLACE_MULS = frozenset({operator.imul, _aten.mul_.Tensor, "mul_"})


def _channel_constant(
    gm: fx.GraphModule, value: object, conv: _Conv, node: fx.Node
) -> torch.Tensor | None:
    """``value`` as one float64 scale per output channel of ``conv``, or None."""
    c_out, rank = int(conv.weight.shape[0]), conv.weight.dim()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        const = torch.full((c_out,), float(value), dtype=torch.float64)
    elif isinstance(value, fx.Node) and value.op == "get_attr":
        try:
            obj = attribute(gm, str(value.target))
        except AttributeError:
            return None
        if not isinstance(obj, torch.Tensor) or obj.dtype != conv.weight.dtype:
            return None
        shape = (1,) * (rank - obj.dim()) + tuple(obj.shape)
        if obj.dim() > rank or any(n != 1 for i, n in enumerate(shape) if i != 1):
            return None
        if shape[1] not in (1, c_out):
            return None
        const = obj.detach().to(torch.float64).reshape(-1).expand(c_out).clone()
    else:
        return None
    for k in range(max(1, shape_sets(gm))):
        out = shape_of(conv.node, k)
        if out is None or len(out) != rank or shape_of(node, k) != out:
            return None
    return const

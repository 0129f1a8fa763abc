"""The fold pass: apply the rules to every BatchNorm site of a captured graph.

Walks the graph in data-flow order.  For each BN it runs the checks every fold
needs, once, here (eval mode, running statistics, constant parameters, a plain
forward, finite values), then tries a backward fold into the producer of its
input, then a forward fold into the consumer of its output.  Each BN ends up
either folded (a ``Decision`` naming the layer, direction and rule) or kept with
a ``Reason``.  After the pairwise folds, parallel branches that meet in a sum merge
into one conv (``merge_torch``, rule ``branch_merge``: a BN on an identity branch goes
with them), and the pairwise folds run once more for the BNs that read a merged sum.

Safety: the model handed in is never modified.  The graph module built by
capture shares the model's leaf modules, so a folded layer is always a new module
object with new tensors, installed in the graph module's own hierarchy; a layer
called from several places gets its own folded copy at the folded call site.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from bnfold import folding
from bnfold.graph import (
    BNSite,
    ChannelLaw,
    FunctionalLayer,
    bn_kind,
    bn_site,
    carry_law,
    function_rule,
    functional_layer,
    has_hooks,
    is_bn_module,
    is_layout_node,
    is_trusted_bn,
    module_rule,
    not_plain_because,
    shape_of,
    shape_sets,
    submodule,
    value_users,
)
from bnfold.merge_torch import Merge, merge_branches, scale_convs, value_source
from bnfold.rules import ChannelAxis, Direction, FoldRule, Reason

__all__ = ["Decision", "FoldOutcome", "fold_graph", "shared_modules"]


@dataclass(frozen=True)
class Decision:
    """What happened to one BN site."""

    bn: str
    kind: str
    into: str | None = None
    direction: Direction | None = None
    rule: str | None = None
    reason: Reason | None = None
    detail: str = ""
    site: BNSite | None = field(default=None, compare=False, repr=False)

    @property
    def folded(self) -> bool:
        return self.into is not None


@dataclass
class FoldOutcome:
    module: fx.GraphModule
    decisions: list[Decision]
    shapes_known: bool
    merges: list[Merge] = field(default_factory=list)  # branch merges, made or declined


@dataclass
class _Plan:
    rule: FoldRule
    layer_node: fx.Node
    layer: nn.Module | FunctionalLayer
    s: torch.Tensor
    t: torch.Tensor


class _Declined(Exception):
    def __init__(self, reason: Reason, detail: str):
        super().__init__(reason.value)
        self.reason, self.detail = reason, detail


def fold_graph(
    gm: fx.GraphModule,
    original: nn.Module | AbstractSet[int],
    *,
    shapes_known: bool,
) -> FoldOutcome:
    """Fold every BN of ``gm`` that folds exactly; ``original``'s modules stay untouched.

    ``original`` is the captured model, or ``shared_modules(gm, model)``: a caller that
    needs nothing else of the model can then let it go before folding, and each layer
    folded away is freed as soon as its folded copy replaces it in ``gm``.  Folded layers
    are always new modules holding new tensors.
    """
    protected = shared_modules(gm, original) if isinstance(original, nn.Module) else original
    state = _Pass(
        gm,
        protected,
        calls=Counter(
            id(submodule(gm, str(n.target))) for n in gm.graph.nodes if n.op == "call_module"
        ),
        seen=_read_elsewhere(gm),
    )
    decisions = _fold_sites(state, shapes_known)
    decisions, merges = _merge_branches(state, decisions, shapes_known)
    decisions += _unseen(gm, decisions)
    _drop_unused(gm, protected)
    gm.recompile()
    return FoldOutcome(gm, decisions, shapes_known, merges)


@dataclass
class _Pass:
    """What the fold pass knows of the graph's modules and tensors while it rewrites."""

    gm: fx.GraphModule
    protected: AbstractSet[int]  # the model's own modules: never edited (shared_modules)
    calls: Counter[int]  # how often the graph calls each module
    seen: AbstractSet[int]  # modules the graph also reads other than by a call
    copies: Counter[str] = field(default_factory=Counter)  # folded copies per layer path
    origin: dict[str, str] = field(default_factory=dict)  # a folded copy's target -> the layer's


def _fold_sites(state: _Pass, shapes_known: bool) -> list[Decision]:
    """Try every BN site in data-flow order; the decision for each."""
    gm = state.gm
    decisions: list[Decision] = []
    erased: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node in erased:
            continue
        site = bn_site(gm, node)
        if site is None:
            continue
        try:
            _check_site(site)
        except _Declined as e:
            decisions.append(
                Decision(site.name, site.kind, reason=e.reason, detail=e.detail, site=site)
            )
            continue
        affine = site.affine()
        if affine is None:
            decisions.append(_nonfinite(site))
            continue
        s, t = affine
        try:
            plan = _try_backward(gm, site, s, t, shapes_known)
        except _Declined as back:
            try:
                plan = _try_forward(gm, site, s, t, shapes_known)
            except _Declined as fwd:
                decisions.append(_kept(site, back, fwd))
                continue
        try:
            into = _apply(state, plan)
        except _Declined as e:
            decisions.append(
                Decision(site.name, site.kind, reason=e.reason, detail=e.detail, site=site)
            )
            continue
        erased.update(_remove_bn(gm, site))
        decisions.append(
            Decision(
                site.name,
                site.kind,
                into=into,
                direction=plan.rule.direction,
                rule=plan.rule.name,
                site=site,
            )
        )
    return decisions


def _merge_branches(
    state: _Pass, decisions: list[Decision], shapes_known: bool
) -> tuple[list[Decision], list[Merge]]:
    """After the pairwise folds: merge parallel branches that meet in a sum
    (``merge_torch``), then fold again, so that a BN reading a merged sum folds into the
    merged conv.  An identity branch's BN that merged is folded (rule ``branch_merge``); one
    that stays, or a BN reading a sum that could not merge, gets the merge's reason."""
    gm = state.gm
    kept = [d.site for d in decisions if not d.folded and d.site is not None]

    def merge() -> list[Merge]:
        live = set(gm.graph.nodes)
        return merge_branches(
            gm,
            [site for site in kept if site.node in live],
            shapes_known=shapes_known,
            names=state.origin,
            check_layer=_plain_layer,
            check_bn=_check_site,
        )

    merges = merge()
    # a merged conv scaled per channel (LayerScale) folds the scale in and may merge again
    for _ in range(3):
        if not any(m.into for m in merges) or not scale_convs(gm, state.origin, _plain_layer):
            break
        merges = _latest(merges + merge())
    if not merges:
        return decisions, merges
    again: dict[fx.Node, Decision] = {}
    if any(m.into is not None for m in merges):
        again = {d.site.node: d for d in _fold_sites(state, shapes_known) if d.site is not None}
    merged = {n: m for m in merges if m.into is not None for n in m.bn_nodes}
    declined = {n: m for m in merges if m.reason is not None for n in m.bn_nodes}
    sums = {m.root: m for m in merges if m.reason is not None and m.root is not None}
    out = []
    for d in decisions:
        node = d.site.node if d.site is not None else None
        m = merged.get(node) if node is not None else None
        if m is not None:
            out.append(Decision(d.bn, d.kind, into=m.into, rule=m.rule, site=d.site))
            continue
        d = again.get(node, d) if node is not None else d
        if not d.folded and node is not None:
            m = declined.get(node)
            if (
                m is not None
                and m.reason is Reason.MERGE_INPUTS
                and d.reason is not Reason.NO_NEIGHBOUR
            ):
                m = None  # a BN reading something else than the convs: its own reason says more
            if m is None and d.reason is Reason.NO_NEIGHBOUR and d.site is not None:
                m = sums.get(value_source(gm, d.site.input))
                if m is not None:
                    m = replace(m, detail=f"the sum it reads does not merge: {m.detail}")
            if m is not None:
                d = replace(d, reason=m.reason, detail=m.detail)
        out.append(d)
    return out, merges


def _latest(merges: list[Merge]) -> list[Merge]:
    """Every merge made, and of the declines the last word on each sum."""
    last = {(m.root, m.bn_nodes): i for i, m in enumerate(merges) if m.into is None}
    return [
        m for i, m in enumerate(merges) if m.into is not None or last[(m.root, m.bn_nodes)] == i
    ]


def _unseen(gm: fx.GraphModule, decisions: list[Decision]) -> list[Decision]:
    """BatchNorm modules that are no site of the graph, yet run: inside a module the graph
    calls as a whole (one with forward hooks: opaque), or traced through without a plain
    batch_norm inside (a BN-like class with its own arithmetic).  Each stays, with its
    reason; a BN the graph never runs gets no decision."""
    decided = {d.bn for d in decisions}
    called = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    out: list[Decision] = []
    for name, m in gm.named_modules():
        if not name or name in decided or not is_bn_module(m):
            continue
        holder = next((t for t in called if name.startswith(t + ".")), None)
        if holder is not None:
            outer = submodule(gm, holder)
            why = "has forward hooks" if has_hooks(outer) else "bnfold calls as a whole"
            out.append(
                Decision(
                    name,
                    bn_kind(m),
                    reason=Reason.OPAQUE_MODULE,
                    detail=f"inside {holder} ({type(outer).__name__}), which {why}",
                )
            )
            decided.add(name)
    for node in gm.graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            if path in decided or not isinstance(cls, type) or not _bn_like_class(cls):
                continue
            decided.add(path)
            out.append(
                Decision(
                    path,
                    cls.__name__,
                    reason=Reason.CUSTOM_FORWARD,
                    detail=f"{cls.__name__}.forward, traced through, computes no plain "
                    "batch_norm bnfold can fold",
                )
            )
    return out


def _bn_like_class(cls: type) -> bool:
    return issubclass(cls, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in cls.__name__


def shared_modules(gm: fx.GraphModule, original: nn.Module) -> frozenset[int]:
    """The ids of ``original``'s modules that ``gm``'s hierarchy holds: folding never edits
    them.  ``gm`` keeps them alive, so the ids stay valid when the rest of ``original`` goes.
    """
    ours = {id(m) for m in original.modules()}
    return frozenset(id(m) for m in gm.modules() if id(m) in ours and m is not gm)


def _read_elsewhere(gm: fx.GraphModule) -> frozenset[int]:
    """The ids of the modules whose weights the graph reads other than by calling them:
    the submodules of a module it calls (MultiheadAttention's ``out_proj``: the call reads
    them inside), and every module on the path of what it reads with ``get_attr``
    (``F.linear(x, self.fc.weight)``, resolved by path at run time) or calls below another
    module (``fc.parametrizations.weight``).  A fold into one of them gets a copy under a
    new name and leaves the module, and the paths through it, as they were."""
    seen: set[int] = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        *path, last = str(node.target).split(".")
        module: nn.Module = gm
        for name in path:  # the modules above the target
            child = module._modules.get(name)
            if child is None:
                break
            seen.add(id(child))
            module = child
        else:
            called = module._modules.get(last) if node.op == "call_module" else None
            if called is not None:
                seen.update(id(m) for m in called.modules() if m is not called)
    return frozenset(seen)


def _kept(site: BNSite, back: _Declined, fwd: _Declined) -> Decision:
    """The decision for a BN neither direction can fold: the more telling reason first.

    A backward attempt that found no layer at all says less than a forward attempt
    that found a layer and was blocked (zero padding, shared output), and vice versa.
    """
    if back.reason is Reason.NO_NEIGHBOUR and fwd.reason is not Reason.NO_NEIGHBOUR:
        main, other = fwd, back
    else:
        main, other = back, fwd
    return Decision(
        site.name, site.kind, reason=main.reason, detail=f"{main.detail}; {other.detail}", site=site
    )


# --------------------------------------------------------------------------- checks


def _check_site(site: BNSite) -> None:
    m = site.module
    if m is not None and getattr(m, "track_running_stats", True) is False:
        raise _Declined(Reason.NO_RUNNING_STATS, "track_running_stats=False")
    if site.running_mean is None or site.running_var is None:
        if not site.constant:
            raise _Declined(Reason.NOT_CONSTANT, "statistics are not constant buffers")
        raise _Declined(Reason.NO_RUNNING_STATS, "no running_mean/running_var buffers")
    if not site.constant:
        raise _Declined(Reason.NOT_CONSTANT, "parameters are not constant buffers")
    if (m is not None and m.training) or site.training:
        raise _Declined(Reason.TRAIN_MODE, "module.training is True; call model.eval()")
    if m is not None and not is_trusted_bn(m):
        why = not_plain_because(m) or f"{type(m).__name__} is not a BatchNorm class bnfold knows"
        raise _Declined(Reason.CUSTOM_FORWARD, why)
    if m is not None:
        _no_hooks(m)


def _nonfinite(site: BNSite) -> Decision:
    """The decision for a BN whose scale or shift is not finite, naming the culprit."""
    detail = "running_var + eps <= 0 makes the scale infinite or NaN"
    for label, tensor in (
        ("running_mean", site.running_mean),
        ("running_var", site.running_var),
        ("weight", site.weight),
        ("bias", site.bias),
    ):
        if tensor is not None and not folding.all_finite(tensor):
            detail = f"{label} has NaN/Inf"
            break
    return Decision(site.name, site.kind, reason=Reason.NONFINITE_STATS, detail=detail, site=site)


def _describe(gm: fx.GraphModule, node: object) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "call_module":
        return f"{node.target} ({type(submodule(gm, str(node.target))).__name__})"
    if node.op == "placeholder":
        return f"the model input {node.target!r}"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _plain_layer(layer: nn.Module) -> None:
    """Decline a layer whose call may compute something else than its torch class: a
    subclass overriding ``forward``, ``_conv_forward`` or any other method or property,
    hooks, parametrizations of anything but the weight and bias."""
    cls = type(layer)
    if parametrize.is_parametrized(layer):
        others = sorted(set(layer.parametrizations) - {"weight", "bias"})
        if others:
            raise _Declined(Reason.CUSTOM_LAYER, f"parametrized {', '.join(others)}")
        cls = cls.__bases__[0]  # torch's generated Parametrized<Class>: judge the class under it
    why = not_plain_because(layer, cls)
    if why is not None:
        raise _Declined(Reason.CUSTOM_LAYER, f"{why} is overridden")
    _no_hooks(layer)


def _no_hooks(module: nn.Module) -> None:
    """Forward hooks run at the module's call (fx calls the module itself): an output hook
    would see folded numbers, a removed BN's hooks would be lost, and a pre-hook may
    compute the weight (the old ``weight_norm``)."""
    hooks = {"forward": module._forward_hooks, "pre-forward": module._forward_pre_hooks}
    kinds = [kind for kind, registered in hooks.items() if registered]
    if kinds:
        raise _Declined(Reason.HOOKS, f"{type(module).__name__} has {' and '.join(kinds)} hooks")


def _try_backward(
    gm: fx.GraphModule, site: BNSite, s: torch.Tensor, t: torch.Tensor, shapes_known: bool
) -> _Plan:
    path: list[fx.Node] = []
    n = site.input
    while isinstance(n, fx.Node) and is_layout_node(gm, n):
        if len(value_users(n)) != 1:
            raise _Declined(Reason.PRODUCER_SHARED_OUTPUT, f"{n.name} feeds {len(n.users)} nodes")
        path.append(n)
        n = n.args[0]  # type: ignore[assignment]
    if not isinstance(n, fx.Node) or n.op not in ("call_module", "call_function"):
        raise _Declined(Reason.NO_NEIGHBOUR, f"input comes from {_describe(gm, n)}")
    layer: nn.Module | FunctionalLayer | None
    if n.op == "call_function":
        layer = functional_layer(gm, n)
        rule = function_rule(n.target) if layer is not None else None
    else:
        layer = submodule(gm, str(n.target))
        rule = module_rule(layer, Direction.BACKWARD)
    if rule is None or layer is None:
        raise _Declined(Reason.NO_NEIGHBOUR, f"input comes from {_describe(gm, n)}")
    users = value_users(n)
    if len(users) != 1:
        raise _Declined(
            Reason.PRODUCER_SHARED_OUTPUT,
            f"{n.target}'s output also feeds "
            + ", ".join(u.name for u in users if u is not (path[-1] if path else site.node)),
        )
    if isinstance(layer, nn.Module):
        _plain_layer(layer)
    out_features = getattr(layer, "out_channels", getattr(layer, "out_features", -1))
    if out_features != site.channels:
        raise _Declined(
            Reason.CHANNEL_MISMATCH, f"{n.target} has {out_features} outputs, BN {site.channels}"
        )
    if shapes_known and shape_of(n) is not None:
        for k in range(max(1, shape_sets(gm))):
            _prove_backward(gm, n, path, site, _layer_axis(rule, layer), k)
    elif path or not _batched_by_kind(site, layer):
        raise _Declined(Reason.NEEDS_SHAPES, f"{n.target} -> {site.name}")
    return _Plan(rule, n, layer, s, t)


def _prove_backward(
    gm: fx.GraphModule, n: fx.Node, path: list[fx.Node], site: BNSite, axis: int, k: int
) -> None:
    """Decline unless the layer's channels (``axis`` of its output) reach the BN's channel
    axis through ``path``, with the shapes of input set ``k``."""
    law = ChannelLaw.at_axis(shape_of(n, k), axis)  # type: ignore[arg-type]
    for step in reversed(path):
        carried = carry_law(gm, step, law, k)
        if carried is None:
            raise _Declined(Reason.CHANNEL_MISMATCH, f"channels do not survive {step.name}")
        law = carried
    bn_in = shape_of(site.input, k)
    if bn_in is None or law.axis_in(bn_in) != 1:
        raise _Declined(
            Reason.CHANNEL_MISMATCH,
            f"{n.target}'s features are not the BN's channel axis at {bn_in}",
        )


def _layer_axis(rule: FoldRule, layer: nn.Module | FunctionalLayer) -> int:
    """The axis of the layer's output (backward) or input (forward) holding its channels:
    the one before the spatial axes of a conv (1 batched, 0 unbatched), the last of a
    Linear."""
    if rule.channel_axis is ChannelAxis.LAST:
        return -1
    return -(layer.weight.dim() - 1)  # type: ignore[union-attr,operator]


def _batched_by_kind(site: BNSite, layer: nn.Module | FunctionalLayer) -> bool:
    """Without shapes: whether the BN's class alone proves that its channel axis is the
    conv's.  BatchNorm2d/3d accept only 4-D/5-D input, which for a Conv2d/3d is batched,
    so their axis 1 is the conv's channels; BatchNorm1d takes (N, C) as well as (N, C, L),
    and a Conv1d on unbatched (C, L) input gives a 2-D tensor whose axis 1 is L."""
    ranks = {"BatchNorm2d": 4, "BatchNorm3d": 5}
    return (
        site.module is not None
        and type(site.module).__name__ in ranks
        and isinstance(layer, nn.modules.conv._ConvNd)
        and layer.weight.dim() == ranks[type(site.module).__name__]
    )


def _try_forward(
    gm: fx.GraphModule, site: BNSite, s: torch.Tensor, t: torch.Tensor, shapes_known: bool
) -> _Plan:
    path: list[fx.Node] = []
    n = site.node
    while True:
        users = value_users(n)
        if len(users) != 1:
            if not users:
                raise _Declined(Reason.NO_NEIGHBOUR, "its output is a model output")
            raise _Declined(
                Reason.OUTPUT_SHARED, f"{n.name} feeds " + ", ".join(u.name for u in users)
            )
        (u,) = users
        if not is_layout_node(gm, u):
            break
        path.append(u)
        n = u
    if u.op != "call_module" or u.args[0] is not n:
        raise _Declined(Reason.NO_NEIGHBOUR, f"output goes to {_describe(gm, u)}")
    layer = submodule(gm, str(u.target))
    rule = module_rule(layer, Direction.FORWARD)
    if rule is None:
        raise _Declined(Reason.NO_NEIGHBOUR, f"output goes to {_describe(gm, u)}")
    _plain_layer(layer)
    if rule.zero_padding_breaks and _pads_with_zeros(layer):
        raise _Declined(Reason.ZERO_PADDING, f"{u.target} has padding={layer.padding}")
    channels = site.channels
    if shapes_known and shape_of(site.node) is not None:
        index = None
        for k in range(max(1, shape_sets(gm))):
            found = _prove_forward(gm, site, path, n, u, rule, layer, k)
            if index is not None and (found is None or not torch.equal(found, index)):
                raise _Declined(
                    Reason.CHANNEL_MISMATCH, f"BN channels map differently onto {u.target}"
                )
            index = found
        if index is not None:
            s, t = s[index], t[index]
    elif path or not _batched_by_kind(site, layer):
        raise _Declined(Reason.NEEDS_SHAPES, f"{site.name} -> {u.target}")
    in_features = getattr(layer, "in_channels", getattr(layer, "in_features", -1))
    if rule.channel_axis is ChannelAxis.BEFORE_SPATIAL and in_features != channels:
        raise _Declined(Reason.CHANNEL_MISMATCH, f"{u.target} takes {in_features} channels")
    return _Plan(rule, u, layer, s, t)


def _prove_forward(
    gm: fx.GraphModule,
    site: BNSite,
    path: list[fx.Node],
    n: fx.Node,
    u: fx.Node,
    rule: FoldRule,
    layer: nn.Module,
    k: int,
) -> torch.Tensor | None:
    """Decline unless the BN's channels reach the layer's input channels (conv) or map onto
    its features (Linear) through ``path`` with the shapes of input set ``k``; for a Linear,
    the BN channel of each input feature."""
    law = ChannelLaw.at_axis(shape_of(site.node, k), 1)  # type: ignore[arg-type]
    for step in path:
        carried = carry_law(gm, step, law, k)
        if carried is None:
            raise _Declined(Reason.CHANNEL_MISMATCH, f"channels do not survive {step.name}")
        law = carried
    x = shape_of(n, k)
    if x is None:
        raise _Declined(Reason.NEEDS_SHAPES, f"{site.name} -> {u.target}")
    if rule.channel_axis is ChannelAxis.BEFORE_SPATIAL:
        if law.axis_in(x) != len(x) + _layer_axis(rule, layer):
            raise _Declined(Reason.CHANNEL_MISMATCH, f"BN channels are not {u.target}'s input")
        return None
    features = x[-1]
    if features % (law.inner * law.channels):
        raise _Declined(
            Reason.CHANNEL_MISMATCH, f"BN channels do not map onto {u.target}'s features"
        )
    return (torch.arange(features) // law.inner) % law.channels


def _pads_with_zeros(layer: nn.Module) -> bool:
    if getattr(layer, "padding_mode", "zeros") != "zeros":
        return False  # reflect/replicate/circular pad with BN outputs: exact
    padding = layer.padding
    if padding == "valid":
        return False
    if padding == "same":
        return any(k > 1 for k in layer.kernel_size)  # type: ignore[union-attr]
    return any(p != 0 for p in padding)  # type: ignore[union-attr]


# --------------------------------------------------------------------------- rewriting


def _apply(state: _Pass, plan: _Plan) -> str:
    gm, calls = state.gm, state.calls
    layer = plan.layer
    groups = int(getattr(layer, "groups", 1))
    fold = (
        folding.fold_backward if plan.rule.direction is Direction.BACKWARD else folding.fold_forward
    )
    weight: torch.Tensor = layer.weight  # type: ignore[assignment]
    # a layer the graph reaches only through its one call: its folded copy may replace it
    alone = isinstance(layer, nn.Module) and calls[id(layer)] <= 1 and id(layer) not in state.seen
    w, b, overflow = fold(weight, layer.bias, plan.s, plan.t, plan.rule.kind, groups, weight.dtype)
    dtype = weight.dtype
    if layer.bias is not None and layer.bias.dtype != dtype:  # type: ignore[union-attr]
        b = b.to(layer.bias.dtype)  # type: ignore[union-attr]
        overflow = overflow or folding.overflowed(b)
    if overflow:
        raise _Declined(Reason.OVERFLOW, f"folded values exceed {dtype}")
    if isinstance(layer, FunctionalLayer):
        into = _install_functional(gm, plan.layer_node, layer, w, b)
        state.origin[str(plan.layer_node.args[1].target)] = layer.weight_target  # type: ignore[union-attr]
        return into
    new = _with_weights(layer, w, b)
    target = str(plan.layer_node.target)
    parent_name, _, leaf = target.rpartition(".")
    parent = submodule(gm, parent_name) if parent_name else gm
    if alone and id(parent) not in state.protected:
        parent._modules[leaf] = new
    else:
        state.copies[target] += 1
        new_target = f"{target.replace('.', '_')}_bnfold{state.copies[target]}"
        gm.add_submodule(new_target, new)
        plan.layer_node.target = new_target
        state.origin[new_target] = state.origin.get(target, target)
    calls[id(new)] = 1
    return target


def _with_weights(layer: nn.Module, w: torch.Tensor, b: torch.Tensor) -> nn.Module:
    """A shallow copy of ``layer`` (same class, settings and hooks) holding new tensors
    ``weight=w``, ``bias=b``, each a parameter or a buffer as the layer's own was (a fixed
    filter bank keeps its weight in a buffer); ``layer`` itself is left as it was."""
    requires_grad = bool(layer.weight.requires_grad)  # type: ignore[union-attr]
    cls: type[nn.Module] = type(layer)
    modules = dict(layer._modules)
    if parametrize.is_parametrized(layer):
        # weight/bias computed by parametrizations (the new weight_norm): the fold used
        # their values, so the copy is the plain layer class holding the folded ones
        cls = cls.__bases__[0]
        del modules["parametrizations"]
    new = object.__new__(cls)
    state = new.__dict__
    state.update(layer.__dict__)
    parameters, buffers = dict(layer._parameters), dict(layer._buffers)
    for name, value in (("weight", w), ("bias", b)):
        in_buffers = name in buffers or (name == "bias" and "weight" in buffers)
        if in_buffers and layer._parameters.get(name) is None:
            parameters.pop(name, None)
            buffers[name] = value
        else:
            buffers.pop(name, None)
            parameters[name] = nn.Parameter(value, requires_grad=requires_grad)
    state["_parameters"], state["_buffers"], state["_modules"] = parameters, buffers, modules
    return new


def _install_functional(
    gm: fx.GraphModule, node: fx.Node, layer: FunctionalLayer, w: torch.Tensor, b: torch.Tensor
) -> str:
    """Point a functional conv/linear call at new folded constants (never the old ones)."""
    base = layer.weight_target.replace(".", "_")
    name, k = f"{base}_bnfold", 1
    while hasattr(gm, name):
        k += 1
        name = f"{base}_bnfold{k}"
    gm.register_parameter(name, nn.Parameter(w, requires_grad=False))
    gm.register_parameter(name + "_bias", nn.Parameter(b, requires_grad=False))
    with gm.graph.inserting_before(node):
        w_node = gm.graph.get_attr(name)
        b_node = gm.graph.get_attr(name + "_bias")
    node.update_arg(1, w_node)
    if "bias" in node.kwargs:
        node.update_kwarg("bias", b_node)
    elif len(node.args) >= 3:
        node.update_arg(2, b_node)
    else:
        node.args = (*node.args[:2], b_node)
    return layer.weight_target.rsplit(".", 1)[0] if "." in layer.weight_target else node.name


def _remove_bn(gm: fx.GraphModule, site: BNSite) -> set[fx.Node]:
    site.node.replace_all_uses_with(site.input)
    gone = {site.node, *site.extra_nodes}
    gm.graph.erase_node(site.node)
    for extra in site.extra_nodes:
        if not extra.users:
            gm.graph.erase_node(extra)
    return gone


def _drop_unused(gm: fx.GraphModule, protected: AbstractSet[int]) -> None:
    """Delete what folding left unused: ``get_attr`` nodes of the constants of removed BNs
    and replaced layers (the only nodes a fold can orphan), then modules no node uses any
    more, never touching the original model's modules."""
    for n in [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]:
        gm.graph.erase_node(n)
    used = {""}  # every used target and each of its parents
    for n in gm.graph.nodes:
        if n.op in ("call_module", "get_attr"):
            parts = str(n.target).split(".")
            used.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    for name, _ in list(gm.named_modules()):
        if name in used:
            continue
        parent_name, _, leaf = name.rpartition(".")
        try:
            parent = submodule(gm, parent_name)
        except AttributeError:
            continue  # already removed with its parent
        if id(parent) not in protected and leaf in parent._modules:
            delattr(parent, leaf)


def count_params(module: nn.Module) -> int:
    """Values a model stores: parameters and floating-point buffers (BN statistics too)."""
    floats = [b for b in module.buffers() if b.is_floating_point()]
    return sum(math.prod(t.shape) for t in (*module.parameters(), *floats))

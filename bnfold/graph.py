"""Capture a model's data flow and describe its BatchNorm sites.

Capture uses ``torch.fx.symbolic_trace`` with BatchNorm, Conv and Linear modules as
leaves, so a module called twice shows up as two call sites and the order of the
graph is the order data flows, not the order modules were registered.  When
example inputs are known, ``torch.fx.passes.shape_prop.ShapeProp`` records every
tensor's shape, which is what proves that a BN's channel axis lines up with a
layer's features through flatten/reshape/transpose.

Channel tracking: a contiguous tensor whose channel ``c`` of ``C`` sits at
``(flat_index // inner) % C`` keeps that law through every reshape/view/flatten
(they keep the row-major order); a permute moves the axis and with it ``inner``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnfold.errors import CaptureError
from bnfold.rules import RULES, Direction, FoldKind, FoldRule

__all__ = [
    "BNSite",
    "ChannelLaw",
    "bn_site",
    "capture",
    "is_bn_module",
    "propagate_shapes",
    "submodule",
]

_BN_FUNCTIONS = {F.batch_norm, torch.batch_norm}
_ATEN_BN = {torch.ops.aten.batch_norm.default}
_ATEN_BN_NO_TRAINING = {torch.ops.aten._native_batch_norm_legit_no_training.default}
_RESHAPE_METHODS = {"flatten", "reshape", "view", "view_as", "reshape_as", "squeeze", "unsqueeze"}
_aten = torch.ops.aten
_RESHAPE_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    _aten.flatten.using_ints,
    _aten.reshape.default,
    _aten.view.default,
    _aten._unsafe_view.default,
    _aten.squeeze.dim,
    _aten.squeeze.dims,
    _aten.unsqueeze.default,
    _aten.reshape_as.default,
    _aten.view_as.default,
    _aten.contiguous.default,
    _aten.clone.default,
}
_PERMUTE_METHODS = {"transpose", "permute"}
_PERMUTE_FUNCTIONS = {torch.transpose, torch.permute, _aten.transpose.int, _aten.permute.default}
_SHAPE_ONLY_FUNCTIONS = {_aten.reshape_as.default, _aten.view_as.default, _aten.expand_as.default}
_IDENTITY_METHODS = {"contiguous", "clone"}
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def is_bn_module(module: nn.Module) -> bool:
    """BatchNorm1d/2d/3d, their subclasses, SyncBatchNorm, torchvision's FrozenBatchNorm2d."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return type(module).__name__ == "FrozenBatchNorm2d" and hasattr(module, "running_var")


def bn_kind(module: nn.Module) -> str:
    return type(module).__name__


_PLAIN_BN_FORWARDS = {nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward}


def has_plain_forward(module: nn.Module) -> bool:
    """True for BN modules whose forward is torch's own (or FrozenBatchNorm2d's)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return type(module).forward in _PLAIN_BN_FORWARDS
    return True


class _Tracer(fx.Tracer):
    """Keep BN, conv and linear modules (subclasses included) as single call sites.

    BN subclasses that override forward (timm's BatchNormAct2d: BN, then dropout and
    an activation) are traced through, so their inner functional batch_norm becomes a
    site of its own; ``opaque_custom_bn`` keeps them whole when they cannot be traced.
    """

    def __init__(self, opaque_custom_bn: bool = False):
        super().__init__()
        self.opaque_custom_bn = opaque_custom_bn
        self._traceable: dict[type, bool] = {}

    def _can_trace(self, m: nn.Module) -> bool:
        """Whether a custom BN's own forward traces (checked once per class)."""
        if type(m) not in self._traceable:
            try:
                _trace(m, opaque_custom_bn=True)
                self._traceable[type(m)] = True
            except Exception:  # noqa: BLE001 - e.g. a Python branch on the input's rank
                self._traceable[type(m)] = False
        return self._traceable[type(m)]

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_bn_module(m):
            if has_plain_forward(m) or self.opaque_custom_bn:
                return True
            return not self._can_trace(m)
        if isinstance(
            m,
            (
                nn.modules.conv._ConvNd,
                nn.Linear,
                nn.AdaptiveAvgPool1d,
                nn.AdaptiveAvgPool2d,
                nn.AdaptiveAvgPool3d,
                nn.Flatten,
            ),
        ):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace(module: nn.Module, opaque_custom_bn: bool = False) -> fx.Graph:
    tracer = _Tracer(opaque_custom_bn)
    try:
        return tracer.trace(module)
    finally:
        # fx's tracer ends up in a reference cycle (closures made while tracing) that only
        # the garbage collector frees: let go of the model now, so that a caller who drops
        # the model frees each layer as soon as the graph stops using it
        tracer.__dict__.clear()


def capture(module: nn.Module) -> fx.GraphModule:
    """The model's data flow as an fx graph (sharing, not copying, the model's modules)."""
    if isinstance(module, torch.jit.ScriptModule):
        raise CaptureError(
            "a TorchScript model's data flow cannot be captured for folding",
            hint="save model.state_dict() and pass --arch, or save a torch.export archive",
        )
    if isinstance(module, fx.GraphModule):  # a torch.export program: copy, never edit, its graph
        return fx.GraphModule(module, copy.deepcopy(module.graph), module.__class__.__name__)
    try:
        try:
            graph = _trace(module)
        except Exception:  # noqa: BLE001 - retry with custom BN subclasses kept whole
            graph = _trace(module, opaque_custom_bn=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CaptureError(
            f"torch.fx could not trace the model: {first}",
            hint="data-dependent control flow cannot be traced; export it with torch.export "
            "and pass the .pt2 file",
        ) from e
    name = module.__class__.__name__
    try:
        return fx.GraphModule(module, graph, name)
    except (TypeError, AttributeError, RuntimeError) as e:
        # e.g. a submodule called `meta` or `graph` clashes with GraphModule's own attributes
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CaptureError(
            f"torch.fx cannot hold the traced model: {first}",
            hint="a submodule named like a GraphModule attribute (meta, graph, code) must be "
            "renamed",
        ) from e


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Record every node's output shape in ``node.meta['shape']``.

    Runs the graph on fake tensors (shapes only, no arithmetic, no memory for weights);
    models whose code fake tensors cannot run are run for real.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    # ShapeProp prints a traceback of its own before raising; the caller reports the error
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        try:
            from torch._subclasses.fake_tensor import FakeTensorMode

            mode = FakeTensorMode(allow_non_fake_inputs=True)
            ShapeProp(gm, fake_mode=mode).propagate(*example_inputs)
        except Exception:  # noqa: BLE001 - data-dependent code: fall back to real tensors
            ShapeProp(gm).propagate(*example_inputs)
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            node.meta["shape"] = tuple(int(d) for d in meta.shape)


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    return node.meta.get("shape") if isinstance(node, fx.Node) else None


@dataclass
class BNSite:
    """One BatchNorm call in the graph, with its parameters (views of the model's tensors)."""

    node: fx.Node  # the node whose output is the normalised tensor
    input: fx.Node
    name: str
    kind: str
    module: nn.Module | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    training: bool
    extra_nodes: tuple[fx.Node, ...] = ()  # e.g. the getitem after a native batch_norm
    constant: bool = True

    @property
    def channels(self) -> int:
        ref = self.running_mean if self.running_mean is not None else self.weight
        return int(ref.shape[0]) if ref is not None else -1


def _attr(gm: fx.GraphModule, node: Any) -> torch.Tensor | bool | None:
    """The tensor a get_attr node names; False when the argument is not a constant."""
    if node is None:
        return None
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj if isinstance(obj, torch.Tensor) else False
    return False


def submodule(root: nn.Module, target: str) -> nn.Module:
    """``root.get_submodule(target)`` without its per-call checks (the fold pass asks often).

    Raises AttributeError, as ``get_submodule`` does, when there is no such module.
    """
    module = root
    for part in target.split(".") if target else ():
        try:
            module = module._modules[part]  # type: ignore[assignment]
        except KeyError:
            raise AttributeError(f"{type(module).__name__} has no submodule {part!r}") from None
    return module


def bn_site(gm: fx.GraphModule, node: fx.Node) -> BNSite | None:
    """The BN site at ``node``, or None when the node is not a BatchNorm."""
    if node.op == "call_module":
        module = submodule(gm, str(node.target))
        if not is_bn_module(module):
            return None
        return BNSite(
            node=node,
            input=node.args[0],  # type: ignore[arg-type]
            name=str(node.target),
            kind=bn_kind(module),
            module=module,
            running_mean=getattr(module, "running_mean", None),
            running_var=getattr(module, "running_var", None),
            weight=getattr(module, "weight", None),
            bias=getattr(module, "bias", None),
            eps=float(module.eps),  # type: ignore[arg-type]
            training=bool(module.training)
            and getattr(module, "track_running_stats", True) is not False,
        )
    if node.op != "call_function":
        return None
    if node.target in _BN_FUNCTIONS:
        bound = _bind(node, F.batch_norm)
        if node.target is torch.batch_norm:
            bound = _bind_aten_order(node)
        params = {k: bound.get(k) for k in ("running_mean", "running_var", "weight", "bias")}
        training, eps, extra = bound.get("training", False), bound.get("eps", 1e-5), ()
        out = node
    elif node.target in _ATEN_BN:
        bound = _bind_aten_order(node)
        params = {k: bound.get(k) for k in ("running_mean", "running_var", "weight", "bias")}
        training, eps, extra, out = bound.get("training"), bound.get("eps"), (), node
    elif node.target in _ATEN_BN_NO_TRAINING:
        a = node.args
        params = {"weight": a[1], "bias": a[2], "running_mean": a[3], "running_var": a[4]}
        training, eps = False, a[6]
        users = list(node.users)
        if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
            return None
        out, extra = users[0], (node,)
    else:
        return None
    tensors = {k: _attr(gm, v) for k, v in params.items()}
    constant = all(v is not False for v in tensors.values()) and isinstance(training, bool)
    name = _functional_name(node, params)
    kind = "functional batch_norm"
    try:
        owner = submodule(gm, name)
        kind = f"{type(owner).__name__} (traced)" if type(owner) is not nn.Module else kind
    except AttributeError:
        pass
    return BNSite(
        node=out,
        input=node.args[0],  # type: ignore[arg-type]
        name=name,
        kind=kind,
        module=None,
        running_mean=_tensor_or_none(tensors["running_mean"]),  # type: ignore[arg-type]
        running_var=_tensor_or_none(tensors["running_var"]),  # type: ignore[arg-type]
        weight=_tensor_or_none(tensors["weight"]),  # type: ignore[arg-type]
        bias=_tensor_or_none(tensors["bias"]),  # type: ignore[arg-type]
        eps=float(eps) if isinstance(eps, (int, float)) else 1e-5,
        training=bool(training) if isinstance(training, bool) else True,
        extra_nodes=extra,
        constant=constant,
    )


def _tensor_or_none(value: Any) -> torch.Tensor | None:
    return value if isinstance(value, torch.Tensor) else None


def _functional_name(node: fx.Node, params: dict[str, Any]) -> str:
    mean = params.get("running_mean")
    if isinstance(mean, fx.Node) and mean.op == "get_attr":
        target = str(mean.target)
        return target.rsplit(".", 1)[0] if "." in target else target
    stack = node.meta.get("nn_module_stack")
    if stack:
        return str(list(stack.values())[-1][0]) or node.name
    return node.name


def _bind(node: fx.Node, fn: Any) -> dict[str, Any]:
    try:
        return dict(inspect.signature(fn).bind(*node.args, **node.kwargs).arguments)
    except TypeError:
        return {}


def _bind_aten_order(node: fx.Node) -> dict[str, Any]:
    names = (
        "input",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "training",
        "momentum",
        "eps",
        "cudnn_enabled",
    )
    bound = dict(zip(names, node.args, strict=False))
    bound.update(node.kwargs)
    return bound


# --------------------------------------------------------------------------- functional layers


def _resolve(name: str) -> object:
    """A rule's torch function name ("F.conv2d", "aten.conv2d.default") as the object."""
    if name.startswith("F."):
        return getattr(F, name[2:])
    _, op, overload = name.split(".")
    return getattr(getattr(torch.ops.aten, op), overload)


@functools.cache
def _rule_tables() -> tuple[
    tuple[tuple[FoldRule, tuple[type[nn.Module], ...]], ...], dict[object, FoldRule]
]:
    """The rules as torch classes (per rule) and functions (backward rules, by target)."""
    modules = tuple((r, tuple(getattr(nn, n) for n in r.layer.torch_modules)) for r in RULES)
    functions = {
        _resolve(name): r
        for r in RULES
        if r.direction is Direction.BACKWARD
        for name in r.layer.torch_functions
    }
    return modules, functions


def module_rule(module: nn.Module, direction: Direction) -> FoldRule | None:
    """The rule matching ``module`` in ``direction``; subclasses of the layer types match."""
    for rule, classes in _rule_tables()[0]:
        if rule.direction is direction and isinstance(module, classes):
            return rule
    return None


def function_rule(target: object) -> FoldRule | None:
    """The backward rule for a functional conv/linear call (torch.export graphs)."""
    try:
        return _rule_tables()[1].get(target)
    except TypeError:  # an unhashable target
        return None


@dataclass
class FunctionalLayer:
    """A conv/linear *call* on constant weights (as torch.export graphs hold them)."""

    weight_target: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int
    out_features: int


def functional_layer(gm: fx.GraphModule, node: fx.Node) -> FunctionalLayer | None:
    """The functional conv/linear at ``node`` when its weight and bias are constants."""
    rule = function_rule(node.target) if node.op == "call_function" else None
    if rule is None:
        return None
    args = list(node.args)
    weight_node = args[1] if len(args) > 1 else node.kwargs.get("weight")
    bias_node = args[2] if len(args) > 2 else node.kwargs.get("bias")
    weight, bias = _attr(gm, weight_node), _attr(gm, bias_node)
    if not isinstance(weight, torch.Tensor) or bias is False:
        return None
    groups_index = 6
    groups = args[groups_index] if len(args) > groups_index else node.kwargs.get("groups", 1)
    if not isinstance(groups, int):
        return None
    out = weight.shape[1] * groups if rule.kind is FoldKind.CONVT_OUT else weight.shape[0]
    return FunctionalLayer(
        str(weight_node.target),
        weight,  # type: ignore[union-attr]
        bias if isinstance(bias, torch.Tensor) else None,
        groups,
        int(out),
    )


# --------------------------------------------------------------------------- channel laws


@dataclass(frozen=True)
class ChannelLaw:
    """Channel ``c`` of ``channels`` sits at ``(flat_index // inner) % channels``."""

    channels: int
    inner: int

    @staticmethod
    def at_axis(shape: Sequence[int], axis: int) -> ChannelLaw:
        axis = axis % len(shape)
        return ChannelLaw(int(shape[axis]), math.prod(shape[axis + 1 :]))

    def axis_in(self, shape: Sequence[int]) -> int | None:
        """The axis of ``shape`` that holds exactly the channels, or None."""
        for axis in range(len(shape)):
            if shape[axis] == self.channels and math.prod(shape[axis + 1 :]) == self.inner:
                return axis
        return None


_SHAPE_ONLY_METHODS = {"reshape_as", "view_as", "expand_as", "new_zeros", "new_ones", "new_empty"}


def value_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node``'s values; uses of its shape alone (``y.reshape_as(node)``,
    ``node.size()``, ``node.shape``) do not change when a fold rescales the values."""
    users = []
    for u in node.users:
        if u.op == "call_method" and u.target in _SHAPE_ONLY_METHODS and node not in u.args[:1]:
            continue
        if u.op == "call_method" and u.target in ("size", "dim"):
            continue
        if u.op == "call_function" and u.target is getattr and u.args[1] in ("shape", "ndim"):
            continue
        if u.op == "call_function" and u.target in _SHAPE_ONLY_FUNCTIONS and node not in u.args[:1]:
            continue
        if u.op == "call_function" and u.target is _aten.sym_size.int:
            continue
        users.append(u)
    return users


def is_layout_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A node that only moves elements (or is the identity in eval)."""
    if node.op == "call_method":
        return node.target in _RESHAPE_METHODS | _PERMUTE_METHODS | _IDENTITY_METHODS
    if node.op == "call_function":
        return node.target in _RESHAPE_FUNCTIONS | _PERMUTE_FUNCTIONS
    if node.op == "call_module":
        m = submodule(gm, str(node.target))
        return isinstance(m, (*_IDENTITY_MODULES, nn.Flatten)) or _is_global_pool(m)
    return False


def _is_global_pool(m: nn.Module) -> bool:
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        size = m.output_size
        sizes = size if isinstance(size, tuple) else (size,)
        return all(s == 1 for s in sizes)
    return False


def carry_law(gm: fx.GraphModule, node: fx.Node, law: ChannelLaw) -> ChannelLaw | None:
    """The channel law after ``node`` given the law of its input, or None if it breaks."""
    src, dst = shape_of(node.args[0]), shape_of(node)  # type: ignore[arg-type]
    if src is None or dst is None:
        return None
    is_module = node.op == "call_module"
    module = submodule(gm, str(node.target)) if is_module else None
    if module is not None and _is_global_pool(module):
        axis = law.axis_in(src)
        if axis != 1:
            return None
        return ChannelLaw.at_axis(dst, 1)
    if (node.op == "call_method" and node.target in _PERMUTE_METHODS) or (
        node.op == "call_function" and node.target in _PERMUTE_FUNCTIONS
    ):
        axis = law.axis_in(src)
        if axis is None:
            return None
        order = _permutation(node, len(src))
        if order is None:
            return None
        return ChannelLaw.at_axis(dst, order.index(axis))
    # reshape, view, flatten, squeeze, identity: row-major order is unchanged
    return law if math.prod(src) == math.prod(dst) else None


def _permutation(node: fx.Node, rank: int) -> list[int] | None:
    args = list(node.args[1:])
    if node.target in ("transpose", torch.transpose, _aten.transpose.int):
        if len(args) != 2:
            return None
        a, b = (int(x) % rank for x in args)
        order = list(range(rank))
        order[a], order[b] = order[b], order[a]
        return order
    dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
    dims = node.kwargs.get("dims", dims)
    try:
        return [int(d) % rank for d in dims]
    except (TypeError, ValueError):
        return None

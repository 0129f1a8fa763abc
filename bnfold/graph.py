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
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnfold.errors import CaptureError
from bnfold.rules import RULES, Direction, FoldKind, FoldRule

__all__ = [
    "BNSite",
    "Captured",
    "ChannelLaw",
    "attribute",
    "bn_site",
    "capture",
    "capture_model",
    "dynamic_shapes",
    "export_program",
    "is_bn_module",
    "propagate_shapes",
    "submodule",
    "traced_shapes",
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
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_IDENTITY_MODULES = (nn.Identity, *_DROPOUTS)
_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


# --------------------------------------------------------------------------- module kinds


def _trusted_class(klass: type) -> bool:
    """torch.nn's own classes, and torchvision's FrozenBatchNorm2d."""
    module = klass.__module__
    return module.startswith("torch.nn.modules.") or (
        module == "torchvision.ops.misc" and klass.__qualname__ == "FrozenBatchNorm2d"
    )


# what a class may define and still compute what its torch base computes
_HARMLESS = frozenset(
    {
        "__init__",
        "__repr__",
        "extra_repr",
        "reset_parameters",
        "_load_from_state_dict",
        "__setstate__",
        "__getstate__",
        "__init_subclass__",
        "__class_getitem__",
    }
)
_CLASS_DATA = frozenset(
    {
        "__module__",
        "__qualname__",
        "__doc__",
        "__dict__",
        "__weakref__",
        "__annotations__",
        "__annotate__",
        "__firstlineno__",
        "__static_attributes__",
        "__orig_bases__",
        "__parameters__",
        "__slots__",
        "__abstractmethods__",
        "_abc_impl",
    }
)


def is_plain(module: nn.Module) -> bool:
    """Whether ``module`` computes exactly what its torch class computes.

    True for torch.nn's classes (and torchvision's FrozenBatchNorm2d), and for subclasses
    that add data but no behaviour: every class between the module's own and the torch
    class defines no method, property or other descriptor beyond ``__init__`` and the
    like (``_HARMLESS``), and the instance overrides no method.  A subclass that overrides
    ``forward``, ``_conv_forward``, ``weight`` as a property, ... is not plain, whatever it
    computes: bnfold cannot see through it.
    """
    return not_plain_because(module) is None


def not_plain_because(module: nn.Module, cls: type | None = None) -> str | None:
    """Why ``module`` (seen as an instance of ``cls``, its class by default) is not plain:
    the name of the first member that adds behaviour, or None when it is plain."""
    for name, value in vars(module).items():
        if callable(value):
            return f"the instance's own {name}"
    for klass in (cls or type(module)).__mro__:
        if _trusted_class(klass):
            return None
        for name, value in vars(klass).items():
            if name in _HARMLESS or name in _CLASS_DATA:
                continue
            if callable(value) or hasattr(type(value), "__get__"):
                return f"{klass.__name__}.{name}"
    return f"{type(module).__name__} is not a torch.nn class"


def has_hooks(module: nn.Module) -> bool:
    """Forward hooks or pre-hooks on ``module`` (they run at its call)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def global_hooks() -> bool:
    """Forward hooks registered for every module (``register_module_forward_hook``)."""
    from torch.nn.modules import module as torch_module

    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def is_bn_module(module: nn.Module) -> bool:
    """BatchNorm-like: torch's BatchNorm classes and their subclasses, SyncBatchNorm, and any
    class named like a BatchNorm that holds running statistics (FrozenBatchNorm2d of
    torchvision, detectron2, maskrcnn-benchmark, ...).  Only ``is_trusted_bn`` ones fold
    as modules."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return "BatchNorm" in type(module).__name__ and hasattr(module, "running_var")


def is_trusted_bn(module: nn.Module) -> bool:
    """A BN module bnfold knows computes ``(x - running_mean) / sqrt(running_var + eps) *
    weight + bias`` in eval mode: a plain torch BatchNorm class, or torchvision's own
    FrozenBatchNorm2d.  Another library's FrozenBatchNorm2d (its own forward, maybe no eps)
    is not."""
    if not is_plain(module):
        return False
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return any(
        k.__module__ == "torchvision.ops.misc" and k.__qualname__ == "FrozenBatchNorm2d"
        for k in type(module).__mro__
    )


def bn_kind(module: nn.Module) -> str:
    return type(module).__name__


def has_plain_forward(module: nn.Module) -> bool:
    """True for BN modules bnfold trusts (``is_trusted_bn``)."""
    return is_trusted_bn(module)


class _Tracer(fx.Tracer):
    """Keep BN, conv and linear modules (subclasses included) as single call sites.

    Modules with forward hooks stay whole (opaque): the graph calls them, so their hooks
    run, and nothing folds through them.  BN classes bnfold does not trust (a subclass
    that overrides forward, like timm's BatchNormAct2d: BN, then dropout and an
    activation) are traced through, so their inner functional batch_norm becomes a site
    of its own; ``opaque_custom_bn`` keeps them whole when they cannot be traced.
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
        if has_hooks(m):
            return True
        if is_bn_module(m):
            if is_trusted_bn(m) or self.opaque_custom_bn:
                return True
            return not self._can_trace(m)
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, *_POOLS, nn.Flatten)):
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
    """The model's data flow as an fx graph (sharing, not copying, the model's modules).

    CaptureError when torch.fx cannot trace it, or could not trace it faithfully: forward
    hooks on the model itself, or hooks registered for every module, would not run in the
    traced graph (torch.export sees through them: ``capture_model`` falls back to it).
    """
    if isinstance(module, torch.jit.ScriptModule):
        raise CaptureError(
            "a TorchScript model's data flow cannot be captured for folding",
            hint="save model.state_dict() and pass --arch, or save a torch.export archive",
        )
    if isinstance(module, fx.GraphModule):  # a torch.export program: copy, never edit, its graph
        gm = _graph_module(module, copy.deepcopy(module.graph), module.__class__.__name__)
        normalize_calls(gm)
        return gm
    if has_hooks(module):
        raise CaptureError("torch.fx would drop the forward hooks on the model itself")
    if global_hooks():
        raise CaptureError(
            "global module forward hooks are registered, which torch.fx cannot place"
        )
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
    gm = _graph_module(module, graph, module.__class__.__name__)
    normalize_calls(gm)
    return gm


def _graph_module(root: nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule:
    try:
        return fx.GraphModule(root, graph, name)
    except (TypeError, AttributeError, RuntimeError) as e:
        # e.g. a submodule called `meta` or `graph` clashes with GraphModule's own attributes
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CaptureError(
            f"torch.fx cannot hold the traced model: {first}",
            hint="a submodule named like a GraphModule attribute (meta, graph, code) must be "
            "renamed",
        ) from e


@dataclass
class Captured:
    """A captured graph, how it was captured, and for which batch sizes its shapes hold."""

    module: fx.GraphModule
    how: str  # "fx" or "export" (torch.export, strict=False or True)
    why: str | None  # why torch.fx was not used (None when it was)
    dynamic_batch: bool  # shapes were proven at a second batch size as well
    note: str | None = None  # why a dynamic batch was given up, when it was
    # for a torch.export capture, what its program says beyond the graph (the batch
    # symbol's range, the call signature): the folded graph is handed to the ONNX exporter
    # as a program again (``export.as_program``) instead of being traced a second time
    program: ProgramSpec | None = None


@dataclass(frozen=True)
class ProgramSpec:
    """What an ``ExportedProgram`` holds besides its graph and weights."""

    range_constraints: dict[Any, Any]
    module_call_graph: list[Any]


def capture_model(
    model: nn.Module,
    example: Sequence[torch.Tensor],
    other: Sequence[torch.Tensor] | None = None,
    static: Sequence[torch.Tensor] | None = None,
) -> Captured:
    """Capture ``model``'s data flow and record its shapes on ``example`` (and ``other``,
    the same inputs at another batch size, when the batch axis is to be dynamic).

    torch.fx first, which keeps modules whole; when it cannot trace the model, or could
    not faithfully (hooks on the model itself), or its graph does not run on the inputs,
    torch.export, non-strict then strict, as ``torch.onnx.export`` itself tries them.
    A capture whose batch axis is dynamic is preferred; failing that, each is tried again
    with a static batch, on ``static`` (the inputs at the batch size the user gave,
    ``example`` by default), so that a model that only runs at that batch size (a ``.pt2``
    exported at batch 1) is captured static, and the ``Captured`` says why.  CaptureError
    when nothing works, quoting each failure.
    """
    failures: list[str] = []
    hints: list[str] = []
    dynamic_sets = [list(example), list(other)] if other is not None else None
    static_set = list(static if static is not None else example)
    traced: fx.GraphModule | None = None
    try:
        traced = capture(model)
    except CaptureError as e:
        failures.append(f"torch.fx: {e.message}")
        hints += [e.hint] if e.hint else []
    attempts: list[tuple[str, bool | None]] = [("fx", None)] if traced is not None else []
    attempts += [("export", False), ("export", True)]
    for batch in ("dynamic", "static") if dynamic_sets is not None else ("static",):
        sets = dynamic_sets if batch == "dynamic" else [static_set]
        assert sets is not None
        for how, strict in attempts:
            label = "torch.fx" if how == "fx" else f"torch.export(strict={strict})"
            program: torch.export.ExportedProgram | None = None
            if how == "fx":
                gm = traced
            else:
                gm, program = _exported(
                    model, sets[0], batch == "dynamic", bool(strict), label, failures, hints
                )
            if gm is None:
                continue
            try:
                if program is None or not traced_shapes(gm, program, sets):
                    propagate_shapes(gm, *sets)
            except Exception as e:  # noqa: BLE001 - data-dependent shapes, a guard on the batch
                sizes = " and ".join(str(_batch_of(s)) for s in sets)
                failures.append(
                    f"{label}: the graph does not run at batch size {sizes}: {_first(e)}"
                )
                continue
            dynamic = batch == "dynamic"
            note = None
            if dynamic_sets is not None and not dynamic:
                note = "the batch axis cannot be dynamic: " + "; ".join(failures[-2:])
            why = failures[0] if how == "export" and traced is None else None
            if how == "export" and traced is not None:
                why = next((f for f in failures if f.startswith("torch.fx")), None)
            spec = None
            if program is not None:
                spec = ProgramSpec(dict(program.range_constraints), program.module_call_graph)
            return Captured(gm, how, why, dynamic, note, spec)
    raise CaptureError(
        "the model's data flow could not be captured: " + "; ".join(failures),
        hint="; ".join(hints)
        or "check --input-shape: torch.onnx.export cannot export the model on these inputs either",
    )


def _exported(
    model: nn.Module,
    inputs: list[torch.Tensor],
    dynamic: bool,
    strict: bool,
    label: str,
    failures: list[str],
    hints: list[str],
) -> tuple[fx.GraphModule | None, torch.export.ExportedProgram | None]:
    """The graph torch.export captures and its program, or None with the failure noted."""
    try:  # fresh tensors: a failed export leaves its marks on the ones it was given
        program = export_program(model, [t.clone() for t in inputs], dynamic, strict)
    except Exception as e:  # noqa: BLE001 - every capture failure is quoted in the end
        failures.append(f"{label}{' with a dynamic batch' if dynamic else ''}: {_first(e)}")
        return None, None
    try:
        return capture(_unlifted(program)), program
    except CaptureError as e:
        failures.append(f"{label}: {e.message}")
        hints += [e.hint] if e.hint and e.hint not in hints else []
        return None, None


def _unlifted(program: torch.export.ExportedProgram) -> nn.Module:
    """The program as a module whose graph reads its weights by name (``get_attr``)."""
    try:
        return program.module()
    except (TypeError, AttributeError, RuntimeError) as e:
        raise CaptureError(
            f"torch.export's program cannot be held as a module: {_first(e)}",
            hint="a submodule named like a GraphModule attribute (meta, graph, code) must be "
            "renamed",
        ) from e


def dynamic_shapes(example: Sequence[torch.Tensor]) -> tuple[dict[int, Any] | None, ...]:
    """torch.export's ``dynamic_shapes`` for a dynamic batch axis: axis 0 of every input
    whose first axis is the batch, one shared ``Dim``; inputs without one stay static."""
    batch = torch.export.Dim("batch")
    size = _batch_of(example)
    return tuple({0: batch} if t.dim() > 0 and t.shape[0] == size else None for t in example)


def export_program(
    model: nn.Module, example: Sequence[torch.Tensor], dynamic: bool, strict: bool = False
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` on ``example``, the batch axis dynamic or not,
    with torch's own logging silenced (its tracebacks are quoted in one line instead)."""
    import logging
    import warnings

    shapes = dynamic_shapes(example) if dynamic else None
    loggers = [logging.getLogger(n) for n in ("torch._dynamo", "torch.export", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            with _attributes_kept(model):
                return torch.export.export(
                    model, tuple(example), dynamic_shapes=shapes, strict=strict
                )
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _attributes_kept(model: nn.Module) -> Iterator[None]:
    """Put every module's attributes back as they were before torch.export traced it.

    A trace runs the model's own Python on fake tensors: whatever ``forward`` stores on
    its modules stays there.  torch.export puts back the attributes a module had, but not
    new ones: ultralytics' detection head caches its anchors and the input shape in
    instance attributes that shadow class attributes, which would stay fake tensors and
    symbolic sizes, and the model would fail, or pin the program's batch size, the next
    time it runs for real (the batch size it was exported at).
    """
    saved = [
        (m, dict(vars(m)), dict(m._parameters), dict(m._buffers), dict(m._modules))
        for m in model.modules()
    ]
    try:
        yield
    finally:
        for module, attributes, parameters, buffers, children in saved:
            for store, before in (
                (module._parameters, parameters),
                (module._buffers, buffers),
                (module._modules, children),
            ):
                store.clear()
                store.update(before)
            vars(module).clear()
            vars(module).update(attributes)


def _batch_of(inputs: Sequence[torch.Tensor]) -> int | None:
    sizes = {int(t.shape[0]) for t in inputs if t.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _first(e: BaseException, limit: int = 160) -> str:
    """An exception in a few words: its first non-empty line, without colour codes."""
    lines = [line.strip() for line in _ANSI.sub("", str(e)).splitlines() if line.strip()]
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:limit]}"


# parameter names, in order, of the calls whose arguments the fold pass reads
_PARAMETERS: dict[object, tuple[str, ...]] = {
    **dict.fromkeys(
        (F.conv1d, F.conv2d, F.conv3d),
        ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    ),
    **dict.fromkeys(
        (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d),
        ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
    ),
    F.linear: ("input", "weight", "bias"),
    F.batch_norm: (
        "input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps",
    ),
    torch.batch_norm: (
        "input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
        "cudnn_enabled",
    ),
    torch.flatten: ("input", "start_dim", "end_dim"),
    torch.reshape: ("input", "shape"),
    torch.transpose: ("input", "dim0", "dim1"),
    torch.permute: ("input", "dims"),
    torch.squeeze: ("input", "dim"),
    torch.unsqueeze: ("input", "dim"),
}  # fmt: skip
_METHOD_PARAMETERS = {
    "transpose": ("dim0", "dim1"),
    "flatten": ("start_dim", "end_dim"),
    "squeeze": ("dim",),
    "unsqueeze": ("dim",),
}


def _positional_names(forward: Any) -> tuple[str, ...]:
    """The parameters of a module's ``forward`` that can be given by position, after self."""
    try:
        parameters = list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return ()
    names = []
    for p in parameters:
        if p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            break
        names.append(p.name)
    return tuple(names)


def normalize_calls(gm: fx.GraphModule) -> None:
    """Move keyword arguments of the calls the fold pass reads into positional ones
    (``bn(input=x)``, ``F.conv2d(x, weight=w)``, ``torch.flatten(x, start_dim=1)``), as
    far as every earlier parameter is given, so that ``node.args[0]`` is the input."""
    for node in gm.graph.nodes:
        if not node.kwargs:
            continue
        if node.op == "call_module":
            names: tuple[str, ...] = _positional_names(
                type(submodule(gm, str(node.target))).forward
            )
        elif node.op == "call_function":
            try:
                names = _PARAMETERS.get(node.target, ())
            except TypeError:  # an unhashable target
                continue
        elif node.op == "call_method" and node.target in _METHOD_PARAMETERS:
            names = ("self", *_METHOD_PARAMETERS[node.target])
        else:
            continue
        args, kwargs = list(node.args), dict(node.kwargs)
        for name in names[len(args) :]:
            if name not in kwargs:
                break
            args.append(kwargs.pop(name))
        node.args, node.kwargs = tuple(args), kwargs


def propagate_shapes(
    gm: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    *others: Sequence[torch.Tensor],
) -> None:
    """Record every node's output shape in ``node.meta['shape']``, and in
    ``node.meta['shapes']`` one shape per input set: ``example_inputs``, then ``others``.

    A fold's channel alignment must hold for every set (``shape_of(node, k)``): an export
    with a dynamic batch axis passes a second batch size, so that a reshape that lines the
    channels up only at the example's batch size (``conv(x).transpose(0, 1).reshape(...)``
    is the identity at batch 1) is not taken for a proof.  Runs the graph on fake tensors
    (shapes only, no arithmetic, no memory for weights); models whose code fake tensors
    cannot run are run for real.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.shape_prop import ShapeProp

    found: dict[fx.Node, list[tuple[int, ...] | None]] = {n: [] for n in gm.graph.nodes}
    fake: ShapeProp | None = None  # one fake copy of the model for every input set
    for inputs in (example_inputs, *others):
        for node in gm.graph.nodes:
            node.meta.pop("tensor_meta", None)
        # ShapeProp prints a traceback of its own before raising; the caller reports it
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            try:
                if fake is None:
                    fake = ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True))
                fake.propagate(*inputs)
            except Exception:  # noqa: BLE001 - data-dependent code: fall back to real tensors
                ShapeProp(gm).propagate(*inputs)
        for node in gm.graph.nodes:
            meta = node.meta.get("tensor_meta")
            shape = None
            if meta is not None and hasattr(meta, "shape"):
                shape = tuple(int(d) for d in meta.shape)
            found[node].append(shape)
    _record_shapes(found)


def traced_shapes(
    gm: fx.GraphModule,
    program: torch.export.ExportedProgram,
    input_sets: Sequence[Sequence[torch.Tensor]],
) -> bool:
    """Record shapes as ``propagate_shapes`` does, read from the program ``gm`` was
    unlifted from instead of recomputed: torch.export gives every node a shape in terms of
    the batch symbol, proven for the symbol's whole range, so each input set's shapes are
    that symbol replaced by its batch size.  False (nothing recorded) when any input does
    not bind plainly (a size that is an expression, out of the range, or disagrees), or a
    node's shape does not resolve (a data-dependent size): ``propagate_shapes`` runs then.

    Only for a program exported here and now: a ``.pt2`` file's recorded shapes are the
    file's word, and a file's word is no proof.
    """
    import sympy

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    bindings: list[dict[Any, int]] = []
    for inputs in input_sets:
        if len(inputs) != len(placeholders):
            return False
        env: dict[Any, int] = {}
        for node, tensor in zip(placeholders, inputs, strict=True):
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor) or val.dim() != tensor.dim():
                return False
            for dim, size in zip(val.shape, tensor.shape, strict=True):
                if not isinstance(dim, torch.SymInt):
                    if int(dim) != size:
                        return False
                    continue
                symbol = dim.node.expr
                bounds = program.range_constraints.get(symbol)
                if not isinstance(symbol, sympy.Symbol) or bounds is None:
                    return False
                if not bounds.lower <= size <= bounds.upper or env.setdefault(symbol, size) != size:
                    return False
        bindings.append(env)
    found: dict[fx.Node, list[tuple[int, ...] | None]] = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            shapes = [_resolved(val.shape, env) for env in bindings]
            if any(shape is None for shape in shapes):
                return False
            found[node] = shapes
        else:
            found[node] = [None] * len(bindings)
    _record_shapes(found)
    return True


def _resolved(shape: Sequence[Any], env: dict[Any, int]) -> tuple[int, ...] | None:
    """A symbolic shape with its symbols replaced by ``env``'s sizes, None if any remain."""
    import sympy

    sizes = []
    for dim in shape:
        if isinstance(dim, torch.SymInt):
            dim = sympy.sympify(dim.node.expr).subs(env)
            if not dim.is_Integer:
                return None
        sizes.append(int(dim))
    return tuple(sizes)


def _record_shapes(found: dict[fx.Node, list[tuple[int, ...] | None]]) -> None:
    """Each node's shape per input set in ``meta['shapes']``, the first in ``meta['shape']``."""
    for node, shapes in found.items():
        node.meta["shapes"] = tuple(shapes)
        if shapes[0] is not None:
            node.meta["shape"] = shapes[0]


def shape_of(node: fx.Node, k: int = 0) -> tuple[int, ...] | None:
    """``node``'s output shape for the ``k``-th input set given to ``propagate_shapes``."""
    if not isinstance(node, fx.Node):
        return None
    shapes = node.meta.get("shapes")
    if shapes is None:
        return node.meta.get("shape") if k == 0 else None
    return shapes[k] if k < len(shapes) else None


def shape_sets(gm: fx.GraphModule) -> int:
    """How many input sets ``propagate_shapes`` ran (0 when it did not run)."""
    for node in gm.graph.nodes:
        if "shapes" in node.meta:
            return len(node.meta["shapes"])
    return 0


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

    def affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The eval-mode map ``s * x + t`` (float64, ``folding.bn_affine``), or None when
        it is not finite; only for a site with running statistics."""
        from bnfold import folding

        assert self.running_mean is not None and self.running_var is not None
        s, t = folding.bn_affine(
            self.running_mean, self.running_var, self.weight, self.bias, self.eps
        )
        return (s, t) if folding.all_finite(s, t, self.running_var) else None


def _attr(gm: fx.GraphModule, node: Any) -> torch.Tensor | bool | None:
    """The tensor a get_attr node names; False when the argument is not a constant."""
    if node is None:
        return None
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj = attribute(gm, str(node.target))
        return obj if isinstance(obj, torch.Tensor) else False
    return False


def attribute(root: nn.Module, target: str) -> Any:
    """What a ``get_attr`` target (``"layer.0.weight"``) names on ``root``."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


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
    """A node a BatchNorm's per-channel affine map passes through exactly: it only moves
    elements (reshape, permute, identity in eval), or averages within each channel
    (average pooling without padding, a mean over other axes: ``avg(s*x + t) = s*avg(x) +
    t``).  ``carry_law`` then checks, with shapes, that the channels really survive it."""
    if node.op == "call_method":
        return node.target in _RESHAPE_METHODS | _PERMUTE_METHODS | _IDENTITY_METHODS | {"mean"}
    if node.op == "call_function":
        try:
            return node.target in _RESHAPE_FUNCTIONS | _PERMUTE_FUNCTIONS | _MEANS | set(_AVERAGES)
        except TypeError:  # an unhashable target
            return False
    if node.op == "call_module":
        m = submodule(gm, str(node.target))
        if has_hooks(m) or not is_plain(m):
            return False  # a subclass with its own forward (GeM pooling, ...) or hooks
        if isinstance(m, _DROPOUTS) and m.training and m.p > 0:
            return False  # dropout kept active at inference (MC dropout)
        return isinstance(m, (*_IDENTITY_MODULES, nn.Flatten)) or _pooled_axes(m) is not None
    return False


_MEANS = {torch.mean, _aten.mean.dim}
_AVERAGES = {  # adaptive average pooling, by the number of spatial axes it averages
    F.adaptive_avg_pool1d: 1,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3,
    _aten.adaptive_avg_pool1d.default: 1,
    _aten.adaptive_avg_pool2d.default: 2,
    _aten.adaptive_avg_pool3d.default: 3,
    _aten._adaptive_avg_pool2d.default: 2,
    _aten._adaptive_avg_pool3d.default: 3,
}
_AVG_POOLS = (
    (nn.AdaptiveAvgPool1d, nn.AvgPool1d),
    (nn.AdaptiveAvgPool2d, nn.AvgPool2d),
    (nn.AdaptiveAvgPool3d, nn.AvgPool3d),
)


def _pooled_axes(m: nn.Module) -> int | None:
    """How many trailing (spatial) axes an average-pooling module averages within each
    channel, or None: adaptive average pooling always; AvgPool when no padded zero counts
    (no padding, or ``count_include_pad=False``) and no divisor is imposed."""
    for dims, (adaptive, plain) in enumerate(_AVG_POOLS, start=1):
        if isinstance(m, adaptive):
            return dims
        if isinstance(m, plain):
            padding = m.padding if isinstance(m.padding, tuple) else (m.padding,)
            unpadded = all(p == 0 for p in padding) or not m.count_include_pad
            if unpadded and getattr(m, "divisor_override", None) is None:
                return dims
    return None


def carry_law(gm: fx.GraphModule, node: fx.Node, law: ChannelLaw, k: int = 0) -> ChannelLaw | None:
    """The channel law after ``node`` given the law of its input (shapes of input set
    ``k``), or None if it breaks."""
    src, dst = shape_of(node.args[0], k), shape_of(node, k)  # type: ignore[arg-type]
    if src is None or dst is None:
        return None
    pooled = _averaged_axes(gm, node)
    if pooled is not None:  # the channel axis must be the one before the pooled axes
        axis = law.axis_in(src)
        if axis is None or axis != len(src) - pooled - 1 or len(dst) != len(src):
            return None
        return ChannelLaw.at_axis(dst, axis)
    if (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target in _MEANS
    ):
        return _after_mean(node, law, src, dst)
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


def _averaged_axes(gm: fx.GraphModule, node: fx.Node) -> int | None:
    if node.op == "call_module":
        return _pooled_axes(submodule(gm, str(node.target)))
    if node.op == "call_function":
        try:
            return _AVERAGES.get(node.target)
        except TypeError:
            return None
    return None


def _after_mean(
    node: fx.Node, law: ChannelLaw, src: tuple[int, ...], dst: tuple[int, ...]
) -> ChannelLaw | None:
    """The law after a mean over axes that do not hold the channels (else None)."""
    args = list(node.args[1:])
    dims = args[0] if args else node.kwargs.get("dim")
    keepdim = bool(args[1] if len(args) > 1 else node.kwargs.get("keepdim", False))
    if dims is None or node.kwargs.get("dtype") is not None:
        return None
    axis = law.axis_in(src)
    listed = dims if isinstance(dims, (list, tuple)) else [dims]
    try:
        reduced = {int(d) % len(src) for d in listed}
    except (TypeError, ValueError):
        return None
    if axis is None or axis in reduced:
        return None
    new_axis = axis if keepdim else axis - sum(d < axis for d in reduced)
    if len(dst) != (len(src) if keepdim else len(src) - len(reduced)):
        return None
    return ChannelLaw.at_axis(dst, new_axis)


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

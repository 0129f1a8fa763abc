"""The fold rules, as data, and the reason codes for every BatchNorm that stays.

One table serves both routes.  A rule is a fact about layer kinds, not about a graph
library: which layers it matches (as PyTorch modules, as functional/aten calls in a
captured graph, as ONNX operators), in which direction the BN folds, which axis of the
layer's tensor carries the BN's channels, how the weight is scaled (``FoldKind``) and
whether zero padding breaks it.  The checks every fold needs (eval mode, running
statistics, one consumer, channel alignment, shared weights, hooks) are not here: they
live once per route, in ``fold_torch.py`` (PyTorch graphs) and ``onnx_fold.py`` (ONNX).

Adding a layer pair is one entry in ``RULES`` (and a test row).  This module imports
neither torch nor onnx: each route resolves the names below itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "MERGE",
    "RULES",
    "ChannelAxis",
    "Direction",
    "FoldKind",
    "FoldRule",
    "Layer",
    "MergeRule",
    "Reason",
    "rule_named",
]


class Direction(str, enum.Enum):
    BACKWARD = "backward"  # into the layer that produces the BN's input
    FORWARD = "forward"  # into the layer that consumes the BN's output


class FoldKind(str, enum.Enum):
    """How a fold scales the layer's weight (PyTorch's weight layouts; ONNX's are the same
    for Conv/ConvTranspose, and Gemm/MatMul weights are transposed to (out, in) first)."""

    CONV_OUT = "conv_out"  # weight (C_out, C_in/g, k...), scale axis 0
    CONVT_OUT = "convt_out"  # weight (C_in, C_out/g, k...), grouped output channels on axis 1
    LINEAR_OUT = "linear_out"  # weight (out, in), scale axis 0
    CONV_IN = "conv_in"  # weight (C_out, C_in/g, k...), grouped input channels on axis 1
    LINEAR_IN = "linear_in"  # weight (out, in), scale axis 1


class ChannelAxis(str, enum.Enum):
    """Where the layer's channels are in the tensor it produces (backward) or reads (forward).

    ``BEFORE_SPATIAL``: the axis just before the spatial axes, which is axis 1 of a batched
    convolution and axis 0 of an unbatched one (a Conv1d on ``(C, L)``); ``LAST``: the last
    axis (Linear's features, on 2-D input and on token tensors alike).
    """

    BEFORE_SPATIAL = "before_spatial"
    LAST = "last"


@dataclass(frozen=True)
class Layer:
    """A kind of layer, as each route names it."""

    name: str
    torch_modules: tuple[str, ...]  # classes in torch.nn (subclasses match only when plain)
    torch_functions: tuple[str, ...]  # "F.name" (torch.nn.functional) or "aten.op.overload"
    onnx_ops: tuple[str, ...]


CONV = Layer(
    "conv",
    ("Conv1d", "Conv2d", "Conv3d"),
    (
        "F.conv1d",
        "F.conv2d",
        "F.conv3d",
        "aten.conv1d.default",
        "aten.conv2d.default",
        "aten.conv3d.default",
    ),
    ("Conv",),
)
CONV_TRANSPOSE = Layer(
    "conv_transpose",
    ("ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"),
    (
        "F.conv_transpose1d",
        "F.conv_transpose2d",
        "F.conv_transpose3d",
        "aten.conv_transpose1d.default",
        "aten.conv_transpose2d.input",
        "aten.conv_transpose3d.input",
    ),
    ("ConvTranspose",),
)
LINEAR = Layer("linear", ("Linear",), ("F.linear", "aten.linear.default"), ("Gemm", "MatMul"))


@dataclass(frozen=True)
class FoldRule:
    name: str
    direction: Direction
    layer: Layer
    kind: FoldKind
    channel_axis: ChannelAxis
    zero_padding_breaks: bool = False  # forward folds: padded zeros would skip the BN's shift


RULES: tuple[FoldRule, ...] = (
    FoldRule("conv_bn", Direction.BACKWARD, CONV, FoldKind.CONV_OUT, ChannelAxis.BEFORE_SPATIAL),
    FoldRule(
        "convtranspose_bn",
        Direction.BACKWARD,
        CONV_TRANSPOSE,
        FoldKind.CONVT_OUT,
        ChannelAxis.BEFORE_SPATIAL,
    ),
    FoldRule("linear_bn", Direction.BACKWARD, LINEAR, FoldKind.LINEAR_OUT, ChannelAxis.LAST),
    FoldRule(
        "bn_conv",
        Direction.FORWARD,
        CONV,
        FoldKind.CONV_IN,
        ChannelAxis.BEFORE_SPATIAL,
        zero_padding_breaks=True,
    ),
    FoldRule("bn_linear", Direction.FORWARD, LINEAR, FoldKind.LINEAR_IN, ChannelAxis.LAST),
)


SUM = Layer(
    "sum",
    (),
    (
        "operator.add",
        "operator.iadd",
        "torch.add",
        "aten.add.Tensor",
        "aten.add_.Tensor",
        "Tensor.add",  # methods: fx's call_method
        "Tensor.add_",
    ),
    ("Add", "Sum"),
)


@dataclass(frozen=True)
class MergeRule:
    """Parallel branches that read one tensor and meet in a sum, merged into one layer.

    Branches are ``layer`` nodes (after their own BNs folded into them) and identity
    branches (a BN on the input, or the input itself); ``folding.merge_parallel`` is the
    maths.  The route checks geometry and declines with the ``MERGE_*`` reasons below.
    """

    name: str
    layer: Layer
    sum: Layer
    channel_axis: ChannelAxis


MERGE = MergeRule("branch_merge", CONV, SUM, ChannelAxis.BEFORE_SPATIAL)


def rule_named(name: str) -> FoldRule:
    return next(rule for rule in RULES if rule.name == name)


def onnx_rule(op_type: str, direction: Direction) -> FoldRule | None:
    """The rule for an ONNX operator in ``direction``, or None."""
    for rule in RULES:
        if rule.direction is direction and op_type in rule.layer.onnx_ops:
            return rule
    return None


class Reason(str, enum.Enum):
    """Why a BatchNorm stays. The value is the stable code shown to users."""

    explanation: str

    def __new__(cls, code: str, explanation: str) -> Reason:
        obj = str.__new__(cls, code)
        obj._value_ = code
        obj.explanation = explanation
        return obj

    ARCHITECTURE_UNKNOWN = (
        "architecture_unknown",
        "only weights were loaded; pass --arch to see which layer each BN folds into",
    )
    CAPTURE_FAILED = ("capture_failed", "the model's data flow could not be captured")
    TRAIN_MODE = ("train_mode", "the BN is in training mode and normalises with batch statistics")
    NO_RUNNING_STATS = (
        "no_running_stats",
        "track_running_stats=False: the BN normalises with batch statistics even in eval",
    )
    CUSTOM_FORWARD = (
        "custom_forward",
        "a subclass that overrides forward() (or a BN-like class bnfold does not know): it "
        "may not compute a plain BatchNorm",
    )
    NONFINITE_STATS = ("nonfinite_stats", "NaN or Inf in the BN's parameters or statistics")
    NOT_CONSTANT = (
        "not_constant",
        "a batch_norm whose parameters or statistics are computed, not constants",
    )
    NO_NEIGHBOUR = (
        "no_foldable_neighbour",
        "neither the producer of its input nor the consumer of its output is a layer "
        "it can fold into",
    )
    PRODUCER_SHARED_OUTPUT = (
        "producer_output_shared",
        "the producer's output is also used elsewhere; folding would change that use",
    )
    OUTPUT_SHARED = (
        "bn_output_shared",
        "the BN's output feeds more than one consumer (and it has no producer to fold into)",
    )
    CHANNEL_MISMATCH = (
        "channel_mismatch",
        "the BN's channel axis does not line up with the layer's features",
    )
    NEEDS_SHAPES = (
        "needs_shapes",
        "proving the channel alignment needs tensor shapes; pass --input-shape",
    )
    ZERO_PADDING = (
        "zero_padding",
        "the consumer pads with zeros, which would not see the BN's shift: a forward fold "
        "is not exact",
    )
    CUSTOM_LAYER = (
        "custom_layer_forward",
        "the neighbouring layer subclasses Conv/Linear but overrides forward() or a method "
        "it calls (_conv_forward, ...)",
    )
    OPAQUE_MODULE = (
        "opaque_module",
        "a module between the BN and its layer has its own forward or hooks that bnfold "
        "cannot see through",
    )
    HOOKS = (
        "module_hooks",
        "the BN or the layer has forward hooks (weight_norm, an output hook, ...), which "
        "run at its call: folding would drop them or apply them to other numbers",
    )
    GLOBAL_HOOKS = (
        "global_hooks",
        "global module hooks are registered (torch.nn.modules.module."
        "register_module_forward_hook): they run at every module call, folding would "
        "change what they see",
    )
    OVERFLOW = ("overflow", "the folded weights overflow the parameter dtype")
    SHARED_WEIGHTS = (
        "shared_weights",
        "the layer's weights are used by other nodes too; folding would change them",
    )
    SUBGRAPH = (
        "subgraph",
        "the BN sits inside an If/Loop/Scan subgraph or a model-local function; bnfold "
        "folds only the main graph",
    )
    BN_PARAMETERS = (
        "bn_parameters",
        "the BN's parameters are not one floating-point value per channel, all of one size "
        "(spatial=0 over spatial axes, a scalar scale, mismatched sizes): not a plain "
        "per-channel BatchNorm",
    )
    UNSUPPORTED_LAYER = (
        "unsupported_layer",
        "the neighbouring layer has a form bnfold does not fold (a weight of another dtype "
        "or rank, groups that do not divide its channels, a bias that is not one value per "
        "output channel)",
    )
    MERGE_INPUTS = (
        "merge_inputs_differ",
        "the BN is on an identity branch summed with conv branches, but the branches do not "
        "all read the same tensor",
    )
    MERGE_GEOMETRY = (
        "merge_geometry",
        "the summed conv branches differ in stride, dilation, output channels or rank, an "
        "identity branch meets a strided conv, or the sum broadcasts: the branches compute "
        "on different grids",
    )
    MERGE_PADDING = (
        "merge_padding",
        "the branches' padding does not keep their kernel centres aligned (or a kernel has "
        "no centre tap): the smaller kernel cannot be centred in the larger one",
    )
    MERGE_PADDING_MODE = (
        "merge_padding_mode",
        "the branches pad differently (zeros, reflect, replicate, circular): one conv "
        "cannot pad both ways",
    )
    MERGE_BRANCH_SHARED = (
        "merge_branch_shared",
        "a branch's output is also used outside the sum: merging would remove a value "
        "that something else reads",
    )
    MERGE_GROUPS = (
        "merge_groups",
        "the branches' groups do not line up (different groups, or an identity branch with "
        "input and output channels that differ per group)",
    )

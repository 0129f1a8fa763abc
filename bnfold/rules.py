"""The fold rules, as data, and the reason codes for every BatchNorm that stays.

A rule says which layer kinds it matches, in which direction the BN folds, which
axis of the layer's tensor carries the BN's channels and how the weights are
scaled (a ``folding.FoldKind``).  The checks every fold needs (eval mode, running
statistics, one consumer, channel alignment, shared modules) are not here: they
live once, in ``fuse.py``.  Adding a layer pair is one entry in ``RULES``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bnfold.folding import FoldKind

__all__ = ["RULES", "Direction", "FoldRule", "Reason", "function_rule", "rules_for"]


class Direction(str, enum.Enum):
    BACKWARD = "backward"  # into the layer that produces the BN's input
    FORWARD = "forward"  # into the layer that consumes the BN's output


@dataclass(frozen=True)
class FoldRule:
    name: str
    direction: Direction
    layer_types: tuple[type[nn.Module], ...]
    kind: FoldKind
    channel_axis: int  # axis of the layer's output (backward) / input (forward) with the channels
    zero_padding_breaks: bool = False  # forward folds: padded zeros would skip the BN's shift
    functions: frozenset[object] = frozenset()  # functional forms (torch.export graphs)


_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES: tuple[type[nn.Module], ...] = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

_aten = torch.ops.aten
_CONV_FUNCTIONS = frozenset(
    {F.conv1d, F.conv2d, F.conv3d, _aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default}
)
_CONV_TRANSPOSE_FUNCTIONS = frozenset(
    {
        F.conv_transpose1d,
        F.conv_transpose2d,
        F.conv_transpose3d,
        _aten.conv_transpose1d.default,
        _aten.conv_transpose2d.input,
        _aten.conv_transpose3d.input,
    }
)
_LINEAR_FUNCTIONS = frozenset({F.linear, _aten.linear.default})

RULES: tuple[FoldRule, ...] = (
    FoldRule(
        "conv_bn", Direction.BACKWARD, _CONVS, FoldKind.CONV_OUT, 1, functions=_CONV_FUNCTIONS
    ),
    FoldRule(
        "convtranspose_bn",
        Direction.BACKWARD,
        _CONV_TRANSPOSES,
        FoldKind.CONVT_OUT,
        1,
        functions=_CONV_TRANSPOSE_FUNCTIONS,
    ),
    FoldRule(
        "linear_bn",
        Direction.BACKWARD,
        (nn.Linear,),
        FoldKind.LINEAR_OUT,
        -1,
        functions=_LINEAR_FUNCTIONS,
    ),
    FoldRule("bn_conv", Direction.FORWARD, _CONVS, FoldKind.CONV_IN, 1, zero_padding_breaks=True),
    FoldRule("bn_linear", Direction.FORWARD, (nn.Linear,), FoldKind.LINEAR_IN, -1),
)


def function_rule(target: object) -> FoldRule | None:
    """The backward rule for a functional conv/linear call (torch.export graphs)."""
    for rule in RULES:
        if rule.direction is Direction.BACKWARD and target in rule.functions:
            return rule
    return None


def rules_for(module: nn.Module, direction: Direction) -> FoldRule | None:
    """The rule matching ``module`` in ``direction``; subclasses of the layer types match."""
    for rule in RULES:
        if rule.direction is direction and isinstance(module, rule.layer_types):
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
        "a subclass that overrides forward(): it may not compute a plain BatchNorm",
    )
    NONFINITE_STATS = ("nonfinite_stats", "NaN or Inf in the BN's parameters or statistics")
    NOT_CONSTANT = (
        "not_constant",
        "a functional batch_norm whose statistics are computed, not constant buffers",
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
        "the neighbouring layer subclasses Conv/Linear but overrides forward()",
    )
    HOOKS = (
        "module_hooks",
        "the BN or the layer has forward hooks (weight_norm, an output hook, ...), which "
        "run at its call: folding would drop them or apply them to other numbers",
    )
    OVERFLOW = ("overflow", "the folded weights overflow the parameter dtype")
    SHARED_WEIGHTS = (
        "shared_weights",
        "the layer's weights are used by other nodes too; folding would change them",
    )

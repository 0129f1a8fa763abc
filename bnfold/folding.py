"""Pure tensor maths of BatchNorm folding, in float64 inside.

In eval mode a BatchNorm is a per-channel affine map::

    bn(x)[c] = s[c] * x[c] + t[c],   s = gamma / sqrt(running_var + eps),
                                     t = beta - running_mean * s

Backward fold into a producer ``y = W * x + b`` whose output channel ``c`` the BN
normalises::

    W'[c] = s[c] * W[c]                 b'[c] = s[c] * b[c] + t[c]

For ConvTranspose the weight is ``(C_in, C_out / groups, k...)`` and output
channel ``c = g * (C_out / groups) + j`` lives in slice ``[g-th group of C_in, j]``,
which is where grouped transposed convolutions are easy to get wrong.

Forward fold into a consumer ``y = W * bn(x) + b`` (exact only when every input
element the consumer reads went through the BN, i.e. no zero padding)::

    W'[o, i, k] = W[o, i, k] * s[i]     b'[o] = b[o] + sum_{i,k} W[o, i, k] * t[i]

where for grouped convolutions ``i`` runs over the input channels of the group of
``o``.  Every function takes and returns torch tensors; products are computed in float64 and
rounded once, to ``dtype`` (float64 unless asked), and ``overflowed`` tells whether the
rounding overflowed the dtype.
"""

from __future__ import annotations

import enum

import torch

__all__ = ["FoldKind", "bn_affine", "cast", "fold_backward", "fold_forward", "overflowed"]


class FoldKind(str, enum.Enum):
    CONV_OUT = "conv_out"  # weight (C_out, C_in/g, k...), scale axis 0
    CONVT_OUT = "convt_out"  # weight (C_in, C_out/g, k...), grouped output channels on axis 1
    LINEAR_OUT = "linear_out"  # weight (out, in), scale axis 0
    CONV_IN = "conv_in"  # weight (C_out, C_in/g, k...), grouped input channels on axis 1
    LINEAR_IN = "linear_in"  # weight (out, in), scale axis 1


def bn_affine(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) of the eval-mode BatchNorm ``s * x + t``, in float64."""
    mean = running_mean.detach().to(torch.float64)
    var = running_var.detach().to(torch.float64)
    s = torch.rsqrt(var + eps)
    if weight is not None:
        s = s * weight.detach().to(torch.float64)
    t = -mean * s
    if bias is not None:
        t = t + bias.detach().to(torch.float64)
    return s, t


def fold_backward(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    s: torch.Tensor,
    t: torch.Tensor,
    kind: FoldKind,
    groups: int = 1,
    dtype: torch.dtype = torch.float64,
    scratch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``s * y + t`` into the layer producing ``y``; returns (W', b') in ``dtype``.

    The weights are widened to float64 (a copy, also when they already are float64;
    into ``scratch`` when given, a reusable float64 buffer that saves the allocation),
    scaled in place and rounded once to ``dtype``.
    """
    w = _widen(weight, scratch)
    extra = [1] * (w.dim() - 2)
    if kind in (FoldKind.CONV_OUT, FoldKind.LINEAR_OUT):
        w.mul_(s.reshape(-1, 1, *extra))
    elif kind is FoldKind.CONVT_OUT:
        c_in, c_out_g = w.shape[0], w.shape[1]
        grouped = (groups, c_in // groups, c_out_g, *w.shape[2:])
        w.view(grouped).mul_(s.reshape(groups, 1, c_out_g, *extra))
    else:
        raise ValueError(f"{kind} is not a backward fold")
    b = t.clone() if bias is None else bias.detach().to(torch.float64) * s + t
    return w.to(dtype), b.to(dtype)


def fold_forward(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    s: torch.Tensor,
    t: torch.Tensor,
    kind: FoldKind,
    groups: int = 1,
    dtype: torch.dtype = torch.float64,
    scratch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``s * x + t`` into the layer consuming it; ``s``/``t`` are per input feature."""
    w64 = _widen(weight, scratch)
    c_out = w64.shape[0]
    b = torch.zeros(c_out, dtype=torch.float64) if bias is None else bias.detach().to(torch.float64)
    if kind is FoldKind.LINEAR_IN:
        shift = w64 @ t
        return w64.mul_(s.reshape(1, -1)).to(dtype), (b + shift).to(dtype)
    if kind is not FoldKind.CONV_IN:
        raise ValueError(f"{kind} is not a forward fold")
    c_in_g = w64.shape[1]
    extra = [1] * (w64.dim() - 2)
    grouped = (groups, c_out // groups, c_in_g, *w64.shape[2:])
    summed = w64.reshape(groups, c_out // groups, c_in_g, -1).sum(dim=-1)
    shift = torch.einsum("goi,gi->go", summed, t.reshape(groups, c_in_g)).reshape(c_out)
    w64.view(grouped).mul_(s.reshape(groups, 1, c_in_g, *extra))
    return w64.to(dtype), (b + shift).to(dtype)


def _widen(weight: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """A float64 copy of ``weight`` (never the caller's tensor itself)."""
    if scratch is not None and scratch.numel() >= weight.numel():
        out = scratch[: weight.numel()].view(weight.shape)
        return out.copy_(weight.detach())
    return weight.detach().to(torch.float64, copy=True)


def cast(value: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """``value`` cast once to ``dtype``; the flag says whether a finite value overflowed."""
    out = value.to(dtype)
    return out, overflowed(out, value)


def overflowed(result: torch.Tensor, *sources: torch.Tensor) -> bool:
    """Whether ``result`` holds Inf/NaN that none of ``sources`` (same shape) had."""
    if result.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(result))).all()):
        return False  # the common case: one cheap reduction, no mask
    bad = ~torch.isfinite(result)
    for src in sources:
        bad &= torch.isfinite(src.to(torch.float64) if src.dtype != result.dtype else src)
    return bool(bad.any())

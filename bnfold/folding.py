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
``o``.  Every function takes and returns torch tensors (the ONNX route wraps its numpy
arrays with ``torch.from_numpy``) and never writes to its inputs; products are computed
in float64 and rounded once, to ``dtype`` (float64 unless asked), and the ``overflow``
flag tells whether that rounding overflowed the dtype.  bfloat16, which numpy lacks, is
rounded by torch, whose float64 -> bfloat16 conversion goes through float32.

Branch merge (``merge_parallel``): parallel convolutions that read the same ``x`` with
the same stride, dilation and groups, and identity branches ``s * x + t`` (a BN on the
skip, or a plain skip with ``s = 1, t = 0``), summed::

    sum_i conv(x, W_i, b_i) + sum_j (s_j * x + t_j) = conv(x, W, b)
    W = sum_i centre_pad(W_i, K) + delta_K * sum_j s_j      b = sum_i b_i + sum_j t_j

where ``K`` is the largest kernel size per spatial axis, ``centre_pad`` puts a smaller
kernel in the middle of a ``K`` kernel (exact when each branch's padding minus
``dilation * (k - 1) / 2`` is the same, which the routes check), and ``delta_K`` is the
kernel that copies input channel ``o`` (within its group) to output channel ``o`` at the
centre tap.  The merged conv keeps the largest kernel's padding.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from bnfold.rules import FoldKind

__all__ = [
    "FoldKind",
    "Folded",
    "all_finite",
    "bn_affine",
    "cast",
    "fold_backward",
    "fold_forward",
    "merge_parallel",
    "overflowed",
]

_NUMPY_OF = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def bn_affine(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) of the eval-mode BatchNorm ``s * x + t``, in float64.

    NaN or Inf in any input makes ``s`` or ``t`` non-finite, but for ``running_var=+Inf``
    (which gives ``s=0``): ``all_finite(s, t, running_var)`` checks all four inputs.
    """
    var = _wide(running_var)
    with np.errstate(invalid="ignore", divide="ignore"):  # var + eps <= 0: NaN/Inf in s
        s = 1.0 / np.sqrt(var + eps)  # what torch.rsqrt computes, bit for bit
    if weight is not None:
        s = s * _wide(weight)
    t = -_wide(running_mean) * s
    if bias is not None:
        t = t + _wide(bias)
    return torch.from_numpy(s), torch.from_numpy(t)


class Folded(NamedTuple):
    """A folded layer's new weight and bias, and whether rounding them overflowed."""

    weight: torch.Tensor
    bias: torch.Tensor
    overflow: bool


def fold_backward(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    s: torch.Tensor,
    t: torch.Tensor,
    kind: FoldKind,
    groups: int = 1,
    dtype: torch.dtype = torch.float64,
) -> Folded:
    """Fold ``s * y + t`` into the layer producing ``y``; (W', b') as new tensors in ``dtype``."""
    extra = [1] * (weight.dim() - 2)
    if kind in (FoldKind.CONV_OUT, FoldKind.LINEAR_OUT):
        scale = s.reshape(-1, 1, *extra)
    elif kind is FoldKind.CONVT_OUT:
        # weight (C_in, C_out/g, k...): row r belongs to group r // (C_in/g), whose output
        # channels are s[g * C_out/g : (g + 1) * C_out/g]
        c_in, c_out_g = weight.shape[0], weight.shape[1]
        scale = (
            s.reshape(groups, 1, c_out_g)
            .expand(groups, c_in // groups, c_out_g)
            .reshape(c_in, c_out_g, *extra)
        )
    else:
        raise ValueError(f"{kind} is not a backward fold")
    b = t.numpy().copy() if bias is None else _wide(bias) * s.numpy() + t.numpy()
    b_out, b_overflow = _rounded(b, dtype)
    w, overflow = _scaled(weight, scale, dtype)
    return Folded(w, b_out, overflow or b_overflow)


def fold_forward(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    s: torch.Tensor,
    t: torch.Tensor,
    kind: FoldKind,
    groups: int = 1,
    dtype: torch.dtype = torch.float64,
) -> Folded:
    """Fold ``s * x + t`` into the layer consuming it; ``s``/``t`` are per input feature."""
    c_out = weight.shape[0]
    b = torch.zeros(c_out, dtype=torch.float64) if bias is None else bias.detach().to(torch.float64)
    w64 = weight.detach().to(torch.float64)
    if kind is FoldKind.LINEAR_IN:
        shift = w64 @ t
        scale = s.reshape(1, -1)
    elif kind is FoldKind.CONV_IN:
        c_in_g = weight.shape[1]
        extra = [1] * (weight.dim() - 2)
        summed = w64.reshape(groups, c_out // groups, c_in_g, -1).sum(dim=-1)
        shift = torch.einsum("goi,gi->go", summed, t.reshape(groups, c_in_g)).reshape(c_out)
        scale = (
            s.reshape(groups, 1, c_in_g)
            .expand(groups, c_out // groups, c_in_g)
            .reshape(c_out, c_in_g, *extra)
        )
    else:
        raise ValueError(f"{kind} is not a forward fold")
    del w64
    b = b + shift
    b_out = b.to(dtype)
    b_overflow = overflowed(b_out, b)
    w, overflow = _scaled(weight, scale, dtype)
    return Folded(w, b_out, overflow or b_overflow)


def merge_parallel(
    kernels: list[tuple[torch.Tensor, torch.Tensor | None]],
    identities: list[tuple[torch.Tensor, torch.Tensor]],
    groups: int = 1,
    dtype: torch.dtype = torch.float64,
) -> Folded:
    """One conv's (W, b) computing the sum of parallel conv branches ``(W_i, b_i)`` (weights
    ``(C_out, C_in/g, k...)``, one ``groups``) and identity branches ``s_j * x + t_j``.

    Raises ValueError when the shapes cannot merge (no conv, different output channels or
    input channels per group, a kernel that does not centre in the largest, an identity
    branch with ``C_in != C_out`` or an even kernel): the routes check geometry first and
    decline with a reason, so this is a guard, not a user message.
    """
    if not kernels:
        raise ValueError("a merge needs at least one conv branch")
    shapes = [w.shape for w, _ in kernels]
    c_out, c_in_g = shapes[0][0], shapes[0][1]
    dims = len(shapes[0]) - 2
    if any(len(sh) != dims + 2 or sh[0] != c_out or sh[1] != c_in_g for sh in shapes):
        raise ValueError(f"conv branches of different channels or rank: {shapes}")
    size = [max(sh[2 + d] for sh in shapes) for d in range(dims)]
    if any((size[d] - sh[2 + d]) % 2 for sh in shapes for d in range(dims)):
        raise ValueError(f"kernel sizes that do not centre in {size}: {shapes}")
    w = np.zeros((c_out, c_in_g, *size), dtype=np.float64)
    b = np.zeros(c_out, dtype=np.float64)
    for weight, bias in kernels:
        k = weight.shape[2:]
        centre = tuple(
            slice((size[d] - k[d]) // 2, (size[d] - k[d]) // 2 + k[d]) for d in range(dims)
        )
        w[(slice(None), slice(None), *centre)] += _wide(weight)
        if bias is not None:
            b += _wide(bias)
    if identities:
        if c_in_g * groups != c_out or any(k % 2 == 0 for k in size):
            raise ValueError(
                f"an identity branch needs C_in == C_out and an odd kernel, not {shapes[0]}"
            )
        out = np.arange(c_out)
        mid = tuple(k // 2 for k in size)
        for s, t in identities:
            w[(out, out % c_in_g, *mid)] += _wide(s)  # type: ignore[index]
            b += _wide(t)
    w_out, w_overflow = _rounded(w, dtype)
    b_out, b_overflow = _rounded(b, dtype)
    return Folded(w_out, b_out, w_overflow or b_overflow)


def _scaled(
    weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, bool]:
    """``weight * scale`` computed in float64 and rounded once to ``dtype``, as a new tensor;
    the flag says whether the rounding overflowed.

    One numpy multiply: it widens small blocks of the float32 (or float16) weights to
    float64 in its buffer, multiplies there and rounds into the result, so no weight-sized
    float64 temporary is made (a 256 MB layer would need 512 MB more); overflow comes from
    the floating-point status of that rounding (values that were already Inf do not count).
    """
    w = weight.detach()
    if w.dtype not in _NUMPY_OF or dtype not in _NUMPY_OF or w.device.type != "cpu":
        wide = w.to(torch.float64).mul_(scale)
        out = wide.to(dtype)
        return out, overflowed(out, wide)
    out = torch.empty(w.shape, dtype=dtype)
    try:
        with np.errstate(over="raise"):
            np.multiply(w.numpy(), scale.numpy(), out=out.numpy(), casting="same_kind")
    except FloatingPointError:
        return out, True
    return out, False


def _wide(t: torch.Tensor) -> np.ndarray:
    """A per-channel tensor as a new float64 array."""
    t = t.detach()
    if t.dtype in _NUMPY_OF and t.device.type == "cpu":
        return t.numpy().astype(np.float64)
    return t.to(torch.float64).cpu().numpy()


def _rounded(b: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """A float64 array rounded once to ``dtype``, and whether that overflowed."""
    if dtype not in _NUMPY_OF:
        return cast(torch.from_numpy(b), dtype)
    with np.errstate(over="ignore"):
        out = b.astype(_NUMPY_OF[dtype])
    return torch.from_numpy(out), bool((np.isfinite(b) & ~np.isfinite(out)).any())


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether the tensors hold no NaN/Inf."""
    return all(bool(torch.isfinite(t.detach()).all()) for t in tensors)


def cast(value: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """``value`` cast once to ``dtype``; the flag says whether a finite value overflowed."""
    out = value.to(dtype)
    return out, overflowed(out, value)


def overflowed(result: torch.Tensor, *sources: torch.Tensor) -> bool:
    """Whether ``result`` holds Inf/NaN that none of ``sources`` (same shape) had."""
    if result.numel() == 0 or bool(torch.isfinite(result).all()):
        return False
    bad = ~torch.isfinite(result)
    for src in sources:
        bad &= torch.isfinite(src.to(torch.float64) if src.dtype != result.dtype else src)
    return bool(bad.any())

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
import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "FoldKind",
    "Folded",
    "all_finite",
    "bn_affine",
    "cast",
    "fold_backward",
    "fold_forward",
    "overflowed",
]


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
    s = 1.0 / np.sqrt(_wide(running_var) + eps)  # what torch.rsqrt computes, bit for bit
    if weight is not None:
        s = s * _wide(weight)
    t = -_wide(running_mean) * s
    if bias is not None:
        t = t + _wide(bias)
    return torch.from_numpy(s), torch.from_numpy(t)


def _wide(t: torch.Tensor) -> np.ndarray:
    """A per-channel tensor as a new float64 array.

    The per-BatchNorm vectors are tiny: numpy does their arithmetic in about a tenth of
    the time torch's dispatcher takes per operation, which adds up over a model's BNs.
    """
    t = t.detach()
    if t.dtype in _NUMPY_DTYPES and t.device.type == "cpu":
        return t.numpy().astype(np.float64)
    return t.to(torch.float64).cpu().numpy()


def _rounded(b: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """A float64 per-channel vector rounded once to ``dtype``, and whether that overflowed."""
    if dtype not in _NUMPY_DTYPES:
        return cast(torch.from_numpy(b), dtype)
    with np.errstate(over="ignore"):
        out = b.astype(_NUMPY_OF[dtype])
    return torch.from_numpy(out), bool((np.isfinite(b) & ~np.isfinite(out)).any())


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
    """Fold ``s * y + t`` into the layer producing ``y``; (W', b') in ``dtype``.

    ``W'`` is computed in float64 and rounded once (see ``_scaled``).
    """
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
    w, overflow = _scaled(weight, scale, dtype)
    b = t.numpy().copy() if bias is None else _wide(bias) * s.numpy() + t.numpy()
    b_out, b_overflow = _rounded(b, dtype)
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
    w, overflow = _scaled(weight, scale, dtype)
    b = b + shift
    b_out = b.to(dtype)
    return Folded(w, b_out, overflow or overflowed(b_out, b))


_NUMPY_OF = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
_NUMPY_DTYPES = set(_NUMPY_OF)
_SPLIT = 1 << 18  # elements: a layer at least this big is shared out among the threads
_pool: ThreadPoolExecutor | None = None


def _scaled(
    weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, bool]:
    """``weight * scale`` computed in float64 and rounded once to ``dtype``.

    ``scale`` is float64 and broadcasts against ``weight``; its first axis is 1 or the
    weight's.  The flag says whether the rounding overflowed.

    One pass over the weights: numpy's multiply widens each small block of the float32
    (or float16) weights to float64 in a buffer, multiplies there and rounds into the
    new tensor, so no weight-sized float64 temporary is made; overflow comes from the
    floating-point status of that rounding (values that were already Inf do not count).
    Big layers are split by rows over a few threads (numpy releases the GIL).  bfloat16,
    which numpy lacks, takes the plain torch route, whose float64 -> bfloat16 conversion
    goes through float32 (a second rounding that can move a value by one unit in the last
    place when the first lands on a tie).
    """
    w = weight.detach()
    if w.dtype not in _NUMPY_DTYPES or dtype not in _NUMPY_DTYPES or w.device.type != "cpu":
        wide = w.to(torch.float64).mul_(scale)
        out = wide.to(dtype)
        return out, overflowed(out, wide)
    out = torch.empty(w.shape, dtype=dtype)
    src, dst, factor = w.numpy(), out.numpy(), scale.numpy()
    rows = w.shape[0] if w.dim() else 1
    parts = min(torch.get_num_threads(), rows, max(1, w.numel() // _SPLIT))
    if parts <= 1:
        return out, _multiply(src, factor, dst)
    bounds = [rows * i // parts for i in range(parts + 1)]
    pieces = [
        (src[a:b], factor if factor.shape[0] == 1 else factor[a:b], dst[a:b])
        for a, b in itertools.pairwise(bounds)
    ]
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=torch.get_num_threads(), thread_name_prefix="bnfold")
    flags = list(_pool.map(lambda piece: _multiply(*piece), pieces))
    return out, any(flags)


def _multiply(src: np.ndarray, factor: np.ndarray, dst: np.ndarray) -> bool:
    """``dst = src * factor`` in float64, rounded into ``dst``; True if that overflowed."""
    try:
        with np.errstate(over="raise"):
            np.multiply(src, factor, out=dst, casting="same_kind")
    except FloatingPointError:
        return True
    return False


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds no NaN/Inf (numpy's check where it can: see ``_wide``)."""
    t = tensor.detach()
    if t.dtype in _NUMPY_DTYPES and t.device.type == "cpu":
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())


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

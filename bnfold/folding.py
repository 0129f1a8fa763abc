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
rounding overflowed the dtype.  With ``in_place=True`` a fold may write ``W'`` into the
memory of ``W`` itself (same values, bit for bit), for a caller that owns ``W`` and needs
it no more; it does so only where no product can overflow, so a fold that is declined for
overflow has never touched ``W``.
"""

from __future__ import annotations

import enum
import itertools
import math
import queue
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "Deferred",
    "FoldKind",
    "Folded",
    "Magnitudes",
    "all_finite",
    "bn_affine",
    "bn_affines",
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
    """(s, t) of the eval-mode BatchNorm ``s * x + t``, in float64.

    NaN or Inf in any input makes ``s`` or ``t`` non-finite, but for ``running_var=+Inf``
    (which gives ``s=0``): ``all_finite(s, t, running_var)`` checks all four inputs.
    """
    with np.errstate(invalid="ignore", divide="ignore"):  # var + eps <= 0: NaN/Inf in s
        s = 1.0 / np.sqrt(_wide(running_var) + eps)  # what torch.rsqrt computes, bit for bit
    if weight is not None:
        s = s * _wide(weight)
    t = -_wide(running_mean) * s
    if bias is not None:
        t = t + _wide(bias)
    return torch.from_numpy(s), torch.from_numpy(t)


BNParams = tuple[
    torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None", float
]  # running_mean, running_var, weight, bias, eps


def bn_affines(bns: list[BNParams]) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    """``bn_affine`` of many BNs at once, and whether each one's inputs are all finite.

    The same float64 operations as ``bn_affine``, element by element, so the same bits;
    done over the BNs' concatenated vectors, a model's BNs cost a few numpy calls instead
    of a dozen each.  A BN whose tensors numpy cannot take (bfloat16, not on the CPU) is
    computed on its own.
    """
    batch = [i for i, bn in enumerate(bns) if all(map(_numpy_ready, bn[:4]))]
    out: list[tuple[torch.Tensor, torch.Tensor, bool] | None] = [None] * len(bns)
    if batch:
        chosen = [bns[i] for i in batch]
        sizes = [int(bn[1].shape[0]) for bn in chosen]
        offsets = np.cumsum([0, *sizes])
        if min(sizes) > 0:
            var = _joined([bn[1] for bn in chosen])
            with np.errstate(invalid="ignore", divide="ignore"):  # var + eps <= 0: non-finite
                s_all = 1.0 / np.sqrt(var + np.repeat([bn[4] for bn in chosen], sizes))
            scaled = [bn[2] is not None for bn in chosen]
            if any(scaled):
                gamma = _joined([bn[2] if bn[2] is not None else bn[1] for bn in chosen])
                np.multiply(s_all, gamma, out=s_all, where=np.repeat(scaled, sizes))
            t_all = -_joined([bn[0] for bn in chosen]) * s_all
            shifted = [bn[3] is not None for bn in chosen]
            if any(shifted):
                beta = _joined([bn[3] if bn[3] is not None else bn[0] for bn in chosen])
                np.add(t_all, beta, out=t_all, where=np.repeat(shifted, sizes))
            with np.errstate(invalid="ignore"):
                ok = np.isfinite(s_all) & np.isfinite(t_all) & np.isfinite(var)
            finite = np.logical_and.reduceat(ok, offsets[:-1])
            for k, i in enumerate(batch):
                a, b = offsets[k], offsets[k + 1]
                out[i] = (torch.from_numpy(s_all[a:b]), torch.from_numpy(t_all[a:b]),
                          bool(finite[k]))  # fmt: skip
    for i, bn in enumerate(bns):
        if out[i] is None:
            s, t = bn_affine(*bn)
            out[i] = (s, t, all_finite(s, t, bn[1]))
    return out  # type: ignore[return-value]


def _numpy_ready(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype in _NUMPY_DTYPES and t.device.type == "cpu" and t.dim() == 1)


def _joined(tensors: list[torch.Tensor]) -> np.ndarray:
    """1-D tensors as one new float64 array."""
    return np.concatenate([t.detach().numpy() for t in tensors]).astype(np.float64, copy=False)


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
    np_dtype = _NUMPY_OF[dtype]
    if np.abs(b).max(initial=0.0) <= _LARGEST[dtype]:  # the common case: nothing can overflow
        return torch.from_numpy(b.astype(np_dtype)), False
    with np.errstate(over="ignore"):
        out = b.astype(np_dtype)
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
    *,
    in_place: bool = False,
    w_max: float | None = None,
    later: Deferred | None = None,
) -> Folded:
    """Fold ``s * y + t`` into the layer producing ``y``; (W', b') in ``dtype``.

    ``W'`` is computed in float64 and rounded once (see ``_scaled``); with ``in_place``
    it may be ``weight`` itself, rescaled (``Folded.weight`` then shares its memory).
    ``w_max``, when known, is ``max|weight|`` (``Magnitudes``), which spares the in-place
    fold its own pass over the weights to rule out overflow.  With ``later`` an in-place
    rescaling is queued there instead of done now (see ``Deferred``).
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
    b = t.numpy().copy() if bias is None else _wide(bias) * s.numpy() + t.numpy()
    b_out, b_overflow = _rounded(b, dtype)
    # a declined fold (overflow) must not have touched the weights: bias first
    w, overflow = _scaled(weight, scale, dtype, in_place and not b_overflow, w_max, later)
    return Folded(w, b_out, overflow or b_overflow)


def fold_forward(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    s: torch.Tensor,
    t: torch.Tensor,
    kind: FoldKind,
    groups: int = 1,
    dtype: torch.dtype = torch.float64,
    *,
    in_place: bool = False,
    w_max: float | None = None,
    later: Deferred | None = None,
) -> Folded:
    """Fold ``s * x + t`` into the layer consuming it; ``s``/``t`` are per input feature.

    The shift ``W @ t`` is taken from the weights before they are scaled, so ``in_place``,
    ``w_max`` and ``later`` work as in ``fold_backward``.
    """
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
    w, overflow = _scaled(weight, scale, dtype, in_place and not b_overflow, w_max, later)
    return Folded(w, b_out, overflow or b_overflow)


_NUMPY_OF = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
_NUMPY_DTYPES = set(_NUMPY_OF)
_LARGEST = {dtype: float(torch.finfo(dtype).max) for dtype in _NUMPY_OF}
_SPLIT = 1 << 18  # elements: a layer at least this big is shared out among the threads
_pool: ThreadPoolExecutor | None = None


def _scaled(
    weight: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    in_place: bool = False,
    w_max: float | None = None,
    later: Deferred | None = None,
) -> tuple[torch.Tensor, bool]:
    """``weight * scale`` computed in float64 and rounded once to ``dtype``.

    ``scale`` is float64 and broadcasts against ``weight``; its first axis is 1 or the
    weight's.  The flag says whether the rounding overflowed.

    One pass over the weights: numpy's multiply widens each small block of the float32
    (or float16) weights to float64 in a buffer, multiplies there and rounds into the
    result, so no weight-sized float64 temporary is made; overflow comes from the
    floating-point status of that rounding (values that were already Inf do not count).
    The result is a new tensor, or with ``in_place`` the weight's own memory when the
    dtype stays and ``_cannot_overflow`` proves that no value can leave the dtype's range
    (a new tensor costs fresh pages, which on a VM cost more than the arithmetic).  Big
    layers are split by rows over a few threads (numpy releases the GIL).  bfloat16,
    which numpy lacks, takes the plain torch route, whose float64 -> bfloat16 conversion
    goes through float32 (a second rounding that can move a value by one unit in the last
    place when the first lands on a tie).
    """
    w = weight.detach()
    if w.dtype not in _NUMPY_DTYPES or dtype not in _NUMPY_DTYPES or w.device.type != "cpu":
        wide = w.to(torch.float64).mul_(scale)
        out = wide.to(dtype)
        return out, overflowed(out, wide)
    src, factor = w.numpy(), scale.numpy()
    reuse = (
        in_place
        and dtype == w.dtype
        and w.is_contiguous()
        and src.flags.writeable
        and _cannot_overflow(w, factor, dtype, w_max)
    )
    if reuse and later is not None:
        later.submit(w.data_ptr(), src, factor)
        torch.autograd.graph.increment_version(weight)  # see below
        return w, False
    out = w if reuse else torch.empty(w.shape, dtype=dtype)
    dst = out.numpy()
    rows = w.shape[0] if w.dim() else 1
    parts = min(torch.get_num_threads(), rows, max(1, w.numel() // _SPLIT))
    if parts <= 1:
        overflow = _multiply(src, factor, dst)
    else:
        bounds = [rows * i // parts for i in range(parts + 1)]
        pieces = [
            (src[a:b], factor if factor.shape[0] == 1 else factor[a:b], dst[a:b])
            for a, b in itertools.pairwise(bounds)
        ]
        global _pool
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=torch.get_num_threads(), thread_name_prefix="bnfold"
            )
        overflow = any(list(_pool.map(lambda piece: _multiply(*piece), pieces)))
    if reuse:
        if overflow:  # _cannot_overflow is a proof; never hand out a half-scaled layer
            raise ArithmeticError("a fold in place overflowed although its bound said it cannot")
        # numpy wrote behind autograd's back: mark the tensor changed (``Magnitudes``)
        torch.autograd.graph.increment_version(weight)
    return out, overflow


def _cannot_overflow(
    w: torch.Tensor, factor: np.ndarray, dtype: torch.dtype, w_max: float | None = None
) -> bool:
    """Whether every ``w * factor``, rounded to ``dtype``, surely stays finite.

    ``|w * s| <= max|w| * max|s|``, and rounding (to float64, then to ``dtype``) is
    monotonic, so a float64 bound below the dtype's largest value rules overflow out.
    With ``max|s| <= 1`` no product grows, and the weights need not be read at all.
    """
    s_max = float(np.abs(factor).max(initial=0.0))
    if s_max <= 1.0:
        return True
    if w_max is None:
        w_max = max_abs(w)
    return math.isfinite(w_max) and w_max * s_max < _LARGEST.get(dtype, 0.0)


def max_abs(tensor: torch.Tensor) -> float:
    """``max|tensor|`` in one pass (no temporary); NaN when it holds NaN, 0 when empty."""
    if tensor.numel() == 0:
        return 0.0
    low, high = (float(v) for v in torch.aminmax(tensor.detach()))
    if math.isnan(low) or math.isnan(high):
        return math.nan
    return max(-low, high)


class Magnitudes:
    """``max|t|`` of tensors, measured once and trusted while they stay unchanged.

    ``bnfold fuse`` measures every weight when it checks that they are finite, and the
    in-place fold then needs no second pass to rule out overflow.  A tensor is known by
    identity (a weak reference: nothing is kept alive) and by its version counter, which
    every in-place torch operation bumps, and ``_scaled`` too when it writes through numpy.
    """

    def __init__(self) -> None:
        self._known: dict[int, tuple[weakref.ref[torch.Tensor], int, float]] = {}

    def measure(self, tensor: torch.Tensor) -> float:
        value = max_abs(tensor)
        self._known[id(tensor)] = (weakref.ref(tensor), tensor._version, value)
        return value

    def get(self, tensor: torch.Tensor) -> float | None:
        entry = self._known.get(id(tensor))
        if entry is None or entry[0]() is not tensor or entry[1] != tensor._version:
            return None
        return entry[2]


class Deferred:
    """In-place rescalings of weights, done by a worker thread while the fold pass goes on.

    The in-place folds cannot fail (``_cannot_overflow`` proved it before they were
    queued), so nothing the pass decides waits for their numbers: the first ``submit``
    starts a worker on the queue, and ``finish`` (also on leaving the ``with`` block)
    works through what is left on the calling thread too and waits for the worker.
    ``settle(t)`` before reading a weight that may still be queued (a BN chain folding
    twice into one layer).  Blocks are large: a worker that finishes a block needs the
    GIL back, which the busy pass hands over only every switch interval (5 ms).
    """

    _BLOCK = 1 << 20  # elements per queued block (4 MB of float32)

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[np.ndarray, np.ndarray] | None] = queue.SimpleQueue()
        self._pending: set[int] = set()
        self._overflow = False
        self._error: BaseException | None = None
        self._worker: threading.Thread | None = None

    def __enter__(self) -> Deferred:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish()

    def submit(self, address: int, array: np.ndarray, factor: np.ndarray) -> None:
        """Queue ``array *= factor`` (in float64, rounded once), by blocks of rows;
        ``address`` is the array's (its tensor's ``data_ptr``), for ``settle``."""
        self._pending.add(address)
        rows = array.shape[0] if array.ndim else 1
        if array.ndim == 0 or rows == 1:
            self._queue.put((array, factor))
        else:
            step = max(1, self._BLOCK // max(1, array.size // rows))
            for a in range(0, rows, step):
                rows_factor = factor if factor.shape[0] == 1 else factor[a : a + step]
                self._queue.put((array[a : a + step], rows_factor))
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="bnfold-fold", daemon=True)
            self._worker.start()

    def settle(self, tensor: torch.Tensor) -> None:
        """Finish the queue first if ``tensor``'s memory may still have work queued."""
        if self._pending and tensor.data_ptr() in self._pending:
            self.finish()

    def finish(self) -> None:
        """Work through the queue on this thread too; return when every block is done."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._run(item)
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None
        self._pending.clear()
        if self._error is not None:
            raise self._error
        if self._overflow:  # _cannot_overflow is a proof; never hand out a half-scaled layer
            raise ArithmeticError("a fold in place overflowed although its bound said it cannot")

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            self._run(item)

    def _run(self, item: tuple[np.ndarray, np.ndarray]) -> None:
        array, factor = item
        try:
            if _multiply(array, factor, array):
                self._overflow = True
        except BaseException as e:  # noqa: BLE001 - raised by finish, on the caller's thread
            self._error = e


def _multiply(src: np.ndarray, factor: np.ndarray, dst: np.ndarray) -> bool:
    """``dst = src * factor`` in float64, rounded into ``dst``; True if that overflowed."""
    try:
        with np.errstate(over="raise"):
            np.multiply(src, factor, out=dst, casting="same_kind")
    except FloatingPointError:
        return True
    return False


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether the tensors hold no NaN/Inf (numpy's check where it can: see ``_wide``)."""
    arrays = []
    for tensor in tensors:
        t = tensor.detach()
        if t.dtype not in _NUMPY_DTYPES or t.device.type != "cpu":
            if not bool(torch.isfinite(t).all()):
                return False
            continue
        arrays.append(t.numpy().reshape(-1))
    if not arrays:
        return True
    return bool(np.isfinite(np.concatenate(arrays) if len(arrays) > 1 else arrays[0]).all())


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

"""Real inputs (``--data``): per-BatchNorm statistics on them, and re-estimation.

Sources (``--data SPEC``):

- ``file.npz``: one array per model input (in the file's key order), the first axis the
  sample; ``file.npy``: one array, one input. Floating arrays are cast to the model's
  dtype, integer arrays (token ids) are passed as they are.
- a folder of images (``.png .jpg .jpeg .bmp .gif .tif .tiff .webp .ppm``, found
  recursively, in path order): decoded with Pillow (``pip install 'bnfold[data]'``) as
  RGB, resized (bilinear) to cover ``--image-size`` and centre-cropped to it, scaled to
  [0, 1]. ``--mean``/``--std`` then normalise per channel: ``(x - mean) / std``. No
  normalisation is ever assumed; the ImageNet values (mean 0.485,0.456,0.406, std
  0.229,0.224,0.225) are an example, for models trained with them.

- ``module:callable`` or ``path/file.py:callable`` (resolved by ``--arch``'s importer,
  ``bnfold.loading``): called with no arguments, it returns an iterable of batches, each
  a tensor (or array) or a tuple/list of them, one per model input. It is called once
  when the data is opened (its first batch checked before any model loads) and again
  for each later pass; ``--limit`` cuts its batches, ``--batch-size`` does not apply.

Samples are cut into batches of at most ``--batch-size``, of near-equal sizes (33
samples at 32 make 17 + 16, never a lone sample that training-mode BatchNorm refuses);
fewer samples than one batch is an error, and so is NaN or Inf in any batch (checked as
the batch is handed out: the data is never written).

Statistics of a BN's input ``x`` (channel axis 1), over every sample and position:
per channel the count ``n``, the sum and the sum of squares, accumulated in float64
from per-sample sums (each sum over a sample's positions in the input's precision,
float32 for half types), so ``mean = S / n`` and ``var = (Q - S^2 / n) / (n - 1)``
(unbiased, as PyTorch keeps ``running_var``). Two reductions per BN input cost about a
fifth of what the BN itself costs (``torch.var_mean`` costs 8x more); the price is a
relative error of about ``1e-7 * (mean / std)^2`` in the variance of a channel whose mean
is far from zero.

Drift (``inspect --data``), per channel, with the running statistics ``mu, sigma^2``:
``mean_shift = |mean - mu| / sqrt(sigma^2 + eps)`` (in the running standard deviation's
units) and ``var_ratio = (var + eps) / (sigma^2 + eps)``. Measured with the model in
eval mode: what every BN receives at inference.

Re-estimation (``recalibrate``, :func:`recalibrate_module`), two methods:

- ``cumulative`` (default): PyTorch's own convention. The result is what putting only the
  BN layers in training mode with ``momentum=None`` (a cumulative moving average) and
  running the same batches through the model gives: each BN normalises with the
  statistics of its batch, as in training (everything else, dropout included, stays in
  eval mode), and its new statistics are ``running_mean = (1/K) sum_k mean_k`` and
  ``running_var = (1/K) sum_k var_k`` over its K calls (batches), ``var_k`` the unbiased
  variance of batch k; ``num_batches_tracked = K``. The batch statistics come from
  BatchNorm's own kernel (momentum 1 for the pass) and are averaged in float64, so the
  pass costs what a forward pass costs. AIMET's ``reestimate_bn_stats`` and
  ``torch.optim.swa_utils.update_bn`` compute the same thing. The average of per-batch
  variances leaves out the spread of the batch means: with batches drawn in order from
  data sorted by some property, shuffle the data first.
- ``sequential`` (the known alternative, layer-by-layer re-estimation): in eval mode, the
  BN layers in data-flow order, one pass each that stops at the layer: each one gets the
  statistics (mean and unbiased variance pooled over all the data) of exactly the inputs
  it receives at inference once the layers before it are re-estimated. Afterwards
  ``inspect --data`` on the same data measures no drift at all (to float32 rounding); it
  costs about half a forward pass per BN layer, and keeps the batches in memory.

Writing back keeps the model's family: a state_dict or checkpoint is written as the same
container with the same keys (only the BN buffers change), safetensors as safetensors
(with its metadata), a pickled module as a pickled module, a torch.export archive as an
archive, ONNX as ONNX.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np

from bnfold.errors import BnfoldError, LoadError, OutputError
from bnfold.reports import DataSummary, Drift, RecalibratedLayer, RecalibrationReport
from bnfold.stats import _spread  # the min / median / max of every report

if TYPE_CHECKING:
    import onnx
    import torch
    from torch import fx

    from bnfold.loading import LoadedModel

__all__ = [
    "IMAGE_EXTENSIONS",
    "METHODS",
    "DataOptions",
    "DataSource",
    "Measurement",
    "Moments",
    "enable_running_stats_of",
    "has_batchnorm",
    "measure",
    "open_data",
    "recalibrate",
    "recalibrate_module",
    "worst_channels",
    "write_model",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
METHODS = ("cumulative", "sequential")
INSTALL_HINT = "pip install 'bnfold[data]'"

Step = Callable[[str], ContextManager[None]]


def _no_step(label: str) -> ContextManager[None]:
    return nullcontext()


# --------------------------------------------------------------------------- sources


def _callable_spec(spec: str) -> tuple[str, str] | None:
    """(source, name) when ``spec`` reads as ``module:callable`` or
    ``path/file.py:callable`` (the ``--arch`` forms), else None."""
    source, sep, name = spec.rpartition(":")
    if not (sep and source and name.isidentifier()):
        return None
    if source.endswith(".py") or all(part.isidentifier() for part in source.split(".")):
        return source, name
    return None


def _quote(e: BaseException) -> str:
    """An exception in one line: ``Type: first line of its message``."""
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _cast_floats(batch: list[torch.Tensor], dtype: torch.dtype | None) -> list[torch.Tensor]:
    if dtype is None:
        return batch
    return [t.to(dtype) if t.is_floating_point() else t for t in batch]


@dataclass(frozen=True)
class DataOptions:
    """What ``--data`` and its options ask for."""

    spec: Path | str  # a file, a folder, or module:callable / path/file.py:callable
    batch_size: int = 32
    limit: int | None = None  # --limit: at most this many samples (the first ones)
    image_size: tuple[int, int] | None = None  # (height, width) for image folders
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def parse_floats(text: str, option: str) -> tuple[float, ...]:
    """``"0.485,0.456,0.406"`` -> (0.485, 0.456, 0.406)."""
    try:
        values = tuple(float(p) for p in text.replace(" ", "").split(",") if p)
    except ValueError as e:
        raise BnfoldError(f"{option} {text!r} is not a comma-separated list of numbers") from e
    if not values or not all(math.isfinite(v) for v in values):
        raise BnfoldError(f"{option} {text!r} must list finite numbers")
    return values


def parse_size(text: str) -> tuple[int, int]:
    """``"224"`` -> (224, 224); ``"224,320"`` (height, width) -> (224, 320)."""
    parts = text.replace("x", ",").replace(" ", "").split(",")
    try:
        sizes = [int(p) for p in parts if p]
    except ValueError as e:
        raise BnfoldError(f"--image-size {text!r} is not SIZE or HEIGHT,WIDTH") from e
    if len(sizes) not in (1, 2) or any(s <= 0 for s in sizes):
        raise BnfoldError(f"--image-size {text!r} must be one or two positive sizes")
    return (sizes[0], sizes[-1])


def _split(count: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of ceil(count / batch_size) batches whose sizes differ by at most 1."""
    k = max(1, math.ceil(count / batch_size))
    base, extra = divmod(count, k)
    bounds, start = [], 0
    for i in range(k):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class DataSource:
    """Samples from one ``--data`` SPEC, handed out in batches (see the module docstring)."""

    def __init__(self, opts: DataOptions):
        self.opts = opts
        self.path = Path(opts.spec)
        self.kind = ""
        self._callable: Callable[[], Any] | None = None
        self._first: tuple[list[torch.Tensor], Iterator[Any]] | None = None
        self.bounds: list[tuple[int, int]] = []
        self.count = 0
        if opts.batch_size < 1:
            raise BnfoldError("--batch-size must be at least 1")
        if opts.limit is not None and opts.limit < 1:
            raise BnfoldError("--limit must be at least 1")
        if (opts.mean is None) != (opts.std is None):
            raise BnfoldError("--mean and --std go together: give both or neither")
        if opts.std is not None and any(s == 0 for s in opts.std):
            raise BnfoldError("--std must not contain 0")
        if opts.mean is not None and opts.std is not None and len(opts.mean) != len(opts.std):
            raise BnfoldError("--mean and --std must have as many values (one per channel)")
        self.notes: list[str] = []
        self._arrays: list[np.ndarray] = []
        self._files: list[Path] = []
        if not self.path.exists() and _callable_spec(str(opts.spec)) is not None:
            self.kind = "callable"
            self._open_callable()
            return
        if not self.path.exists():
            raise LoadError(
                "no such file or folder",
                hint="--data takes a .npz, .npy, a folder of images or module:callable",
                path=self.path,
            )
        if self.path.is_dir():
            self.kind = "images"
            self._open_images()
        elif self.path.suffix.lower() == ".npz":
            self.kind = "npz"
            self._open_npz()
        elif self.path.suffix.lower() == ".npy":
            self.kind = "npy"
            self._open_npy()
        else:
            raise LoadError(
                f"unsupported --data file {self.path.suffix or '(no extension)'!r}",
                hint="give a .npz (one array per model input), a .npy or a folder of images",
                path=self.path,
            )
        if self.count < opts.batch_size:
            raise BnfoldError(
                f"--data {self.path} holds {self.count} samples, fewer than one batch "
                f"(--batch-size {opts.batch_size})",
                hint=f"pass --batch-size {self.count} or less, or give more samples",
            )
        self.bounds = _split(self.count, opts.batch_size)

    # ---- a callable

    def _open_callable(self) -> None:
        """``module:callable`` or ``path/file.py:callable``, resolved as ``--arch`` is; it
        is called now and its first batch checked, before any model is loaded."""
        from bnfold.loading import _import_callable

        spec = str(self.opts.spec)
        o = self.opts
        given = [n for n, v in (("--image-size", o.image_size), ("--mean", o.mean)) if v]
        if given:
            raise BnfoldError(
                f"{', '.join(given)} apply to arrays and images, not to a callable's batches "
                "(the callable does its own preprocessing)"
            )
        source, _, name = spec.rpartition(":")
        try:
            fn = _import_callable(source, name, spec, option="--data", error=LoadError)
        except BnfoldError:
            raise
        except Exception as e:  # its module raised while being imported
            raise LoadError(f"--data {spec!r}: importing {source} raised {_quote(e)}") from e
        if not callable(fn):
            raise LoadError(f"--data {spec!r}: {name} is a {type(fn).__name__}, not a callable")
        self._callable = fn
        self.notes.append(
            f"batches as {spec} yields them (--batch-size does not apply to a callable)"
        )
        iterator = self._call()
        first = self._next(iterator, 0)
        if first is None:
            raise LoadError(f"--data {spec!r} yielded no batches")
        self._first = (first, iterator)
        self.shapes = tuple(tuple(int(d) for d in t.shape[1:]) for t in first)
        self.count = 0  # samples seen so far; known once the batches have run
        self.bounds = []
        self._example = [t[:2].clone() for t in first]

    def _call(self) -> Iterator[Any]:
        assert self._callable is not None
        spec = str(self.opts.spec)
        try:
            return iter(self._callable())
        except Exception as e:
            raise LoadError(f"--data {spec!r}: the callable raised {_quote(e)}") from e

    def _next(self, iterator: Iterator[Any], index: int) -> list[torch.Tensor] | None:
        """The next batch of ``iterator`` as a list of tensors, checked; None at the end."""
        import torch

        spec = str(self.opts.spec)
        try:
            item = next(iterator)
        except StopIteration:
            return None
        except Exception as e:
            raise LoadError(
                f"--data {spec!r}: the callable raised {_quote(e)} in batch {index}"
            ) from e
        items = list(item) if isinstance(item, (tuple, list)) else [item]
        tensors = []
        for i, t in enumerate(items):
            if isinstance(t, np.ndarray):
                t = torch.from_numpy(t)
            if not isinstance(t, torch.Tensor):
                raise LoadError(
                    f"--data {spec!r}: batch {index} holds a {type(t).__name__}"
                    + (f" as input {i}" if len(items) > 1 else "")
                    + ", not a tensor",
                    hint="yield a tensor, or a tuple of tensors for several inputs",
                )
            if t.dim() == 0:
                raise LoadError(
                    f"--data {spec!r}: batch {index} input {i} is a scalar: the first axis "
                    "must be the sample"
                )
            tensors.append(t.detach().cpu())
        if not tensors:
            raise LoadError(f"--data {spec!r}: batch {index} is empty")
        sizes = {int(t.shape[0]) for t in tensors}
        if len(sizes) > 1:
            raise LoadError(
                f"--data {spec!r}: the inputs of batch {index} hold different numbers of "
                f"samples ({', '.join(str(int(t.shape[0])) for t in tensors)})"
            )
        return tensors

    def _callable_batches(self) -> Iterator[list[torch.Tensor]]:
        """The callable's batches (the first call's, then a new call each time), cut at
        --limit samples; ``count`` and ``bounds`` follow."""
        if self._first is not None:
            first, iterator = self._first
            self._first = None
            batch: list[torch.Tensor] | None = first
        else:
            iterator = self._call()
            batch = self._next(iterator, 0)
            if batch is None:
                raise LoadError(f"--data {str(self.opts.spec)!r} yielded no batches")
        count, bounds, limit = 0, [], self.opts.limit
        while batch is not None:
            size = int(batch[0].shape[0])
            if limit is not None and count + size > limit:
                size = limit - count
                batch = [t[:size] for t in batch]
            bounds.append((count, count + size))
            count += size
            self.count, self.bounds = count, bounds
            yield batch
            if limit is not None and count >= limit:
                break
            batch = self._next(iterator, len(bounds))

    # ---- arrays

    def _open_npz(self) -> None:
        from bnfold.inputs import read_npz  # the reader of --inputs: the same file layout

        self._set_arrays(read_npz(self.path, as_numpy=True)[0])

    def _open_npy(self) -> None:
        try:
            array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise LoadError(f"cannot read the data: {e}", path=self.path) from e
        self._set_arrays([array])

    def _set_arrays(self, arrays: list[np.ndarray]) -> None:
        if not arrays:
            raise LoadError("the file holds no arrays", path=self.path)
        for a in arrays:
            if a.ndim == 0:
                raise LoadError(
                    "an array is a scalar: the first axis must be the sample", path=self.path
                )
            if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
                raise LoadError(f"an array has dtype {a.dtype}, not numbers", path=self.path)
        counts = {a.shape[0] for a in arrays}
        if len(counts) > 1:
            raise LoadError(
                "the arrays hold different numbers of samples "
                f"({', '.join(str(a.shape[0]) for a in arrays)}): the first axis is the sample",
                path=self.path,
            )
        total = arrays[0].shape[0]
        if total == 0:
            raise LoadError("the arrays hold no samples", path=self.path)
        count = min(total, self.opts.limit or total)
        self._arrays = [a[:count] for a in arrays]
        self.count = count
        self.shapes = tuple(tuple(int(d) for d in a.shape[1:]) for a in arrays)
        if self.opts.mean is not None:
            channels = self.shapes[0][0] if self.shapes[0] else 0
            if len(arrays) != 1 or channels != len(self.opts.mean):
                raise BnfoldError(
                    f"--mean/--std give {len(self.opts.mean)} values, but the data's channel "
                    f"axis (axis 1 of its single input) has {channels or 'no'} entries"
                )
        if self.opts.image_size is not None:
            raise BnfoldError("--image-size applies to folders of images, not to arrays")

    # ---- images

    def _open_images(self) -> None:
        files = sorted(
            (p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS),
            key=lambda p: p.relative_to(self.path).as_posix(),
        )
        files = [p for p in files if p.is_file()]
        if not files:
            raise LoadError(
                f"no images in this folder (looked for {' '.join(IMAGE_EXTENSIONS)})",
                path=self.path,
            )
        self._pil()
        self._files = files[: self.opts.limit or len(files)]
        self.count = len(self._files)
        if self.opts.image_size is None:
            with self._open(self._files[0]) as img:
                self.size = (img.height, img.width)
            self.notes.append(
                f"images used at their own size, {self.size[0]}x{self.size[1]} (pass "
                "--image-size to resize and centre-crop)"
            )
        else:
            self.size = self.opts.image_size
        self.shapes = ((3, *self.size),)
        if self.opts.mean is not None and len(self.opts.mean) != 3:
            raise BnfoldError(
                f"--mean/--std give {len(self.opts.mean)} values; images have 3 channels (RGB)"
            )
        if self.opts.mean is None:
            self.notes.append(
                "images scaled to [0, 1] and not normalised: pass the --mean and --std the "
                "model was trained with (ImageNet models: --mean 0.485,0.456,0.406 --std "
                "0.229,0.224,0.225)"
            )

    @staticmethod
    def _pil() -> Any:
        try:
            from PIL import Image
        except ImportError as e:
            raise BnfoldError("reading images needs Pillow", hint=INSTALL_HINT) from e
        return Image

    def _open(self, path: Path) -> Any:
        import warnings

        Image = self._pil()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                return Image.open(path)
        except (
            OSError,
            ValueError,
            Image.DecompressionBombError,
            Image.DecompressionBombWarning,
        ) as e:
            raise LoadError(f"cannot read the image: {e}", path=path) from e

    def _image(self, path: Path) -> np.ndarray:
        """One image as float32 (3, H, W) in [0, 1], resized to cover the size and cropped."""
        Image = self._pil()
        height, width = self.size
        with self._open(path) as img:
            try:
                rgb = img.convert("RGB")
            except (OSError, ValueError) as e:
                raise LoadError(f"cannot decode the image: {e}", path=path) from e
        if (rgb.height, rgb.width) != (height, width):
            if self.opts.image_size is None:
                raise LoadError(
                    f"is {rgb.height}x{rgb.width}, the first image {height}x{width}",
                    hint="pass --image-size to resize every image",
                    path=path,
                )
            scale = max(height / rgb.height, width / rgb.width)
            w, h = max(width, round(rgb.width * scale)), max(height, round(rgb.height * scale))
            rgb = rgb.resize((w, h), Image.Resampling.BILINEAR)
            left, top = (w - width) // 2, (h - height) // 2
            rgb = rgb.crop((left, top, left + width, top + height))
        # contiguous (C, H, W): a transposed view would carry a channels-last layout through
        # every layer, where the per-channel reductions are ~10x slower
        return np.ascontiguousarray(np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1)) / 255.0

    # ---- batches

    def batches(self, dtype: torch.dtype | None = None) -> Iterator[list[torch.Tensor]]:
        """The batches, in order: one tensor per model input; floats cast to ``dtype``.
        NaN or Inf in a batch is an error (statistics of such data mean nothing)."""
        if self.kind == "callable":
            for batch in self._callable_batches():
                start, stop = self.bounds[-1]
                yield self._checked(_cast_floats(batch, dtype), start, stop)
            return
        for start, stop in self.bounds:
            yield self._checked(self._batch(start, stop, dtype), start, stop)

    def _checked(self, batch: list[torch.Tensor], start: int, stop: int) -> list[torch.Tensor]:
        import torch

        for i, t in enumerate(batch):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise LoadError(
                    f"the data holds NaN or Inf (input {i}, samples {start}-{stop - 1})",
                    hint="clean the data: statistics of NaN or Inf mean nothing",
                    path=self.path if self.kind != "callable" else None,
                )
        return batch

    def example(self, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """The first one or two samples: example inputs of the real shape."""
        if self.kind == "callable":
            return _cast_floats(self._example, dtype)
        return self._batch(0, min(2, self.count), dtype)

    def _batch(self, start: int, stop: int, dtype: torch.dtype | None) -> list[torch.Tensor]:
        import torch

        if self.kind == "images":
            arrays = [np.stack([self._image(p) for p in self._files[start:stop]])]
        else:
            # a copy: a model that writes into its input must not change the data (and a
            # memory-mapped .npy is read-only)
            arrays = [np.array(a[start:stop]) for a in self._arrays]
        out = []
        for i, a in enumerate(arrays):
            t = torch.from_numpy(a)
            if t.is_floating_point() or (i == 0 and self.opts.mean is not None):
                t = t.to(torch.float32)
                if i == 0 and self.opts.mean is not None and self.opts.std is not None:
                    shape = (1, -1) + (1,) * (t.dim() - 2)
                    mean = torch.tensor(self.opts.mean, dtype=torch.float32).view(shape)
                    std = torch.tensor(self.opts.std, dtype=torch.float32).view(shape)
                    t = (t - mean) / std
                if dtype is not None:
                    t = t.to(dtype)
            out.append(t)
        return out

    def summary(self) -> DataSummary:
        o = self.opts
        if self.kind == "images":
            steps = [f"RGB, {self.size[0]}x{self.size[1]}"]
            if o.image_size is not None:
                steps = [
                    f"RGB, resized (bilinear) to cover {o.image_size[0]}x{o.image_size[1]} "
                    "and centre-cropped"
                ]
            steps.append("scaled to [0, 1]")
        elif self.kind == "callable":
            steps = ["as the callable yields them (floats cast to the model's dtype)"]
        else:
            steps = ["as stored (floats cast to the model's dtype)"]
        if o.mean is not None and o.std is not None:
            steps.append(
                f"normalised with mean {','.join(f'{v:g}' for v in o.mean)} "
                f"std {','.join(f'{v:g}' for v in o.std)}"
            )
        else:
            steps.append("not normalised")
        size = o.batch_size
        if self.kind == "callable":
            size = max((stop - start for start, stop in self.bounds), default=0)
        return DataSummary(
            source=str(self.opts.spec) if self.kind == "callable" else str(self.path),
            kind=self.kind,
            samples=self.count,
            batches=len(self.bounds),
            batch_size=size,
            input_shapes=self.shapes,
            preprocessing="; ".join(steps),
        )


def open_data(opts: DataOptions) -> DataSource:
    """Open ``--data``: check it and its options; nothing is decoded yet but the first image."""
    return DataSource(opts)


# --------------------------------------------------------------------------- moments


@dataclass
class Moments:
    """Per-channel count, sum and sum of squares (float64) of one BN's inputs."""

    channels: int
    count: int = 0  # values per channel
    total: np.ndarray = field(init=False)
    squares: np.ndarray = field(init=False)
    # batches known by their statistics (add_stats): how many, and the sums of their means
    # and unbiased variances, for the cumulative average
    batches: int = 0
    mean_sum: np.ndarray = field(init=False)
    var_sum: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.total = np.zeros(self.channels)
        self.squares = np.zeros(self.channels)
        self.mean_sum = np.zeros(self.channels)
        self.var_sum = np.zeros(self.channels)

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch ``x`` of shape (N, C, ...): per-sample sums, then float64."""
        import torch

        if x.dim() < 2 or x.shape[1] != self.channels:
            raise BnfoldError(
                f"a BatchNorm over {self.channels} channels got an input of shape {list(x.shape)}"
            )
        x = x.detach()
        if x.dim() == 2:
            y = x.to(torch.float64)
            s, q = y.sum(0), (y * y).sum(0)
            per = x.shape[0]
        else:
            flat = x.contiguous().flatten(2)  # channels-last input: reduce contiguous rows
            acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None
            s = flat.sum(-1, dtype=acc).to(torch.float64).sum(0)
            norms = torch.linalg.vector_norm(flat, 2, dim=-1, dtype=acc).to(torch.float64)
            q = norms.square().sum(0)
            per = x.shape[0] * flat.shape[2]
        self.total += s.numpy()
        self.squares += q.numpy()
        self.count += per

    def add_stats(self, n: int, mean: np.ndarray, var_unbiased: np.ndarray) -> None:
        """Accumulate a batch known by its count, mean and unbiased variance."""
        self.total += n * mean
        self.squares += (n - 1) * var_unbiased + n * mean * mean
        self.count += n
        self.batches += 1
        self.mean_sum += mean
        self.var_sum += var_unbiased

    @property
    def average_mean(self) -> np.ndarray:
        """The average of the batch means (PyTorch's momentum=None running_mean)."""
        return self.mean_sum / max(self.batches, 1)

    @property
    def average_var(self) -> np.ndarray:
        """The average of the batches' unbiased variances (momentum=None running_var)."""
        return self.var_sum / max(self.batches, 1)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def var(self) -> np.ndarray:
        """Unbiased variance (0 for a single value); never negative."""
        if self.count < 2:
            return np.zeros(self.channels)
        centred = self.squares - self.total * self.total / self.count
        return np.maximum(centred, 0.0) / (self.count - 1)


def drift(
    mean: np.ndarray, var: np.ndarray, running_mean: np.ndarray, running_var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per channel: |mean - running_mean| / sqrt(running_var + eps) and
    (var + eps) / (running_var + eps)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        shift = np.abs(mean - running_mean) / np.sqrt(running_var + eps)
        ratio = (var + eps) / (running_var + eps)
    return shift, ratio


def worst_channels(shift: np.ndarray, ratio: np.ndarray) -> tuple[int | None, int | None]:
    """The channel of the largest mean shift, and the channel whose variance ratio is
    furthest from 1 on a log scale (a ratio of 0.25 is as bad as one of 4); None when
    every value is NaN."""
    with np.errstate(invalid="ignore", divide="ignore"):
        far = np.abs(np.log(ratio))
    out: list[int | None] = []
    for a in (shift, far):
        known = ~np.isnan(a)
        out.append(int(np.argmax(np.where(known, a, -np.inf))) if known.any() else None)
    return out[0], out[1]


# --------------------------------------------------------------------------- BN targets


class _Enough(BaseException):  # not an Exception: a model's own `except` must not catch it
    """Raised inside a forward pass once the layer being re-estimated has had its calls."""


@dataclass(eq=False)
class _Target:
    """One BatchNorm of a PyTorch model: a BN module (observed by hooks) or a functional
    call in a torch.export graph (observed by running the graph node by node)."""

    name: str
    kind: str
    channels: int
    eps: float
    module: Any = None  # the BN module
    node: Any = None  # or the fx node of a functional batch_norm
    mean: Any = None  # the running_mean / running_var / num_batches_tracked tensors
    var: Any = None
    nbt: Any = None
    weight: Any = None  # gamma and beta of a functional call
    bias: Any = None
    trainable: bool = True  # has a training behaviour (FrozenBatchNorm2d has none)
    calls: int = 0  # calls in one forward pass
    seen: int = 0  # calls so far in the current forward pass
    pending: int = 0  # values per channel of the call in flight (cumulative method)
    moments: list[Moments] = field(default_factory=list)  # one per call in a forward pass
    values: int = 0  # values per channel of the statistics written
    nonfinite: bool = False


def _targets(model: torch.nn.Module) -> list[_Target]:
    """Every BN of ``model``: modules in registration order, then functional calls."""
    import torch

    from bnfold.graph import bn_site, is_bn_module

    if isinstance(model, torch.jit.ScriptModule):
        raise BnfoldError(
            "TorchScript hides its BatchNorm calls from Python, so bnfold cannot see what "
            "they receive",
            hint="use the weights (state_dict) with --arch, the torch.export archive (.pt2) "
            "or the ONNX file",
        )
    out = []
    for name, m in model.named_modules():
        if not is_bn_module(m):
            continue
        mean = getattr(m, "running_mean", None)
        ref = mean if mean is not None else getattr(m, "weight", None)
        out.append(
            _Target(
                name=name or "<root>",
                kind=type(m).__name__,
                channels=int(getattr(m, "num_features", ref.shape[0] if ref is not None else 0)),
                eps=float(m.eps),
                module=m,
                mean=mean,
                var=getattr(m, "running_var", None),
                nbt=getattr(m, "num_batches_tracked", None),
                trainable=isinstance(m, torch.nn.modules.batchnorm._BatchNorm),
            )
        )
    if isinstance(model, torch.fx.GraphModule):
        for node in model.graph.nodes:
            site = bn_site(model, node) if node.op == "call_function" else None
            if site is None:
                continue
            try:
                nbt = model.get_buffer(f"{site.name}.num_batches_tracked")
            except AttributeError:
                nbt = None
            out.append(
                _Target(
                    name=site.name,
                    kind=site.kind,
                    channels=site.channels,
                    eps=site.eps,
                    node=node,
                    mean=site.running_mean,
                    var=site.running_var,
                    nbt=nbt,
                    weight=site.weight,
                    bias=site.bias,
                )
            )
    return out


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    import torch

    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


class _Pass:
    """Forward passes that observe BN targets: hooks on modules, a node-by-node run for
    functional calls. The model is in eval mode during a pass; ``active`` restores every
    flag, momentum and hook when it ends."""

    def __init__(self, model: torch.nn.Module, targets: list[_Target]):
        self.model = model
        self.targets = targets
        self.by_node = {t.node: t for t in targets if t.node is not None}
        self.watch: set[int] = set()
        self.train_bn = False
        self.stop_after: _Target | None = None
        self.call_order: list[_Target] = []
        self.accepted: list[tuple[int, ...]] = []  # --input-shape, for the misfit message

    @contextmanager
    def active(
        self, watch: Iterable[_Target], train_bn: bool = False, stop_after: _Target | None = None
    ) -> Iterator[None]:
        """Observe ``watch``. ``train_bn``: the watched BN modules normalise with batch
        statistics (momentum 1, so their running buffers hold each batch's statistics)."""
        import torch

        self.watch = {id(t) for t in watch}
        self.train_bn, self.stop_after = train_bn, stop_after
        modes = {m: m.training for m in self.model.modules()}
        tuned = [
            t for t in self.targets if train_bn and t.module is not None and id(t) in self.watch
        ]
        momenta = [(t.module, t.module.momentum) for t in tuned]
        handles = []
        try:
            for m in modes:  # not .eval(): torch.export's modules refuse it
                m.training = False
            for t in self.targets:
                if t.module is not None:
                    handles.append(t.module.register_forward_pre_hook(self._pre_hook(t)))
            for t in tuned:
                t.module.training = True  # the BN only, not its children (timm's act, drop)
                t.module.momentum = 1.0
                with torch.no_grad():  # 0 * NaN would leak old non-finite statistics in
                    t.mean.zero_()
                    t.var.fill_(1.0)
                handles.append(t.module.register_forward_hook(self._post_hook(t)))
            with torch.no_grad() if train_bn else torch.inference_mode():
                yield
        finally:
            for h in handles:
                h.remove()
            for m, training in modes.items():
                m.training = training
            for m, momentum in momenta:
                m.momentum = momentum
            self.watch, self.train_bn, self.stop_after = set(), False, None

    def run(self, batch: Sequence[torch.Tensor]) -> None:
        """One forward pass on ``batch``."""
        for t in self.targets:
            t.seen = 0
        try:
            if self.by_node:
                _interpreter(self.model, self).run(*batch)  # type: ignore[arg-type]
            else:
                self.model(*batch)
        except _Enough:
            pass
        except BnfoldError:
            raise
        except Exception as e:
            raise _misfit(self.model, batch, e, self.accepted) from e

    def _called(self, t: _Target) -> Moments | None:
        """Count a call of ``t``; its accumulator when ``t`` is watched."""
        index = t.seen
        t.seen += 1
        if t.seen > t.calls:
            t.calls = t.seen
        if index == 0 and t not in self.call_order:
            self.call_order.append(t)
        if id(t) not in self.watch:
            return None
        while len(t.moments) <= index:
            t.moments.append(Moments(t.channels))
        return t.moments[index]

    def _stop(self, t: _Target) -> None:
        if self.stop_after is t and t.seen >= t.calls:
            raise _Enough

    def _pre_hook(self, t: _Target) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            acc = self._called(t)
            if acc is None:
                return
            if self.train_bn:  # the statistics come from the kernel; see _post_hook
                t.pending = int(args[0].numel() // t.channels)
            else:
                acc.add(args[0])
                self._stop(t)

        return hook

    def _post_hook(self, t: _Target) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            t.moments[t.seen - 1].add_stats(t.pending, _numpy(t.mean), _numpy(t.var))

        return hook

    def functional(self, t: _Target, fn: Any, args: tuple[Any, ...], kwargs: dict) -> Any:
        """A functional batch_norm call: observed, or (cumulative method) computed with the
        batch's statistics in temporary buffers."""
        import torch
        import torch.nn.functional as F

        acc = self._called(t)
        x = args[0]
        if acc is None or not self.train_bn:
            if acc is not None:
                acc.add(x)
                self._stop(t)
            return fn(*args, **kwargs)
        mean = torch.zeros(t.channels, dtype=t.mean.dtype)
        var = torch.ones(t.channels, dtype=t.var.dtype)
        out = F.batch_norm(x, mean, var, t.weight, t.bias, True, 1.0, t.eps)
        acc.add_stats(int(x.numel() // t.channels), _numpy(mean), _numpy(var))
        if fn == torch.ops.aten._native_batch_norm_legit_no_training.default:
            return (out, torch.empty(0), torch.empty(0))  # only item 0 is read
        return out


def _misfit(
    model: torch.nn.Module,
    batch: Sequence[torch.Tensor],
    e: Exception,
    accepted: Sequence[tuple[int, ...]] = (),
) -> BnfoldError:
    """The model does not run on a batch: one line naming each input, the shape and dtype
    given, the shape the model takes (``--input-shape``, else its first layer's), and
    what the model raised."""
    from bnfold.inputs import accepted_shape, input_names

    given = "; ".join(
        f"{name} has shape {list(t.shape)} ({str(t.dtype).removeprefix('torch.')})"
        for name, t in zip(input_names(model, len(batch)), batch, strict=True)
    )
    wanted = accepted_shape(model)
    takes = f"; the model's first layer takes {wanted}" if wanted else ""
    if accepted:
        shapes = " and ".join(str(list(shape)) for shape in accepted)
        takes = f"; --input-shape says the model takes {shapes}" + takes
    return BnfoldError(
        f"the model does not run on the data: {given}{takes}: {_quote(e)}",
        hint="check --data and its --image-size/--mean/--std",
    )


def _counted(batches: Iterable[Any], step: Step, label: str) -> Iterator[Any]:
    """``batches``, each one run inside ``step(label: batch k[/n])``: a progress line per
    batch on a terminal (the CLI's steps are silent elsewhere)."""
    total = len(batches) if isinstance(batches, list) else None
    for k, batch in enumerate(batches, 1):
        with step(f"{label}: batch {k}" + (f"/{total}" if total else "")):
            yield batch


def _numpy(t: torch.Tensor) -> np.ndarray:
    import torch

    return t.detach().to(torch.float64).cpu().numpy()


_INTERPRETER: type | None = None


def _interpreter(gm: fx.GraphModule, owner: _Pass) -> fx.Interpreter:
    """An fx.Interpreter over ``gm`` that hands functional BN calls to ``owner`` (the
    class is made on first use: torch is not imported with this module)."""
    global _INTERPRETER
    if _INTERPRETER is None:
        from torch import fx

        class Interpreter(fx.Interpreter):
            def __init__(self, gm: fx.GraphModule, owner: _Pass):
                super().__init__(gm, garbage_collect_values=True)
                self.owner = owner

            def run_node(self, n: fx.Node) -> Any:
                t = self.owner.by_node.get(n)
                if t is None:
                    return super().run_node(n)
                with self._set_current_node(n):
                    args, kwargs = self.fetch_args_kwargs_from_env(n)
                    return self.owner.functional(t, n.target, args, kwargs)

        _INTERPRETER = Interpreter
    return _INTERPRETER(gm, owner)


# --------------------------------------------------------------------------- measuring


@dataclass
class Measurement:
    """Per-BN statistics of the data, keyed as ``inspect`` names layers (a BN called k
    times per forward pass: ``name``, ``name#2`` ... ``name#k``), and what data it was."""

    moments: dict[str, Moments]
    data: DataSummary
    notes: list[str] = field(default_factory=list)


def measure(
    loaded: LoadedModel,
    source: DataSource,
    step: Step = _no_step,
    input_shapes: Sequence[Sequence[int]] = (),
) -> Measurement:
    """Run the data through the model as at inference (eval mode) and measure the inputs
    of every BN. The model is left as it was. ``input_shapes`` (``--input-shape``) are
    named, beside the first layer's, when the data does not fit the model."""
    notes = list(source.notes)
    if not has_batchnorm(loaded):
        return Measurement({}, source.summary(), [NO_BN])
    label = f"Running {source.count} samples ({len(source.bounds)} batches)"
    if source.kind == "callable":
        label = f"Running the batches of {source.opts.spec}"
    if loaded.onnx_model is not None:
        moments = _onnx_measure(loaded.onnx_model, source, step, label + " in onnxruntime")
    elif _is_script(loaded.module):
        moments = _script_measure(loaded.module, source, step, label + " in onnxruntime")
        notes.append("TorchScript: measured on its ONNX export (legacy exporter) in onnxruntime")
    elif loaded.module is not None:
        model = loaded.module
        targets = _targets(model)
        run = _Pass(model, targets)
        run.accepted = [tuple(int(d) for d in shape) for shape in input_shapes]
        with run.active(targets):
            for batch in _counted(source.batches(_model_dtype(model)), step, label):
                run.run(batch)
        moments = {}
        for t in targets:
            for k, m in enumerate(t.moments):
                moments[t.name if k == 0 else f"{t.name}#{k + 1}"] = m
    else:
        raise BnfoldError(
            "--data needs the architecture: a bare state_dict cannot be run",
            hint="pass --arch (e.g. torchvision:resnet50 or path/file.py:Net)",
            path=loaded.path,
        )
    if source.count < 64:
        notes.append(
            f"statistics from {source.count} samples: a channel's mean on this data is "
            f"uncertain by about {1 / math.sqrt(source.count):.2g} of its standard deviation"
        )
    return Measurement(moments, source.summary(), notes)


# --------------------------------------------------------------------------- re-estimation


def recalibrate_module(
    module: torch.nn.Module,
    batches: Iterable[Sequence[torch.Tensor]],
    *,
    method: str = "cumulative",
    step: Step = _no_step,
    data: DataSummary | None = None,
) -> RecalibrationReport:
    """Re-estimate the running statistics of every BatchNorm in ``module``, in place.

    ``batches`` yields the inputs of one forward pass at a time (floating tensors are
    cast to the model's dtype; ``DataSource.batches()`` fits). ``method``:
    ``cumulative`` (one pass, only the BN layers in training mode with
    ``momentum=None``: PyTorch's own cumulative average of the batch statistics) or
    ``sequential`` (the exact statistics each BN receives at inference, one pass per BN;
    the batches are kept in memory); see the module docstring. A BN the data never
    reaches, one without running statistics, or whose new statistics would not be finite
    keeps its old ones, and the report says why. On an error every statistic is restored.
    Training/eval flags are left as they were.
    """
    if method not in METHODS:
        raise BnfoldError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    started = time.perf_counter()
    targets = _targets(module)
    before = {id(t): (_copy(t.mean), _copy(t.var), _copy(t.nbt)) for t in targets}
    run = _Pass(module, targets)
    batches = _cast(batches, _model_dtype(module))
    count = passes = 0
    try:
        if method == "cumulative":
            watch = [t for t in targets if t.trainable and t.mean is not None]
            label = "Re-estimating BatchNorm statistics"
            with run.active(watch, train_bn=True):
                for batch in _counted(batches, step, label):
                    if batch and batch[0].dim() > 0 and batch[0].shape[0] < 2:
                        raise BnfoldError(
                            "the cumulative method needs batches of at least 2 samples (training-"
                            "mode BatchNorm cannot normalise one value per channel)",
                            hint="give more samples or a larger --batch-size, or use "
                            "--method sequential",
                        )
                    run.run(batch)
                    count += 1
            passes = 1
            for t in watch:
                _store(t, count, average=True)
            # the pass overwrote the buffers of every watched BN: one that got no new
            # statistics (never reached, not finite) gets its old ones back
            _restore([t for t in watch if not t.values], before)
        else:
            kept = list(batches)
            count = len(kept)
            if not kept:
                raise BnfoldError("no data: there are no batches")
            with step("Finding the BatchNorm call order"), run.active(()):
                run.run(kept[0])  # the order, and how often each BN is called per pass
            order = [t for t in run.call_order if t.mean is not None]
            for i, t in enumerate(order, 1):
                with step(f"Re-estimating {t.name} ({i}/{len(order)})"):
                    with run.active([t], stop_after=t):
                        for batch in kept:
                            run.run(batch)
                    _store(t, count)
                passes += 1
    except BaseException:
        _restore(targets, before)
        raise
    called = list(run.call_order)
    layers = tuple(
        _layer_result(t, before[id(t)]) for t in called + [t for t in targets if t not in called]
    )
    return RecalibrationReport(
        model=None,
        format=None,
        output=None,
        method=method,
        data=data,
        layers=layers,
        updated=sum(layer.updated for layer in layers),
        complete=all(layer.updated for layer in layers if layer.reason != "no_running_stats"),
        batches=count,
        passes=passes,
        seconds=round(time.perf_counter() - started, 3),
    )


def _cast(
    batches: Iterable[Sequence[torch.Tensor]], dtype: torch.dtype
) -> Iterator[list[torch.Tensor]]:
    for batch in batches:
        yield [t.to(dtype) if t.is_floating_point() else t for t in batch]


def _copy(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


def _restore(targets: list[_Target], before: dict[int, tuple[Any, Any, Any]]) -> None:
    import torch

    with torch.no_grad():
        for t in targets:
            for tensor, old in zip((t.mean, t.var, t.nbt), before[id(t)], strict=True):
                if tensor is not None and old is not None:
                    tensor.copy_(old)


def _pooled(parts: Iterable[Moments], channels: int) -> Moments:
    pooled = Moments(channels)
    for m in parts:
        pooled.count += m.count
        pooled.total += m.total
        pooled.squares += m.squares
        pooled.batches += m.batches
        pooled.mean_sum += m.mean_sum
        pooled.var_sum += m.var_sum
    return pooled


def _store(t: _Target, batches: int, *, average: bool = False) -> None:
    """Write the new statistics into the target's running buffers (rounded once):
    ``average``, the cumulative average over every call (PyTorch's momentum=None, with
    ``num_batches_tracked`` the number of calls); else the pooled statistics of all the
    inputs, ``num_batches_tracked`` = ``batches``."""
    import torch

    pooled = _pooled(t.moments, t.channels)
    if pooled.count == 0:
        return
    mean, var = pooled.mean, pooled.var
    if average:
        mean, var, batches = pooled.average_mean, pooled.average_var, pooled.batches
    if not (np.isfinite(mean).all() and np.isfinite(var).all()):
        t.nonfinite = True
        return
    with torch.no_grad():
        t.mean.copy_(torch.from_numpy(mean))
        t.var.copy_(torch.from_numpy(var))
        if t.nbt is not None:
            t.nbt.fill_(batches)
    t.values = pooled.count


def _layer_result(t: _Target, old: tuple[Any, Any, Any]) -> RecalibratedLayer:
    reason = detail = None
    if t.mean is None or t.var is None:
        reason, detail = "no_running_stats", "no running statistics: it always uses batch ones"
    elif t.nonfinite:
        reason, detail = "nonfinite", "the data gives NaN/Inf statistics: the old ones are kept"
    elif not t.calls:
        reason, detail = "not_called", "the data never reaches it: the old statistics are kept"
    elif not t.values and not t.trainable:
        reason = "frozen"
        detail = f"{t.kind} has no training behaviour; --method sequential re-estimates it"
    shift = ratio = None
    worst: tuple[int | None, int | None] = (None, None)
    if t.values and old[0] is not None and old[1] is not None:
        shift, ratio = drift(_numpy(t.mean), _numpy(t.var), _numpy(old[0]), _numpy(old[1]), t.eps)
        worst = worst_channels(shift, ratio)
    return RecalibratedLayer(
        name=t.name,
        kind=t.kind,
        channels=t.channels,
        updated=bool(t.values),
        reason=reason,
        detail=detail,
        calls=t.calls,
        values=t.values,
        mean_shift=_spread(shift),
        var_ratio=_spread(ratio),
        running_var=_spread(_numpy(t.var)) if t.var is not None else None,
        mean_shift_channel=worst[0],
        var_ratio_channel=worst[1],
    )


# --------------------------------------------------------------------------- ONNX


@dataclass
class _OnnxBN:
    name: str  # as inspect names it: the node's name, or BatchNormalization_<index>
    node: Any
    channels: int
    eps: float
    training: bool
    mean: str | None  # initializer names of the running statistics (None: not constant)
    var: str | None


def _onnx_bns(model: onnx.ModelProto) -> list[_OnnxBN]:
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for i, node in enumerate(model.graph.node):
        if node.op_type != "BatchNormalization":
            continue
        attrs = {a.name: a for a in node.attribute}
        sizes = [int(np.prod(inits[n].dims)) for n in node.input[1:5] if n in inits]
        out.append(
            _OnnxBN(
                name=node.name or f"BatchNormalization_{i}",
                node=node,
                channels=sizes[0] if sizes else 0,
                eps=float(attrs["epsilon"].f) if "epsilon" in attrs else 1e-5,
                training=bool(attrs["training_mode"].i) if "training_mode" in attrs else False,
                mean=node.input[3] if len(node.input) > 3 and node.input[3] in inits else None,
                var=node.input[4] if len(node.input) > 4 and node.input[4] in inits else None,
            )
        )
    return out


def _onnx_session(model: onnx.ModelProto) -> Any:
    """A CPU session with the graph optimisations off: no fusion hides a BN's input."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        data = model.SerializeToString()
    except ValueError as e:  # protobuf refuses more than 2 GB
        raise BnfoldError(f"--data on ONNX models over 2 GB is not supported ({e})") from e
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _onnx_feeds(model: onnx.ModelProto, batch: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    import onnx

    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(batch) != len(inputs):
        raise BnfoldError(
            f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}), the "
            f"data gives {len(batch)} arrays per sample"
        )
    feeds = {}
    for value, t in zip(inputs, batch, strict=True):
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feeds[value.name] = t.numpy().astype(dtype, copy=False)
    return feeds


def _with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``names``."""
    import onnx

    work = onnx.ModelProto()
    work.CopyFrom(model)
    present = {o.name for o in work.graph.output} | {i.name for i in work.graph.input}
    for name in dict.fromkeys(names):
        if name not in present:
            work.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return work


def _run_onnx(session: Any, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    import torch

    wanted = [n for n in names if n not in feeds]
    try:
        values = session.run(wanted, feeds) if wanted else []  # [] would ask for every output
    except Exception as e:
        # name each graph input: the shape and dtype given, the shape and type it declares
        declared = {i.name: i for i in session.get_inputs()}
        parts = []
        for name, array in feeds.items():
            d = declared.get(name)
            if d is None or name.endswith(("running_mean", "running_var")):
                continue
            shape = [dim if isinstance(dim, int) else str(dim) for dim in d.shape]
            parts.append(
                f"input {name!r} has shape {list(array.shape)} ({array.dtype}); the model "
                f"takes {shape} ({d.type})"
            )
        given = "; ".join(parts[:4])
        raise BnfoldError(
            f"onnxruntime cannot run the model on the data: {given}: {_quote(e)}",
            hint="check --data and its --image-size/--mean/--std",
        ) from e
    got = dict(zip(wanted, values, strict=True))
    return {n: torch.from_numpy(np.asarray(got[n] if n in got else feeds[n])) for n in names}


def _onnx_measure(
    model: onnx.ModelProto, source: DataSource, step: Step = _no_step, label: str = ""
) -> dict[str, Moments]:
    bns = _onnx_bns(model)
    inputs = [bn.node.input[0] for bn in bns]
    session = _onnx_session(_with_outputs(model, inputs))
    moments: dict[str, Moments] = {}
    for batch in _counted(source.batches(), step, label):
        values = _run_onnx(session, inputs, _onnx_feeds(model, batch))
        for bn in bns:
            x = values[bn.node.input[0]]
            m = moments.setdefault(bn.name, Moments(bn.channels or int(x.shape[1])))
            m.add(x)
    return moments


def _is_script(module: Any) -> TypeGuard[torch.jit.ScriptModule]:
    import torch

    return isinstance(module, torch.jit.ScriptModule)


def _script_measure(
    model: torch.jit.ScriptModule, source: DataSource, step: Step, label: str
) -> dict[str, Moments]:
    """A TorchScript model's BN inputs: hooks cannot be added to a loaded ScriptModule, so
    it is exported with the legacy ONNX exporter (which takes ScriptModules), every
    BatchNormalization kept, and measured in onnxruntime like an ONNX model; each BN is
    named back after its module (its ``running_mean`` is ``<module>.running_mean``)."""
    import io

    import onnx
    import torch

    first = next(iter(source.batches()))
    names = [f"input_{i}" for i in range(len(first))]
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                tuple(first),
                buffer,  # type: ignore[arg-type]  # the legacy exporter writes file objects
                dynamo=False,
                do_constant_folding=False,
                training=torch.onnx.TrainingMode.PRESERVE,
                input_names=names,
                dynamic_axes={n: {0: "batch"} for n in names},
            )
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise BnfoldError(
            f"TorchScript hides its BatchNorm calls from Python, and its ONNX export failed "
            f"({type(e).__name__}: {first_line})",
            hint="use the weights (state_dict) with --arch, the torch.export archive (.pt2) "
            "or the ONNX file",
        ) from e
    proto = onnx.load_from_string(buffer.getvalue())
    by_node = {
        n.name: n.input[3].removesuffix(".running_mean")
        for n in proto.graph.node
        if n.op_type == "BatchNormalization" and n.input[3].endswith(".running_mean")
    }
    measured = _onnx_measure(proto, source, step, label)
    return {by_node.get(name, name): m for name, m in measured.items()}


def _private_statistics(model: onnx.ModelProto, bns: list[_OnnxBN]) -> None:
    """Give every BN its own running_mean/var initializers (exporters share equal ones,
    like the all-zero means of never-trained layers), so each can change alone."""
    from collections import Counter

    uses = Counter(name for node in model.graph.node for name in node.input)
    uses.update(o.name for o in model.graph.output)
    inits = {t.name: t for t in model.graph.initializer}
    taken = set(inits) | {v for node in model.graph.node for v in node.output}
    for bn in bns:
        for slot, attr in ((3, "mean"), (4, "var")):
            old = getattr(bn, attr)
            if old is None or uses[old] <= 1:
                continue
            new = f"{bn.name}.running_{attr}"
            while new in taken:
                new += "_"
            copy = model.graph.initializer.add()
            copy.CopyFrom(inits[old])
            copy.name = new
            bn.node.input[slot] = new
            uses[old] -= 1
            taken.add(new)
            setattr(bn, attr, new)


def _onnx_recalibrate(
    model: onnx.ModelProto, source: DataSource, method: str, step: Step
) -> tuple[list[RecalibratedLayer], int]:
    """Re-estimate the BNs of an ONNX model in place; (layers, passes)."""
    import onnx
    from onnx import numpy_helper

    bns = _onnx_bns(model)
    _private_statistics(model, bns)
    inits = {t.name: t for t in model.graph.initializer}
    current = {n: numpy_helper.to_array(inits[n]) for bn in bns for n in (bn.mean, bn.var) if n}
    before = {n: a.astype(np.float64) for n, a in current.items()}
    usable = [bn for bn in bns if bn.mean and bn.var and not bn.training]
    moments = {bn.name: Moments(bn.channels) for bn in usable}
    passes = 0
    if method == "cumulative":
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < 14:
            raise BnfoldError(
                f"the cumulative method on ONNX needs opset 14 or later (BatchNormalization's "
                f"training mode); this model has opset {opset}",
                hint="use --method sequential",
            )
        work = onnx.ModelProto()
        work.CopyFrom(model)
        wanted = []
        by_name = {bn.name: bn for bn in _onnx_bns(work)}
        for bn in usable:
            node = by_name[bn.name].node
            for a in list(node.attribute):
                if a.name in ("training_mode", "momentum"):
                    node.attribute.remove(a)
            node.attribute.extend(
                [
                    onnx.helper.make_attribute("training_mode", 1),
                    onnx.helper.make_attribute("momentum", 0.0),
                ]
            )
            stats = [f"{bn.name}.bnfold_mean", f"{bn.name}.bnfold_var", f"{bn.name}.bnfold_shape"]
            del node.output[1:]
            node.output.extend(stats[:2])
            work.graph.node.append(onnx.helper.make_node("Shape", [node.input[0]], [stats[2]]))
            wanted += stats
        session = _onnx_session(_with_outputs(work, wanted))
        label = "Re-estimating BatchNorm statistics in onnxruntime"
        for batch in _counted(source.batches(), step, label):
            values = _run_onnx(session, wanted, _onnx_feeds(model, batch))
            for bn in usable:
                mean = values[f"{bn.name}.bnfold_mean"].numpy().astype(np.float64)
                var = values[f"{bn.name}.bnfold_var"].numpy().astype(np.float64)  # biased
                n = int(np.prod(values[f"{bn.name}.bnfold_shape"].numpy())) // bn.channels
                moments[bn.name].add_stats(n, mean, var * n / max(n - 1, 1))
        passes = 1
        for bn in usable:
            _onnx_store(bn, moments[bn.name], current, average=True)
    else:
        # the statistics become inputs (initializers listed as inputs can be overridden)
        work = onnx.ModelProto()
        work.CopyFrom(model)
        listed = {i.name for i in work.graph.input}
        for name, array in current.items():
            if name not in listed:
                dtype = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
                value = onnx.helper.make_tensor_value_info(name, dtype, array.shape)
                work.graph.input.append(value)
        session = _onnx_session(_with_outputs(work, [bn.node.input[0] for bn in usable]))
        kept = list(source.batches())
        for i, bn in enumerate(usable, 1):
            with step(f"Re-estimating {bn.name} ({i}/{len(usable)})"):
                for batch in kept:
                    feeds = {**_onnx_feeds(model, batch), **current}
                    x = _run_onnx(session, [bn.node.input[0]], feeds)[bn.node.input[0]]
                    moments[bn.name].add(x)
                _onnx_store(bn, moments[bn.name], current)
            passes += 1
    for bn in usable:
        for stat in (bn.mean, bn.var):
            assert stat is not None
            inits[stat].CopyFrom(numpy_helper.from_array(current[stat], stat))
    layers = []
    for bn in bns:
        m = moments.get(bn.name)
        reason = detail = None
        if bn.training:
            reason, detail = "train_mode", "in training mode: it normalises with batch statistics"
        elif not (bn.mean and bn.var):
            reason, detail = "not_constant", "its running statistics are not initializers"
        elif m is None or not m.count:
            reason, detail = "not_called", "the data never reaches it: old statistics kept"
        elif not (np.isfinite(m.mean).all() and np.isfinite(m.var).all()):
            reason, detail = "nonfinite", "the data gives NaN/Inf statistics: the old ones are kept"
        updated = reason is None
        shift = ratio = None
        worst: tuple[int | None, int | None] = (None, None)
        if updated and bn.mean and bn.var:
            shift, ratio = drift(
                current[bn.mean].astype(np.float64),
                current[bn.var].astype(np.float64),
                before[bn.mean],
                before[bn.var],
                bn.eps,
            )
            worst = worst_channels(shift, ratio)
        layers.append(
            RecalibratedLayer(
                name=bn.name,
                kind="ONNX BatchNormalization",
                channels=bn.channels,
                updated=updated,
                reason=reason,
                detail=detail,
                calls=1 if m is not None and m.count else 0,
                values=m.count if updated and m is not None else 0,
                mean_shift=_spread(shift),
                var_ratio=_spread(ratio),
                running_var=_spread(current[bn.var].astype(np.float64)) if bn.var else None,
                mean_shift_channel=worst[0],
                var_ratio_channel=worst[1],
            )
        )
    return layers, passes


def _onnx_store(
    bn: _OnnxBN, m: Moments, current: dict[str, np.ndarray], *, average: bool = False
) -> None:
    mean, var = (m.average_mean, m.average_var) if average else (m.mean, m.var)
    if not m.count or not (np.isfinite(mean).all() and np.isfinite(var).all()):
        return
    assert bn.mean is not None and bn.var is not None
    current[bn.mean] = mean.astype(current[bn.mean].dtype)
    current[bn.var] = var.astype(current[bn.var].dtype)


# --------------------------------------------------------------------------- whole models


def recalibrate(
    loaded: LoadedModel,
    source: DataSource,
    *,
    method: str = "cumulative",
    enable_running_stats: bool = False,
    measure_drift: bool = True,
    step: Step = _no_step,
) -> RecalibrationReport:
    """Re-estimate every BN of a loaded model in place (its module or ONNX graph).

    A model without any BatchNorm gives a report with no layers, and the data is not run.
    ``measure_drift``: also run the data in eval mode before and after (two more forward
    passes) and give each layer its drift on the data with the old statistics and with
    the new ones (``drift_before``, ``drift_after``).
    ``enable_running_stats``: BN modules built with ``track_running_stats=False`` first get
    running buffers (see :func:`enable_running_stats`), which are then re-estimated.
    """
    if method not in METHODS:
        raise BnfoldError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    started = time.perf_counter()
    notes = list(loaded.notes) + list(source.notes)
    if not has_batchnorm(loaded):
        return RecalibrationReport(
            model=str(loaded.path),
            format=loaded.format.value,
            output=None,
            method=method,
            data=source.summary(),
            layers=(),
            updated=0,
            complete=True,
            batches=0,
            passes=0,
            seconds=0.0,
            notes=(*notes, NO_BN),
        )
    if enable_running_stats:
        if loaded.module is None:
            raise BnfoldError(
                "--enable-running-stats applies to PyTorch modules (an ONNX BatchNormalization "
                "always has running statistics)"
            )
        enabled = enable_running_stats_of(loaded.module)
        if enabled:
            notes.append(
                f"running statistics created for {len(enabled)} BatchNorm layer(s) built with "
                f"track_running_stats=False: {', '.join(enabled[:5])}"
                + (" …" if len(enabled) > 5 else "")
            )
    before: dict[str, Drift] = {}
    if measure_drift:
        before = drift_by_layer(loaded, measure(loaded, source, _labelled(step, "before")))
    if loaded.onnx_model is not None:
        layers, passes = _onnx_recalibrate(loaded.onnx_model, source, method, step)
        report = RecalibrationReport(
            model=None,
            format=None,
            output=None,
            method=method,
            data=None,
            layers=tuple(layers),
            updated=sum(layer.updated for layer in layers),
            complete=all(layer.updated for layer in layers),
            batches=len(source.bounds),
            passes=passes,
            seconds=0.0,
        )
    elif loaded.module is not None:
        report = recalibrate_module(loaded.module, source.batches(), method=method, step=step)
    else:
        raise BnfoldError(
            "re-estimation needs the architecture: a bare state_dict cannot be run",
            hint="pass --arch (e.g. torchvision:resnet50 or path/file.py:Net)",
            path=loaded.path,
        )
    if measure_drift:
        after = drift_by_layer(loaded, measure(loaded, source, _labelled(step, "after")))
        report = replace(
            report,
            layers=tuple(
                replace(
                    layer,
                    drift_before=before.get(layer.name),
                    drift_after=after.get(layer.name),
                )
                for layer in report.layers
            ),
        )
    return replace(
        report,
        model=str(loaded.path),
        format=loaded.format.value,
        data=source.summary(),
        seconds=round(time.perf_counter() - started, 3),
        notes=tuple(notes),
    )


def _labelled(step: Step, when: str) -> Step:
    """``step`` with labels saying which drift pass runs."""

    def labelled(label: str) -> ContextManager[None]:
        return step(f"Drift {when} re-estimation. {label}")

    return labelled


NO_BN = "the model has no BatchNorm layer: nothing to measure or re-estimate"


def drift_by_layer(loaded: LoadedModel, measured: Measurement) -> dict[str, Drift]:
    """Per BN layer (first call), the drift of its current running statistics from what
    ``measured`` says it receives on the data."""
    out: dict[str, Drift] = {}
    stats: list[tuple[str, np.ndarray, np.ndarray, float]] = []
    if loaded.onnx_model is not None:
        from onnx import numpy_helper

        inits = {t.name: t for t in loaded.onnx_model.graph.initializer}
        for bn in _onnx_bns(loaded.onnx_model):
            if bn.mean and bn.var:
                mean = numpy_helper.to_array(inits[bn.mean]).astype(np.float64)
                var = numpy_helper.to_array(inits[bn.var]).astype(np.float64)
                stats.append((bn.name, mean, var, bn.eps))
    elif loaded.module is not None:
        for t in _targets(loaded.module):
            if t.mean is not None and t.var is not None:
                stats.append((t.name, _numpy(t.mean), _numpy(t.var), t.eps))
    for name, mean, var, eps in stats:
        m = measured.moments.get(name)
        if m is None or not m.count:
            continue
        shift, ratio = drift(m.mean, m.var, mean, var, eps)
        spreads = _spread(shift), _spread(ratio)
        if spreads[0] is None or spreads[1] is None:
            continue
        worst = worst_channels(shift, ratio)
        out[name] = Drift(spreads[0], spreads[1], worst[0], worst[1])
    return out


def has_batchnorm(loaded: LoadedModel) -> bool:
    """Whether the loaded model has any BatchNorm (module, functional call or ONNX node);
    True when it cannot be told without running (a bare state_dict is refused later)."""
    if loaded.onnx_model is not None:
        return bool(_onnx_bns(loaded.onnx_model))
    if loaded.module is not None:
        import torch

        if isinstance(loaded.module, torch.jit.ScriptModule):
            return True  # refused with its own message by _targets
        return bool(_targets(loaded.module))
    return True


def enable_running_stats_of(module: torch.nn.Module) -> list[str]:
    """Give every BatchNorm module built with ``track_running_stats=False`` running
    buffers (``running_mean`` 0, ``running_var`` 1, ``num_batches_tracked`` 0, in its
    parameters' dtype and device) and ``track_running_stats=True``, so that a
    re-estimation fills them and the layer then folds. Returns the names of the layers."""
    import torch

    names = []
    for name, m in module.named_modules():
        if not isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            continue
        if m.track_running_stats and getattr(m, "running_mean", None) is not None:
            continue
        ref = m.weight if m.weight is not None else None
        kwargs: dict[str, Any] = {"dtype": ref.dtype if ref is not None else torch.float32}
        if ref is not None:
            kwargs["device"] = ref.device
        # register_buffer refuses a name already set to None as an attribute: drop it first
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            if buffer in m._buffers:
                del m._buffers[buffer]
        m.register_buffer("running_mean", torch.zeros(m.num_features, **kwargs))
        m.register_buffer("running_var", torch.ones(m.num_features, **kwargs))
        m.register_buffer(
            "num_batches_tracked",
            torch.tensor(0, dtype=torch.long, device=kwargs.get("device")),
        )
        m.track_running_stats = True
        m.__dict__["_bnfold_created_stats"] = True  # write_model adds them to the file
        names.append(name or "<root>")
    return names


def write_model(
    loaded: LoadedModel, report: RecalibrationReport, out: Path, *, force: bool = False
) -> None:
    """Write the re-estimated model to ``out`` in its own family (module docstring),
    atomically: a temporary file beside ``out`` renamed into place."""
    from bnfold.export import atomic_output
    from bnfold.loading import ModelFormat

    if Path(out).resolve() == Path(loaded.path).resolve():
        raise OutputError(
            f"refusing to overwrite the input {loaded.path}", hint="choose another --out"
        )
    fmt = loaded.format
    updates = _updates(loaded, report)
    with atomic_output(Path(out), force=force) as tmp:
        target = tmp / Path(out).name
        if fmt is ModelFormat.ONNX:
            _save_onnx(loaded, target)
        elif fmt is ModelFormat.EXPORTED_PROGRAM:
            _save_exported(loaded, updates, target)
        elif fmt is ModelFormat.PICKLED_MODULE:
            _torch_save(loaded.module, target)
        elif fmt is ModelFormat.SAFETENSORS:
            _save_safetensors(loaded, updates, target)
        elif fmt in (ModelFormat.STATE_DICT, ModelFormat.CHECKPOINT):
            _save_container(loaded, updates, target)
        else:
            raise BnfoldError(f"cannot write a {fmt.value} model")


def _updates(loaded: LoadedModel, report: RecalibrationReport) -> dict[str, torch.Tensor]:
    """state_dict key -> new value, for the buffers of every re-estimated BN."""
    if loaded.module is None:
        return {}
    state = loaded.module.state_dict()
    out = {}
    for layer in report.layers:
        if not layer.updated:
            continue
        prefix = "" if layer.name == "<root>" else f"{layer.name}."
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            if prefix + buffer in state:
                out[prefix + buffer] = state[prefix + buffer].detach().clone()
    return out


def _torch_save(obj: Any, target: Path) -> None:
    import torch

    try:
        torch.save(obj, target)
    except (OSError, RuntimeError) as e:
        raise OutputError(f"cannot write {target.name}: {e}") from e


def _prefix(container: Any, keys: list[str]) -> str | None:
    """The prefix p such that ``p + key`` is in ``container`` for every key (DataParallel's
    ``module.``, Lightning's ``model.``), or None."""
    if not keys or not isinstance(container, dict):
        return None
    first = keys[0]
    for raw in container:
        if isinstance(raw, str) and raw.endswith(first):
            p = raw[: len(raw) - len(first)]
            if (not p or p.endswith(".")) and all(p + k in container for k in keys):
                return p
    return None


def _apply(container: dict, prefix: str, updates: dict[str, torch.Tensor]) -> None:
    """Replace (same dtype) or, for buffers created by --enable-running-stats, add."""
    for key, value in updates.items():
        old = container.get(prefix + key)
        container[prefix + key] = value if old is None else value.to(dtype=old.dtype)


def _probe_keys(loaded: LoadedModel, updates: dict[str, torch.Tensor]) -> list[str]:
    """Keys that find the container's prefix: the updated buffers the file already has
    (all of them, unless --enable-running-stats created some), else parameter names."""
    if loaded.module is None:
        return list(updates)
    created = {
        f"{name}.{buffer}" if name else buffer
        for name, m in loaded.module.named_modules()
        if getattr(m, "_bnfold_created_stats", False)
        for buffer in ("running_mean", "running_var", "num_batches_tracked")
    }
    keys = [k for k in updates if k not in created]
    return keys or [k for k, _ in loaded.module.named_parameters()][:8]


def _save_container(loaded: LoadedModel, updates: dict[str, torch.Tensor], target: Path) -> None:
    """A torch.save state_dict or checkpoint: the same object with the BN buffers replaced
    (the optimizer state, epoch and other entries are kept)."""
    import pickle

    import torch

    try:
        raw = torch.load(loaded.path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # a checkpoint holding a whole module: loading it needed --trust-pickle already
        raw = torch.load(loaded.path, map_location="cpu", weights_only=False)
    keys = _probe_keys(loaded, updates)
    places = [raw] + (list(raw.values()) if isinstance(raw, dict) else [])
    for place in places:
        if isinstance(place, torch.nn.Module):
            state = place.state_dict()
            p = _prefix(state, keys)
            if p is not None:
                with torch.no_grad():
                    for key, value in updates.items():
                        state[p + key].copy_(value)
                break
        p = _prefix(place, keys)
        if p is not None:
            _apply(place, p, updates)
            break
    else:
        if keys:
            raise BnfoldError(f"cannot find the BatchNorm buffers in {loaded.path} to update")
    _torch_save(raw, target)


def _save_safetensors(loaded: LoadedModel, updates: dict[str, torch.Tensor], target: Path) -> None:
    try:
        from safetensors import safe_open
        from safetensors.torch import save_file
    except ImportError as e:
        raise BnfoldError(
            "writing safetensors needs the safetensors package", hint=INSTALL_HINT
        ) from e
    with safe_open(str(loaded.path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    p = _prefix(tensors, _probe_keys(loaded, updates))
    if p is None and updates:
        raise BnfoldError(f"cannot find the BatchNorm buffers in {loaded.path} to update")
    _apply(tensors, p or "", updates)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target), metadata=metadata)


def _save_exported(loaded: LoadedModel, updates: dict[str, torch.Tensor], target: Path) -> None:
    """A torch.export archive: loaded again (bnfold's loader has checked its pickles) with
    the BN buffers of its state_dict replaced."""
    import torch

    with loaded.path.open("rb") as f:
        ep = torch.export.load(f)
    with torch.no_grad():
        for key, value in updates.items():
            ep.state_dict[key].copy_(value)
    torch.export.save(ep, target)


def _save_onnx(loaded: LoadedModel, target: Path) -> None:
    import onnx

    model = loaded.onnx_model
    assert model is not None
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size > 2**31 - 2**20:
        onnx.save_model(
            model, str(target), save_as_external_data=True, location=target.name + ".data"
        )
    else:
        onnx.save_model(model, str(target))

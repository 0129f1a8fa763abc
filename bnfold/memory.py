"""Process memory policy for the long jobs (glibc only; a no-op elsewhere)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

__all__ = ["freed_memory_reused"]

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_TRIM_THRESHOLD = 128 * 1024


@contextlib.contextmanager
def freed_memory_reused() -> Iterator[None]:
    """With glibc, keep freed memory in the heap, for the next allocations to reuse.

    By default glibc serves big blocks (weights, activations, a model's bytes) with a
    fresh ``mmap`` each and hands them back to the kernel on ``free``, so the next big
    block is faulted in again, page by page (~0.1 s per 100 MB on a VM). Heap-only
    allocation and no trimming let one step reuse the pages an earlier step has freed:
    onnxruntime those of onnx's checker (``check``).  (``fuse`` does without: its fold
    writes in place, and onnxruntime's load peaked ~30 MB higher in a heap-only process.)
    The defaults come back afterwards (glibc then no longer adapts
    its mmap threshold, which only tunes speed).
    """
    mallopt = None
    if sys.platform == "linux":
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            mallopt = ctypes.CDLL(None).mallopt
    if mallopt is None or not mallopt(_M_MMAP_MAX, 0):
        yield
        return
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)

"""Time two commands side by side: A B A B ..., whole processes, wall time and peak RSS.

Each run is a fresh process; its wall time comes from a monotonic clock around it and
its peak resident memory from the kernel's accounting of that child (``os.wait4``).
Ratios are taken pair by pair (A_i / B_i), so drift in the machine's speed during a
run affects both sides alike; medians are quoted.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass


@dataclass
class Run:
    wall: float
    peak_rss_mb: float
    code: int
    stdout: str


def run_once(cmd: list[str]) -> Run:
    # output goes to files, not pipes: a pipe left unread while the child runs could fill
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        if proc.returncode != 0:
            text = err.read().decode(errors="replace")
            sys.stderr.write(f"command failed ({proc.returncode}): {' '.join(cmd)}\n")
            sys.stderr.write(text[-2000:] + "\n")
    return Run(wall, usage.ru_maxrss / 1024, proc.returncode, stdout)


def compare(
    a: list[str], b: list[str], runs: int = 5, warmup: int = 1, keep: list[Run] | None = None
) -> dict[str, float]:
    """Median wall/peak of A and B, and the median of the per-pair ratios A/B.

    ``keep``, when given, receives A's timed runs (with their output).
    """
    for _ in range(warmup):
        run_once(a)
        run_once(b)
    ra, rb = [], []
    for _ in range(runs):
        ra.append(run_once(a))
        rb.append(run_once(b))
    if keep is not None:
        keep.extend(ra)
    ratios = [x.wall / y.wall for x, y in zip(ra, rb, strict=True)]
    return {
        "a_wall_median": statistics.median(r.wall for r in ra),
        "b_wall_median": statistics.median(r.wall for r in rb),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "a_peak_mb": max(r.peak_rss_mb for r in ra),
        "b_peak_mb": max(r.peak_rss_mb for r in rb),
        "failures": sum(r.code != 0 for r in ra + rb),
    }

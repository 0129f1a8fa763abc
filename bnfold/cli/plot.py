"""Pictures of a model's BatchNorm health (``--plot``), rendered with matplotlib.

Optional: ``pip install 'bnfold[plot]'``. Four panels over the layers, in the report's
(data-flow) order: the magnitude range of the fold scale gamma/sqrt(var+eps), the
running variance, |gamma| with dead-channel layers marked, and a strip of warnings.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from bnfold.errors import BnfoldError, OutputError
from bnfold.reports import InspectReport, Spread

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
_INSTALL = "pip install 'bnfold[plot]'"


def require_matplotlib() -> Any:
    """matplotlib with the Agg backend, or a BnfoldError saying how to install it."""
    try:
        import matplotlib
    except ImportError as e:
        raise BnfoldError("plotting needs matplotlib", hint=_INSTALL) from e
    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "bnfold"  # deterministic SVG ids
    return matplotlib


def check_plot_path(path: Path, model: Path) -> str:
    """The format for ``path`` (by extension); refuse unknown ones and the model itself."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise OutputError(f"--plot {path}: use a .png, .svg or .pdf file name")
    check_output_path(path, model)
    return fmt


def check_output_path(path: Path, model: Path) -> None:
    if path.resolve() == model.resolve():
        raise OutputError(f"refusing to overwrite the input {model}")
    if not path.parent.resolve().is_dir():
        raise OutputError(f"the folder {path.parent} does not exist")


def _magnitude(s: Spread | None) -> tuple[float, float, float, bool] | None:
    """(low, mid, high) of |values| from a signed min/median/max, and whether signs mix."""
    if s is None or not all(math.isfinite(v) for v in (s.min, s.median, s.max)):
        return None
    mixed = s.min < 0 < s.max
    mags = sorted(abs(v) for v in (s.min, s.median, s.max))
    nonzero = [m for m in mags if m > 0] or [0.0]
    # with mixed signs the true smallest magnitude is unknown from min/median/max; show the
    # smallest known one and mark the layer rather than draw a range down to zero
    return nonzero[0], abs(s.median), mags[-1], mixed


def figure(report: InspectReport) -> Any:
    """The matplotlib figure for ``report`` (readable from 1 to a few hundred layers)."""
    require_matplotlib()
    import matplotlib.pyplot as plt

    layers = report.layers
    n = max(len(layers), 1)
    width = min(60.0, max(8.0, 0.16 * n + 4))
    fig, axes = plt.subplots(
        4,
        1,
        figsize=(width, 10),
        sharex=True,
        gridspec_kw={"height_ratios": [3, 3, 3, 1.4]},
    )
    xs = list(range(len(layers)))
    panels = (
        (axes[0], "fold scale |gamma|/sqrt(var+eps)", lambda layer: layer.fold_scale),
        (axes[1], "running variance", lambda layer: layer.running_var),
        (axes[2], "|gamma|", lambda layer: layer.gamma),
    )
    for ax, title, pick in panels:
        for x, layer in zip(xs, layers, strict=True):
            mag = _magnitude(pick(layer))
            if mag is None:
                continue
            low, mid, high, mixed = mag
            floor = 1e-12
            ax.vlines(x, max(low, floor), max(high, floor), color="#4c72b0", lw=2)
            ax.plot(x, max(mid, floor), "o", color="#1f3b73", ms=3)
            if mixed:
                ax.plot(x, max(high, floor), "x", color="#dd8452", ms=5)
            if ax is axes[2] and "dead_channels" in layer.warnings:
                ax.plot(x, max(low, floor), "v", color="#c44e52", ms=7)
        ax.set_yscale("log")
        ax.set_title(title, loc="left", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].plot([], [], "x", color="#dd8452", label="sign changes across channels")
    axes[2].plot([], [], "v", color="#c44e52", label="dead channels")
    for ax in (axes[0], axes[2]):  # above the panel, never over a layer
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    codes = sorted({code for layer in layers for code in layer.warnings})
    strip = axes[3]
    for row, code in enumerate(codes):
        hits = [x for x, layer in zip(xs, layers, strict=True) if code in layer.warnings]
        strip.plot(hits, [row] * len(hits), "s", color="#c44e52", ms=5)
    strip.set_yticks(range(len(codes)), codes if codes else [])
    strip.set_ylim(-0.8, max(len(codes), 1) - 0.2)
    strip.set_title("warnings" if codes else "warnings: none", loc="left", fontsize=10)
    step = max(1, math.ceil(len(layers) / 60))
    strip.set_xticks(
        xs[::step],
        [layers[i].name for i in xs[::step]],
        rotation=90,
        fontsize=7 if len(layers) > 30 else 8,
    )
    strip.set_xlim(-1, max(len(layers), 1))
    fig.suptitle(
        f"{report.model}: {len(layers)} BatchNorm layers ({report.order} order)", fontsize=11
    )
    fig.tight_layout()
    return fig


def render(report: InspectReport, fmt: str) -> bytes:
    """The picture as bytes in ``fmt`` (png, svg or pdf)."""
    fig = figure(report)
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    metadata: dict[str, Any] = {"Software": None} if fmt == "png" else {}
    if fmt == "pdf":
        metadata = {"CreationDate": None, "ModDate": None, "Producer": None}
    if fmt == "svg":
        metadata = {"Date": None}
    fig.savefig(buffer, format=fmt, dpi=100, metadata=metadata)
    plt.close(fig)
    return buffer.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".bnfold-tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        Path(tmp).replace(path)
    finally:
        Path(tmp).unlink(missing_ok=True)

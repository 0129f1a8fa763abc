"""Pictures of a model's BatchNorm health (``--plot``), drawn with matplotlib.

Optional: ``pip install 'bnfold[plot]'``; matplotlib is imported only when a picture is
asked for, so ``bnfold --help`` stays fast. Four panels share the x axis, one slot per
layer in the report's (data-flow) order:

1. the fold scale ``gamma / sqrt(running_var + eps)`` as a magnitude range on a log
   axis: a bar from the smallest to the largest |scale| the report's signed
   min/median/max allow, a dot at |median|, ✕ where the scale changes sign across the
   layer's channels (the smallest magnitude is then unknown: it may be near zero);
2. running_var min/median/max, log axis, with the ``tiny_variance`` threshold;
3. |gamma| the same way, with the ``dead_gamma`` threshold and ▼ under layers that
   have dead channels;
4. a strip with one row per warning code that occurs.

With ``--data`` two more panels come before the strip: the mean shift of each BN's inputs
on the data, ``|data mean - running_mean| / sqrt(running_var + eps)``, with the
``drift_mean`` threshold, and the variance ratio ``(data var + eps) / (running_var +
eps)`` with ``drift_var`` and ``1 / drift_var``; a layer with ``stats_drift`` is red in
both, its worst channel written above its bar (``c5``).

A bar is red when the layer has the warning that panel shows (``large_scale_spread``,
``tiny_variance``, ``dead_channels``). Zero reaches the bottom edge of a log axis. The
figure widens with the layer count (0.16 in per layer), so 5 layers and 150 both read;
names are thinned to every k-th when they would overlap. Output is deterministic:
matplotlib's default style (not the user's matplotlibrc), no dates in the metadata, a
fixed SVG salt.
"""

from __future__ import annotations

import io
import math
import os
import secrets
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnfold.errors import BnfoldError, OutputError
from bnfold.reports import BNLayerReport, InspectReport, Spread

__all__ = [
    "FORMATS",
    "INSTALL_HINT",
    "check_output_path",
    "check_plot_path",
    "figure",
    "figure_size",
    "picture_for_html",
    "render",
    "require_matplotlib",
    "write_atomic",
]

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
INSTALL_HINT = "pip install 'bnfold[plot]'"
DPI = 100

# inches: per layer slot, fixed margins, the panels
_SLOT = 0.16
_MIN_WIDTH, _MAX_WIDTH = 8.0, 120.0  # 120 in = 12,000 px, far below Agg's 65,536 px limit
_MARGINS = 1.9  # y labels and warning-code names on the left, a little air on the right
_PANEL = 2.4
_MAX_NAME = 48  # longer layer names are shortened in the middle

_BAR, _MEDIAN, _FLAGGED = "#4c72b0", "#1f3b73", "#c44e52"
_SIGN, _THRESHOLD = "#dd8452", "#8c8c8c"
_CODE_COLOURS = {
    "stale_stats": "#8172b3",
    "dead_channels": "#c44e52",
    "tiny_variance": "#dd8452",
    "large_scale_spread": "#937860",
    "nonfinite": "#000000",
    "negative_variance": "#da8bc3",
    "train_mode": "#55a868",
    "no_running_stats": "#64b5cd",
    "stats_drift": "#4c72b0",
}
_CODE_ORDER = list(_CODE_COLOURS)  # bnfold.stats.CODES + DATA_CODES, without importing numpy


def require_matplotlib() -> Any:
    """The matplotlib module, or a BnfoldError (exit 2) saying how to install it."""
    try:
        import matplotlib
    except ImportError as e:
        raise BnfoldError("drawing pictures needs matplotlib", hint=INSTALL_HINT) from e
    return matplotlib


def picture_for_html(report: InspectReport) -> tuple[bytes | None, str | None]:
    """The PNG for an HTML report, or (None, why) when matplotlib is not installed."""
    try:
        require_matplotlib()
    except BnfoldError:
        return None, f"No pictures: matplotlib is not installed ({INSTALL_HINT})."
    return render(report, "png"), None


# --------------------------------------------------------------------------- output paths


def check_output_path(path: Path, option: str, model: Path, taken: Iterable[Path | None]) -> None:
    """Refuse an output path that is the model, another output, a folder or unwritable."""
    target = path.resolve()
    if target == model.resolve():
        raise OutputError(f"{option} {path}: refusing to overwrite the input model")
    for other in taken:
        if other is not None and target == other.resolve():
            raise OutputError(f"{option} {path}: the same file as another output")
    if target.is_dir():
        raise OutputError(f"{option} {path} is a folder; give a file name")
    if not target.parent.is_dir():
        raise OutputError(f"{option} {path}: the folder {path.parent} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise OutputError(f"{option} {path}: the folder {path.parent} is not writable")


def check_plot_path(path: Path, model: Path, taken: Iterable[Path | None] = ()) -> str:
    """The picture format chosen by ``path``'s extension (png, svg or pdf), or OutputError."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise OutputError(
            f"--plot {path}: unsupported extension {path.suffix or '(none)'!r}; "
            "use a .png, .svg or .pdf file name"
        )
    check_output_path(path, "--plot", model, taken)
    return fmt


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    A reader never sees half a file, and a failure leaves an existing file as it was.
    The file is created with mode 0o666 minus the umask, like any other new file.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.bnfold-tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        tmp.replace(path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- numbers


@dataclass(frozen=True)
class _Range:
    """What one panel draws for one layer: |values| from ``low`` to ``high``."""

    low: float  # 0 when the smallest magnitude is zero (drawn to the axis' bottom edge)
    median: float  # |median|; 0 is not drawn
    high: float
    mixed_signs: bool


def _magnitude(s: Spread | None) -> _Range | None:
    """The |value| range a signed min/median/max allows; None when nothing finite is known.

    With mixed signs (min < 0 < max) the largest magnitude is exact, but the smallest is
    not known (some channel may be near zero): the bar then starts at the smallest
    magnitude the report names and the layer is marked instead.
    """
    if s is None or not all(math.isfinite(v) for v in (s.min, s.median, s.max)):
        return None
    mixed = s.min < 0 < s.max
    mags = sorted(abs(v) for v in (s.min, s.median, s.max))
    if mixed:
        nonzero = [m for m in mags if m > 0]
        low = nonzero[0] if nonzero else 0.0
    else:
        low = mags[0]
    return _Range(low, abs(s.median), mags[-1], mixed)


def _positive(s: Spread | None) -> _Range | None:
    """A non-negative min/median/max (the drift measures) as it is."""
    if s is None or not all(math.isfinite(v) for v in (s.min, s.median, s.max)):
        return None
    return _Range(max(s.min, 0.0), max(s.median, 0.0), max(s.max, 0.0), False)


def _variance(s: Spread | None) -> _Range | None:
    """running_var as it is (it should be >= 0): zero or negative minima reach the bottom."""
    if s is None or not all(math.isfinite(v) for v in (s.min, s.median, s.max)):
        return None
    if s.max <= 0:
        return _Range(0.0, 0.0, 0.0, False)
    return _Range(max(s.min, 0.0), max(s.median, 0.0), s.max, False)


def _short(name: str) -> str:
    if len(name) <= _MAX_NAME:
        return name
    half = (_MAX_NAME - 1) // 2
    return name[:half] + "…" + name[-(_MAX_NAME - 1 - half) :]


@dataclass(frozen=True)
class _Layout:
    width: float
    height: float
    label_size: float
    rotation: int
    step: int  # label every step-th layer
    strip_rows: int
    legend: list[str]


def _layout(report: InspectReport) -> _Layout:
    n = len(report.layers)
    width = min(_MAX_WIDTH, max(_MIN_WIDTH, _MARGINS + _SLOT * n))
    spacing = (width - _MARGINS) / max(n, 1)  # inches between neighbouring layers
    size = 8.0 if n <= 40 else 7.0
    char = size * 0.56 / 72  # an average glyph width (DejaVu Sans), inches
    longest = max((len(_short(layer.name)) for layer in report.layers), default=0)
    horizontal = longest * char <= 0.9 * spacing
    line = size * 1.35 / 72
    step = 1 if horizontal else max(1, math.ceil(line / spacing))
    labels = line + 0.15 if horizontal else longest * char + 0.2
    rows = len({code for layer in report.layers for code in layer.warnings})
    strip = 0.55 + 0.2 * max(rows, 1)
    legend = _legend_entries(report.layers)
    columns = _legend_columns(legend, width)
    legend_height = 0.1 + 0.22 * math.ceil(len(legend) / columns)
    height = 0.45 + _panels(report) * _PANEL + strip + labels + legend_height
    # quarter inches are exact in binary: the pixel size is exactly inches * DPI
    width, height = math.ceil(width * 4) / 4, math.ceil(height * 4) / 4
    return _Layout(width, height, size, 0 if horizontal else 90, step, rows, legend)


def _panels(report: InspectReport) -> int:
    """Log panels: fold scale, running_var, |gamma|; with --data also the two drifts."""
    return 5 if report.data is not None else 3


def figure_size(report: InspectReport) -> tuple[float, float]:
    """The figure's (width, height) in inches: grows with the layers and their names."""
    lay = _layout(report)
    return lay.width, lay.height


# --------------------------------------------------------------------------- drawing


def _panel(
    ax: Any,
    layers: tuple[BNLayerReport, ...],
    pick: Callable[[BNLayerReport], _Range | None],
    flag: str,
    title: str,
    threshold: tuple[float, str] | None,
) -> bool:
    """One log panel: a bar per layer (red when it has ``flag``), the threshold line.

    Returns whether the threshold line was drawn.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ranges = [pick(layer) for layer in layers]
    positive = [v for r in ranges if r for v in (r.low, r.median, r.high) if v > 0]
    ax.set_title(title, loc="left", fontsize=10)
    if not positive:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
        return False
    # the threshold joins the axis only when the data comes within two decades of it:
    # otherwise it would squeeze healthy layers into a sliver of the panel
    far_below = threshold is not None and threshold[0] < min(positive) / 100
    if threshold is not None and not far_below:
        positive.append(threshold[0])
    lo, hi = min(positive), max(positive)
    if hi / lo < 10:  # at least a decade, so nearly equal layers do not fill the panel
        centre = math.sqrt(lo * hi)
        lo, hi = min(lo, centre / math.sqrt(10)), max(hi, centre * math.sqrt(10))
    bottom, top = lo / 2.5, hi * 2.5
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    # one artist per kind, not one per layer: 150 layers draw about as fast as 5
    bars: dict[str, tuple[list[int], list[float], list[float]]] = {
        _BAR: ([], [], []),
        _FLAGGED: ([], [], []),
    }
    zero: list[int] = []
    medians: tuple[list[int], list[float]] = ([], [])
    mixed: tuple[list[int], list[float]] = ([], [])
    for x, (layer, r) in enumerate(zip(layers, ranges, strict=True)):
        if r is None:
            continue
        if r.high > 0:
            xs, lows, highs = bars[_FLAGGED if flag in layer.warnings else _BAR]
            xs.append(x)
            lows.append(max(r.low, bottom))
            highs.append(r.high)
        else:  # every value is zero: a stub on the bottom edge
            zero.append(x)
        if r.median > 0:
            medians[0].append(x)
            medians[1].append(r.median)
        if r.mixed_signs:
            mixed[0].append(x)
            mixed[1].append(r.high)
    for colour, (xs, lows, highs) in bars.items():
        if xs:
            ax.vlines(xs, lows, highs, color=colour, lw=2, zorder=2)
    if zero:
        ax.plot(zero, [bottom] * len(zero), "_", color=_FLAGGED, ms=8, mew=2, clip_on=False)
    if medians[0]:
        ax.plot(*medians, "o", color=_MEDIAN, ms=3, ls="none", zorder=3)
    if mixed[0]:
        ax.plot(*mixed, "x", color=_SIGN, ms=6, mew=1.5, ls="none", zorder=4)
    if threshold is not None and far_below:
        ax.text(
            0.998,
            0.02,
            f"{threshold[1]}: far below this axis",
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=7,
            color="#595959",
        )
    elif threshold is not None:
        value, label = threshold
        ax.axhline(value, color=_THRESHOLD, lw=1, ls="--", zorder=1)
        ax.annotate(
            label,
            (1.0, value),
            xycoords=ax.get_yaxis_transform(),
            xytext=(-3, 2),
            textcoords="offset points",
            ha="right",
            va="bottom",
            fontsize=7,
            color="#595959",
        )
    if math.log10(top / bottom) < 3:  # few decades: label 0.2, 0.5, 1, 2, 5 ... plainly
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    else:  # many decades: 10^k only; minor labels (2e0, 3e0 ...) would clutter
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, axis="y", which="major", alpha=0.3)
    return threshold is not None and not far_below


def _strip(ax: Any, layers: tuple[BNLayerReport, ...]) -> None:
    """One row of squares per warning code that occurs, in the codes' documented order."""
    present = {code for layer in layers for code in layer.warnings}
    codes = [c for c in _CODE_ORDER if c in present] + sorted(present - set(_CODE_ORDER))
    for row, code in enumerate(codes):
        hits = [x for x, layer in enumerate(layers) if code in layer.warnings]
        colour = _CODE_COLOURS.get(code, _FLAGGED)
        ax.plot(hits, [row] * len(hits), "s", color=colour, ms=5, ls="none")
    ax.set_yticks(range(len(codes)), codes, fontsize=8, parse_math=False)
    if not codes:
        ax.text(0.5, 0.5, "no warnings", transform=ax.transAxes, ha="center", va="center")
    ax.set_ylim(len(codes) - 0.4 if codes else 0.6, -0.6)  # the first code on top
    flagged = sum(bool(layer.warnings) for layer in layers)
    ax.set_title(
        f"warnings ({flagged} of {len(layers)} layers)" if codes else "warnings: none",
        loc="left",
        fontsize=10,
    )
    ax.grid(True, axis="x", alpha=0.15)


def _legend_entries(layers: tuple[BNLayerReport, ...]) -> list[str]:
    """The legend's entries: only the marks that appear in this figure."""

    def has(code: str) -> bool:
        return any(code in layer.warnings for layer in layers)

    def mixed(pick: Callable[[BNLayerReport], Spread | None]) -> bool:
        return any((r := _magnitude(pick(layer))) is not None and r.mixed_signs for layer in layers)

    entries = ["range", "median"]
    flags = ("large_scale_spread", "tiny_variance", "dead_channels", "stats_drift")
    if any(has(code) for code in flags):
        entries.append("flagged")
    if mixed(lambda layer: layer.fold_scale) or mixed(lambda layer: layer.gamma):
        entries.append("mixed")
    if has("dead_channels"):
        entries.append("dead")
    entries.append("threshold")  # dropped again when no panel draws its threshold
    return entries


_LEGEND_LABELS = {
    "range": "min … max",
    "median": "median",
    "flagged": "layer has the panel's warning",
    "mixed": "sign changes across channels",
    "dead": "dead channels",
    "threshold": "threshold",
}


def _legend_columns(entries: list[str], width: float) -> int:
    """As many columns as fit in ``width`` inches (8 pt labels, handle and spacing)."""
    widest = max(0.75 + len(_LEGEND_LABELS[e]) * 8 * 0.6 / 72 for e in entries)
    return max(1, min(len(entries), int((width - 0.4) // widest)))


def _legend(fig: Any, entries: list[str], columns: int) -> None:
    from matplotlib.lines import Line2D

    styles: dict[str, dict[str, Any]] = {
        "range": {"color": _BAR, "lw": 2},
        "median": {"color": _MEDIAN, "marker": "o", "ms": 3, "ls": "none"},
        "flagged": {"color": _FLAGGED, "lw": 2},
        "mixed": {"color": _SIGN, "marker": "x", "ms": 6, "mew": 1.5, "ls": "none"},
        "dead": {"color": _FLAGGED, "marker": "v", "ms": 7, "ls": "none"},
        "threshold": {"color": _THRESHOLD, "lw": 1, "ls": "--"},
    }
    handles = [Line2D([], [], label=_LEGEND_LABELS[e], **styles[e]) for e in entries]
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=columns,
        fontsize=8,
        frameon=False,
        handlelength=1.6,
        columnspacing=1.4,
    )


def figure(report: InspectReport) -> Any:
    """The matplotlib Figure for ``report`` (no pyplot: no global state, no GUI backend)."""
    require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    layers = report.layers
    lay = _layout(report)
    th = report.thresholds
    fig = Figure(figsize=(lay.width, lay.height), dpi=DPI, layout="constrained")
    strip_height = (0.55 + 0.2 * max(lay.strip_rows, 1)) / _PANEL
    panels = _panels(report)
    # not sharex: every shared axis would lay out its own copy of a few hundred name ticks
    axes = fig.subplots(panels + 1, 1, gridspec_kw={"height_ratios": [1] * panels + [strip_height]})
    dead = th.get("dead_gamma")
    tiny = th.get("tiny_variance")
    drawn = _panel(
        axes[0],
        layers,
        lambda layer: _magnitude(layer.fold_scale),
        "large_scale_spread",
        "fold scale |gamma| / sqrt(running_var + eps)",
        None,
    )
    drawn |= _panel(
        axes[1],
        layers,
        lambda layer: _variance(layer.running_var),
        "tiny_variance",
        "running_var",
        None if tiny is None else (tiny, f"tiny_variance {tiny:g} (on var + eps)"),
    )
    drawn |= _panel(
        axes[2],
        layers,
        lambda layer: _magnitude(layer.gamma),
        "dead_channels",
        "|gamma|",
        None if dead is None else (dead, f"dead_gamma {dead:g}"),
    )
    dead_xs = [x for x, layer in enumerate(layers) if "dead_channels" in layer.warnings]
    if dead_xs:  # on the bottom edge under the bar: a dead gamma is often exactly 0
        axes[2].plot(
            dead_xs,
            [0.0] * len(dead_xs),
            "v",
            color=_FLAGGED,
            ms=7,
            ls="none",
            transform=axes[2].get_xaxis_transform(),
            clip_on=False,
            zorder=5,
        )
    if report.data is not None:
        drawn |= _drift_panels(axes[3], axes[4], layers, th)
    strip = axes[-1]
    _strip(strip, layers)
    xlim = (-0.7, max(len(layers), 1) - 0.3)
    for ax in axes:
        ax.set_xlim(*xlim)
        ax.xaxis.set_minor_locator(NullLocator())
    for ax in axes[:-1]:
        ax.xaxis.set_major_locator(NullLocator())
    xs = list(range(0, len(layers), lay.step))
    strip.set_xticks(
        xs,
        [_short(layers[i].name) for i in xs],
        rotation=lay.rotation,
        fontsize=lay.label_size,
        parse_math=False,  # layer names are data: a "$" must not start TeX maths
    )
    if lay.step > 1:
        strip.set_xlabel(f"every {lay.step}th layer named", fontsize=8)
    legend = [e for e in lay.legend if e != "threshold" or drawn]
    _legend(fig, legend, _legend_columns(legend, lay.width))
    fig.suptitle(
        f"{Path(report.model).name}: {len(layers)} BatchNorm layers ({report.order} order)",
        fontsize=11,
        parse_math=False,
    )
    return fig


def _drift_panels(
    shift_ax: Any, ratio_ax: Any, layers: tuple[BNLayerReport, ...], th: dict[str, float]
) -> bool:
    """--data: mean shift and variance ratio per layer, the worst channel named above the
    bar of each drifted layer; whether a threshold was drawn."""
    mean = th.get("drift_mean")
    factor = th.get("drift_var")
    drawn = _panel(
        shift_ax,
        layers,
        lambda layer: _positive(layer.mean_shift),
        "stats_drift",
        "on the data: mean shift |mean - running_mean| / sqrt(running_var + eps)",
        None if mean is None else (mean, f"drift_mean {mean:g}"),
    )
    drawn |= _panel(
        ratio_ax,
        layers,
        lambda layer: _positive(layer.var_ratio),
        "stats_drift",
        "on the data: variance ratio (var + eps) / (running_var + eps)",
        None if factor is None else (factor, f"drift_var {factor:g}"),
    )
    if factor is not None:  # the lower bound too, when it lies on the axis
        low, (bottom, top) = 1 / factor, ratio_ax.get_ylim()
        if bottom < low < top:
            ratio_ax.axhline(low, color=_THRESHOLD, lw=1, ls="--", zorder=1)
    for x, layer in enumerate(layers):
        if "stats_drift" not in layer.warnings:
            continue
        for ax, spread, channel in (
            (shift_ax, layer.mean_shift, layer.mean_shift_channel),
            (ratio_ax, layer.var_ratio, layer.var_ratio_channel),
        ):
            if spread is not None and channel is not None and spread.max > 0:
                ax.annotate(
                    f"c{channel}",
                    (x, spread.max),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=6,
                    color=_FLAGGED,
                    annotation_clip=True,
                )
    return drawn


def render(report: InspectReport, fmt: str) -> bytes:
    """The picture as bytes in ``fmt`` (png, svg or pdf); the same report gives the same bytes."""
    if fmt not in FORMATS.values():
        raise ValueError(f"unknown picture format {fmt!r}")
    require_matplotlib()
    import matplotlib.style

    metadata: dict[str, Any] = {
        "png": {"Software": None},
        "svg": {"Date": None, "Creator": None},
        "pdf": {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None},
    }[fmt]
    buffer = io.BytesIO()
    # the defaults, not the user's matplotlibrc (usetex, styles): the same picture anywhere
    with (
        matplotlib.style.context("default"),
        matplotlib.rc_context({"svg.hashsalt": "bnfold", "svg.fonttype": "none"}),
        warnings.catch_warnings(),
    ):
        # a layer name in a script the font lacks is drawn as boxes; not worth a warning
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        fig = figure(report)
        fig.savefig(buffer, format=fmt, dpi=DPI, metadata=metadata)
    return buffer.getvalue()

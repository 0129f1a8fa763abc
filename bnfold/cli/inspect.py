"""``bnfold inspect``: per-layer BatchNorm statistics, fold targets and diagnostics."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from bnfold.cli.common import (
    ARCH,
    ARCH_KWARGS,
    DEBUG,
    INPUT_SHAPE,
    TRUST_PICKLE,
    OutputFormat,
    Progress,
    handle_errors,
    parse_arch_kwargs,
    parse_thresholds,
    stdout_console,
)
from bnfold.cli.data_options import BATCH_SIZE, DATA_HELP, IMAGE_SIZE, LIMIT, MEAN, STD

if TYPE_CHECKING:
    from bnfold.reports import InspectReport


@handle_errors
def inspect_command(
    model: Path = typer.Argument(
        ...,
        help="Model file: torch.save, TorchScript, .pt2, "
        "safetensors or ONNX (detected from the content).",
    ),
    arch: str | None = ARCH,
    arch_kwargs: str | None = ARCH_KWARGS,
    trust_pickle: bool = TRUST_PICKLE,
    input_shape: list[str] | None = INPUT_SHAPE,
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="Output format."),
    threshold: list[str] | None = typer.Option(
        None,
        "--threshold",
        metavar="NAME=VALUE",
        help="Override a diagnostic threshold: dead_gamma (1e-3), tiny_variance (1e-4), "
        "scale_spread (100); with --data drift_mean (0.5) and drift_var (2).",
    ),
    drift_mean: float | None = typer.Option(
        None,
        "--drift-mean",
        metavar="STDS",
        help="With --data: stats_drift when a channel's data mean is more than this many "
        "running standard deviations from running_mean (default 0.5).",
    ),
    drift_var: float | None = typer.Option(
        None,
        "--drift-var",
        metavar="FACTOR",
        help="With --data: stats_drift when (data var + eps) / (running_var + eps) is above "
        "this factor or below its inverse in a channel (default 2).",
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        metavar="SPEC",
        help=DATA_HELP + " Each BN's inputs are measured on it (eval mode) and compared with "
        "its running statistics.",
    ),
    batch_size: int = BATCH_SIZE,
    limit: int | None = LIMIT,
    image_size: str | None = IMAGE_SIZE,
    mean: str | None = MEAN,
    std: str | None = STD,
    plot: Path | None = typer.Option(
        None,
        "--plot",
        help="Also draw the layers' statistics to a picture; .png, .svg or .pdf chosen by "
        "the extension (needs: pip install 'bnfold[plot]').",
    ),
    html: Path | None = typer.Option(
        None,
        "--html",
        help="Also write a self-contained .html report: summary, layer table, explanations "
        "and the picture (without matplotlib: no picture).",
    ),
    debug: bool = DEBUG,
) -> None:
    """Report every BatchNorm layer: statistics, what it folds into (or why not), warnings."""
    from bnfold.cli import render
    from bnfold.cli.data_options import data_options
    from bnfold.errors import BnfoldError
    from bnfold.stats import Thresholds

    thresholds = parse_thresholds(threshold)
    for name, value in (("drift_mean", drift_mean), ("drift_var", drift_var)):
        if value is not None:
            if data is None:
                raise BnfoldError(f"--{name.replace('_', '-')} only applies with --data")
            thresholds[name] = value
    try:  # checked here, before the model loads
        Thresholds().with_overrides(thresholds)
    except ValueError as e:
        raise BnfoldError(f"--threshold: {e}") from e
    kwargs = parse_arch_kwargs(arch_kwargs)
    data_opts = data_options(data, batch_size, limit, image_size, mean, std)
    # refuse bad --plot/--html paths (and a missing matplotlib) before loading the model
    plot_format = None
    if plot is not None:
        from bnfold.cli.plot import check_plot_path, require_matplotlib

        plot_format = check_plot_path(plot, model)
        require_matplotlib()
    if html is not None:
        from bnfold.cli.html import check_html_path

        check_html_path(html, model, [plot])
    from bnfold.api import inspect
    from bnfold.inputs import parse_shape

    progress = Progress(enabled=None if fmt is OutputFormat.table else False)
    report = inspect(
        model,
        arch=arch,
        arch_kwargs=kwargs,
        trust_pickle=trust_pickle,
        input_shapes=[parse_shape(s) for s in input_shape or []],
        thresholds=thresholds,
        data=data_opts,
        progress=progress.step,
    )
    render.emit(report, fmt.value, stdout_console())
    if data_opts is not None and not report.layers:  # not an error: nothing to measure
        tell(f"note: {model.name} has no BatchNorm layer: the data was not run, nothing written")
        return
    picture = None
    if plot_format is not None and plot is not None:
        picture = write_picture(report, plot, plot_format)
    if html is not None:
        write_html(report, html, picture if plot_format == "png" else None)


def write_picture(report: InspectReport, path: Path, fmt: str) -> bytes:
    """--plot: the picture, written atomically (and returned); the message goes to stderr."""
    from bnfold.cli import plot as plotting

    data = plotting.render(report, fmt)
    plotting.write_atomic(path, data)
    tell(f"wrote {path}")
    return data


def write_html(report: InspectReport, path: Path, png: bytes | None = None) -> None:
    """--html: the page with the picture when matplotlib is there, a note on stderr if not."""
    from bnfold.cli import html as pages
    from bnfold.cli import plot as plotting

    missing = None
    if png is None:
        png, missing = plotting.picture_for_html(report)
    if missing is not None:
        tell(f"note: {path} has no pictures: matplotlib is not installed ({plotting.INSTALL_HINT})")
    plotting.write_atomic(path, pages.inspect_html(report, png, missing).encode("utf-8"))
    tell(f"wrote {path}")


def tell(line: str) -> None:
    """A line on stderr: stdout carries only the report (clean JSON with --format json)."""
    import sys

    sys.stderr.write(line + "\n")
    sys.stderr.flush()

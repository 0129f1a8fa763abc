"""``bnfold inspect``: per-layer BatchNorm statistics, fold targets and diagnostics."""

from __future__ import annotations

from pathlib import Path

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
        "scale_spread (100).",
    ),
    plot: Path | None = typer.Option(
        None,
        "--plot",
        help="Also draw the layers' statistics to a .png, .svg or .pdf "
        "(needs: pip install 'bnfold[plot]').",
    ),
    html: Path | None = typer.Option(
        None, "--html", help="Also write a self-contained HTML report (pictures need matplotlib)."
    ),
    debug: bool = DEBUG,
) -> None:
    """Report every BatchNorm layer: statistics, what it folds into (or why not), warnings."""
    from bnfold.cli import render
    from bnfold.errors import BnfoldError
    from bnfold.stats import Thresholds

    try:
        thresholds = Thresholds().with_overrides(parse_thresholds(threshold))
    except ValueError as e:
        raise BnfoldError(f"--threshold: {e}") from e
    kwargs = parse_arch_kwargs(arch_kwargs)
    plot_format = None
    if plot is not None:
        from bnfold.cli.plot import check_plot_path, require_matplotlib

        plot_format = check_plot_path(plot, model)
        require_matplotlib()
    if html is not None:
        from bnfold.cli.plot import check_output_path

        check_output_path(html, model)
    progress = Progress(enabled=None if fmt is OutputFormat.table else False)
    with progress.step(f"Loading {model.name}"):
        from bnfold.loading import load_model

        loaded = load_model(model, arch=arch, arch_kwargs=kwargs, trust_pickle=trust_pickle)
    example = None
    if input_shape:
        from bnfold.inputs import parse_shape, random_batches

        example = random_batches([parse_shape(s) for s in input_shape], "float32", 1)[0]
    with progress.step("Analysing BatchNorm layers"):
        from bnfold.stats import inspect_model

        report = inspect_model(loaded, thresholds, example)
    render.emit(report, fmt.value, stdout_console())
    if plot is not None or html is not None:
        write_pictures(report, plot, plot_format, html)


def write_pictures(
    report: object, plot: Path | None, plot_format: str | None, html: Path | None
) -> None:
    """--plot and --html for an inspect report; messages on stderr (stdout stays clean)."""
    import sys

    from bnfold.cli import html as html_render
    from bnfold.cli import plot as plotting
    from bnfold.reports import InspectReport

    assert isinstance(report, InspectReport)
    if plot is not None and plot_format is not None:
        plotting.write_atomic(plot, plotting.render(report, plot_format))
        sys.stderr.write(f"wrote {plot}\n")
    if html is not None:
        png = _png_or_none(report)
        plotting.write_atomic(html, html_render.inspect_html(report, png).encode())
        sys.stderr.write(f"wrote {html}\n")


def _png_or_none(report: object) -> bytes | None:
    """The picture for an HTML report, or None (and a line on stderr) without matplotlib."""
    import sys

    from bnfold.cli import plot as plotting
    from bnfold.errors import BnfoldError

    try:
        plotting.require_matplotlib()
    except BnfoldError:
        sys.stderr.write("note: no pictures in the HTML: pip install 'bnfold[plot]'\n")
        return None
    return plotting.render(report, "png")  # type: ignore[arg-type]

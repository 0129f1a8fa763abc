"""``bnfold recalibrate``: re-estimate BatchNorm running statistics on real inputs."""

from __future__ import annotations

import enum
from pathlib import Path

import typer

from bnfold.cli.common import (
    ARCH,
    ARCH_KWARGS,
    DEBUG,
    TRUST_PICKLE,
    OutputFormat,
    Progress,
    handle_errors,
    parse_arch_kwargs,
    stdout_console,
)
from bnfold.cli.data_options import BATCH_SIZE, DATA_HELP, IMAGE_SIZE, LIMIT, MEAN, STD


class Method(str, enum.Enum):
    cumulative = "cumulative"
    sequential = "sequential"


@handle_errors
def recalibrate_command(
    model: Path = typer.Argument(..., help="Model file (any format bnfold runs)."),
    data: str = typer.Option(..., "--data", metavar="SPEC", help=DATA_HELP),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Write the re-estimated model here, in the input's format."
    ),
    arch: str | None = ARCH,
    arch_kwargs: str | None = ARCH_KWARGS,
    trust_pickle: bool = TRUST_PICKLE,
    method: Method = typer.Option(
        Method.cumulative,
        "--method",
        help="cumulative: PyTorch's own update, what only the BN layers in training mode "
        "with momentum=None give on these batches (the average of the batch means and "
        "unbiased batch variances; num_batches_tracked = batches). sequential: layer by "
        "layer, the exact statistics each BN receives at inference, one pass per BN "
        "(slower; keeps the data in memory).",
    ),
    batch_size: int = BATCH_SIZE,
    limit: int | None = LIMIT,
    image_size: str | None = IMAGE_SIZE,
    mean: str | None = MEAN,
    std: str | None = STD,
    enable_running_stats: bool = typer.Option(
        False,
        "--enable-running-stats",
        help="Also give BatchNorm layers built with track_running_stats=False running "
        "statistics (estimated on the data), so that they fold. Written into a pickled "
        "module as it is; a state_dict gains their buffers (build the architecture with "
        "track_running_stats=True to load it).",
    ),
    no_drift: bool = typer.Option(
        False,
        "--no-drift",
        help="Skip the two eval-mode passes that measure each layer's drift on the data "
        "before and after re-estimation.",
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="Output format."),
    debug: bool = DEBUG,
) -> None:
    """Re-estimate BatchNorm running statistics on real inputs; write the model back
    (exit 1 if some BatchNorm could not be re-estimated)."""
    from bnfold.api import recalibrate
    from bnfold.cli import render
    from bnfold.cli.data_options import data_options
    from bnfold.cli.inspect import tell

    opts = data_options(data, batch_size, limit, image_size, mean, std)
    assert opts is not None
    progress = Progress(enabled=None if fmt is OutputFormat.table else False)
    report = recalibrate(
        model,
        opts,
        out,
        arch=arch,
        arch_kwargs=parse_arch_kwargs(arch_kwargs),
        trust_pickle=trust_pickle,
        method=method.value,
        enable_running_stats=enable_running_stats,
        measure_drift=not no_drift,
        force=force,
        progress=progress.step,
    )
    render.emit(report, fmt.value, stdout_console())
    if not report.layers:  # not an error: there is nothing to repair
        tell(
            f"note: {model.name} has no BatchNorm layer: nothing to re-estimate, {out} not written"
        )
        return
    if not report.complete:
        raise typer.Exit(1)

"""``bnfold recalibrate``: re-estimate BatchNorm running statistics on real inputs."""

from __future__ import annotations

import dataclasses
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
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="Output format."),
    debug: bool = DEBUG,
) -> None:
    """Re-estimate BatchNorm running statistics on real inputs; write the model back
    (exit 1 if some BatchNorm could not be re-estimated)."""
    from bnfold.cli import render
    from bnfold.cli.data_options import data_options
    from bnfold.data import open_data
    from bnfold.errors import BnfoldError, OutputError

    kwargs = parse_arch_kwargs(arch_kwargs)
    opts = data_options(data, batch_size, limit, image_size, mean, std)
    assert opts is not None
    # refuse a bad --out and bad --data before the model is loaded and run
    if out.resolve() == model.resolve():
        raise OutputError(f"refusing to overwrite the input {model}", hint="choose another --out")
    if out.exists() and not force:
        raise OutputError(f"{out} exists", hint="pass --force to overwrite it")
    if out.is_dir() or not out.resolve().parent.is_dir():
        raise OutputError(f"--out {out}: not a file in an existing folder")
    source = open_data(opts)
    progress = Progress(enabled=None if fmt is OutputFormat.table else False)
    with progress.step(f"Loading {model.name}"):
        from bnfold.loading import load_model

        loaded = load_model(model, arch=arch, arch_kwargs=kwargs, trust_pickle=trust_pickle)
    from bnfold.data import recalibrate, write_model

    report = recalibrate(loaded, source, method=method.value, step=progress.step)
    if not any(layer.reason != "no_running_stats" for layer in report.layers):
        raise BnfoldError(
            "the model has no BatchNorm layer with running statistics to re-estimate",
            path=model,
        )
    with progress.step(f"Writing {out.name}"):
        write_model(loaded, report, out, force=force)
    report = dataclasses.replace(report, output=str(out))
    render.emit(report, fmt.value, stdout_console())
    if not report.complete:
        raise typer.Exit(1)

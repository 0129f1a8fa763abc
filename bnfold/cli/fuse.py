"""``bnfold fuse``: fold every BatchNorm that folds exactly, export ONNX, verify."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    stdout_console,
)
from bnfold.cli.data_options import BATCH_SIZE, DATA_HELP, IMAGE_SIZE, LIMIT, MEAN, STD
from bnfold.cli.recalibrate import Method

if TYPE_CHECKING:
    from bnfold.reports import FuseReport


def _write_html(report: FuseReport, model: Path, options: dict[str, Any], html: Path) -> None:
    """The fuse report plus the original model's BatchNorm statistics, as one HTML file.

    The statistics need the model again (the fuse job keeps no loaded model): it is
    inspected once more with the same options and input shapes the fuse run used.
    """
    from bnfold.api import inspect
    from bnfold.cli import html as pages
    from bnfold.cli import plot as plotting
    from bnfold.cli.inspect import tell

    stats = inspect(
        model,
        arch=options["arch"],
        arch_kwargs=options["arch_kwargs"],
        trust_pickle=options["trust_pickle"],
        input_shapes=options["input_shapes"],
    )
    png, missing = plotting.picture_for_html(stats)
    if missing is not None:
        tell(f"note: {html} has no pictures: matplotlib is not installed ({plotting.INSTALL_HINT})")
    plotting.write_atomic(html, pages.fuse_html(report, stats, png, missing).encode("utf-8"))
    tell(f"wrote {html}")


def _dtypes(names: list[str] | None) -> str | list[str]:
    from bnfold.inputs import check_dtype

    if not names:
        return "float32"
    checked = [check_dtype(n) for n in names]
    return checked[0] if len(checked) == 1 else checked


class Exporter(str, enum.Enum):
    dynamo = "dynamo"
    legacy = "legacy"


@handle_errors
def fuse_command(
    model: Path = typer.Argument(..., help="Model file (any format bnfold loads)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the folded ONNX model here."),
    arch: str | None = ARCH,
    arch_kwargs: str | None = ARCH_KWARGS,
    trust_pickle: bool = TRUST_PICKLE,
    input_shape: list[str] | None = INPUT_SHAPE,
    input_dtype: list[str] | None = typer.Option(
        None,
        "--input-dtype",
        help="Input dtype (float32 unless given): once for every input, or once per "
        "--input-shape, in order.",
    ),
    inputs: Path | None = typer.Option(
        None, "--inputs", help=".npz of real inputs (one array per model input) to verify on."
    ),
    verify_batches: int = typer.Option(
        2,
        "--verify-batches",
        min=0,
        help="Seeded random input batches to verify on (0 only with --inputs). Verification "
        "also feeds one batch scaled by 100 and, for a dynamic batch, one of another size.",
    ),
    opset: int | None = typer.Option(None, "--opset", help="ONNX opset (exporter default)."),
    exporter: Exporter = typer.Option(Exporter.dynamo, "--exporter", help="ONNX exporter."),
    static_batch: bool = typer.Option(
        False, "--static-batch", help="Do not make the batch axis dynamic."
    ),
    atol: float | None = typer.Option(
        None, "--atol", help="Absolute tolerance (1e-6 for float32)."
    ),
    rtol: float | None = typer.Option(
        None,
        "--rtol",
        help="Tolerance relative to the output's largest magnitude (1e-5 for float32).",
    ),
    save_torch: Path | None = typer.Option(
        None, "--save-torch", help="Also save the folded PyTorch model (a torch.export .pt2)."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
    eval_mode: bool = typer.Option(
        False,
        "--eval",
        help="Switch a model saved in training mode to eval mode (refused otherwise).",
    ),
    recalibrate_data: str | None = typer.Option(
        None,
        "--recalibrate-data",
        metavar="SPEC",
        help="Re-estimate the BatchNorm statistics on this data first (as bnfold "
        "recalibrate does), then fold. " + DATA_HELP,
    ),
    recalibrate_method: Method = typer.Option(
        Method.cumulative, "--recalibrate-method", help="See bnfold recalibrate --method."
    ),
    enable_running_stats: bool = typer.Option(
        False,
        "--enable-running-stats",
        help="With --recalibrate-data: BatchNorm layers built with track_running_stats=False "
        "get running statistics too, and fold.",
    ),
    batch_size: int = BATCH_SIZE,
    limit: int | None = LIMIT,
    image_size: str | None = IMAGE_SIZE,
    mean: str | None = MEAN,
    std: str | None = STD,
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="Output format."),
    html: Path | None = typer.Option(
        None,
        "--html",
        help="Also write a self-contained HTML report: folded, kept and why, "
        "verification, and the BatchNorm statistics (pictures need matplotlib).",
    ),
    debug: bool = DEBUG,
) -> None:
    """Fold BatchNorm exactly, export ONNX and prove it in onnxruntime (exit 1 if not)."""
    from bnfold.api import fuse
    from bnfold.cli import render
    from bnfold.cli.data_options import data_options
    from bnfold.errors import BnfoldError
    from bnfold.inputs import parse_shape

    data = data_options(
        recalibrate_data, batch_size, limit, image_size, mean, std, option="--recalibrate-data"
    )
    if enable_running_stats and data is None:
        raise BnfoldError("--enable-running-stats only applies with --recalibrate-data")

    options: dict[str, Any] = {
        "arch": arch,
        "arch_kwargs": parse_arch_kwargs(arch_kwargs),
        "trust_pickle": trust_pickle,
        "input_shapes": [parse_shape(s) for s in input_shape or []],
        "input_dtype": _dtypes(input_dtype),
        "inputs_npz": inputs,
    }
    if html is not None:  # before the expensive work
        from bnfold.cli.html import check_html_path

        taken = [out, save_torch, out.with_name(out.name + ".data") if out else None]
        check_html_path(html, model, taken)
    progress = Progress(enabled=None if fmt is OutputFormat.table else False)
    report = fuse(
        model,
        out,
        **options,
        opset=opset,
        exporter=exporter.value,
        dynamic_batch=not static_batch,
        atol=atol,
        rtol=rtol,
        verify_batches=verify_batches,
        save_torch=save_torch,
        force=force,
        eval_mode=eval_mode,
        recalibrate_data=data,
        recalibrate_method=recalibrate_method.value,
        enable_running_stats=enable_running_stats,
        progress=progress.step,
    )
    render.emit(report, fmt.value, stdout_console())
    if html is not None:
        _write_html(report, model, options, html)
    checks = (report.verification, report.torch_verification)
    if any(v is not None and not v.passed for v in checks):
        raise typer.Exit(1)

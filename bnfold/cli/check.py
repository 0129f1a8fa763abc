"""``bnfold check``: the gate CI runs on ONNX files."""

from __future__ import annotations

import enum
import sys
from pathlib import Path

import typer

from bnfold.cli.common import (
    ARCH,
    ARCH_KWARGS,
    DEBUG,
    INPUT_SHAPE,
    TRUST_PICKLE,
    Progress,
    handle_errors,
    parse_arch_kwargs,
    stdout_console,
)


class CheckFormat(str, enum.Enum):
    table = "table"
    json = "json"
    junit = "junit"
    markdown = "markdown"


@handle_errors
def check_command(
    models: list[Path] = typer.Argument(..., help="ONNX files to check."),
    max_bn: int = typer.Option(
        0, "--max-bn", min=0, help="Fail when more BatchNormalization nodes remain."
    ),
    input_shape: list[str] | None = INPUT_SHAPE,
    inputs: Path | None = typer.Option(
        None, "--inputs", help=".npz of real inputs, one array per model input."
    ),
    reference: Path | None = typer.Option(
        None, "--reference", help="The original model (any format bnfold loads) to compare with."
    ),
    arch: str | None = ARCH,
    arch_kwargs: str | None = ARCH_KWARGS,
    trust_pickle: bool = TRUST_PICKLE,
    atol: float | None = typer.Option(None, "--atol", help="Absolute tolerance (1e-6)."),
    rtol: float | None = typer.Option(
        None, "--rtol", help="Tolerance relative to the output's largest magnitude (1e-5)."
    ),
    batches: int = typer.Option(1, "--batches", min=1, help="Seeded random input batches."),
    fmt: CheckFormat = typer.Option(CheckFormat.table, "--format", "-f", help="Output format."),
    debug: bool = DEBUG,
) -> None:
    """Check ONNX files: checker, shape inference, finite weights and outputs, BatchNorm left,
    onnxruntime load and run, and optionally the original's outputs.

    Exit codes: 0 every check passed, 1 a check failed, 2 a file could not be read or the
    arguments are wrong.
    """
    from bnfold.api import check
    from bnfold.cli import render
    from bnfold.inputs import parse_shape

    progress = Progress(enabled=None if fmt is CheckFormat.table else False)
    report = check(
        models,
        max_bn=max_bn,
        input_shapes=[parse_shape(s) for s in input_shape or []],
        inputs_npz=inputs,
        reference=reference,
        arch=arch,
        arch_kwargs=parse_arch_kwargs(arch_kwargs),
        trust_pickle=trust_pickle,
        atol=atol,
        rtol=rtol,
        batches=batches,
        progress=progress.step,
    )
    render.emit(report, fmt.value, stdout_console() if fmt is CheckFormat.table else None)
    for f in report.files:  # the report says it too; stderr gets the one line per bad file
        if not f.readable:
            sys.stderr.write(f"error: {f.checks[0].message}\n")
    if report.exit_code:
        raise typer.Exit(report.exit_code)

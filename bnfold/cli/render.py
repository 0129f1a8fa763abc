"""Reports -> rich table, JSON or markdown. Needs no torch.

JSON: the report's dataclass fields as keys; floats that are NaN or infinite are
written as null (the ``nonfinite`` warning says so).
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

from bnfold.reports import (
    CheckReport,
    DataSummary,
    FuseReport,
    InspectReport,
    MergedSite,
    RecalibrationReport,
    Spread,
    to_dict,
)

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["emit", "to_json", "to_markdown"]


Report = InspectReport | FuseReport | CheckReport | RecalibrationReport


def emit(report: Report, fmt: str, console: Console | None = None) -> None:
    """Write the report to stdout (``console``'s file when given). Only tables need rich:
    the text formats do not import it, which keeps ``check --format json`` quick."""
    text = None
    if fmt == "json":
        text = to_json(report)
    elif fmt == "markdown":
        text = to_markdown(report)
    elif fmt == "junit" and isinstance(report, CheckReport):
        text = to_junit(report)
    if text is not None:
        out = console.file if console is not None else sys.stdout
        out.write(text + "\n")
        out.flush()
        return
    if console is None:
        from bnfold.cli.common import stdout_console

        console = stdout_console()
    if isinstance(report, InspectReport):
        _inspect_table(report, console)
    elif isinstance(report, RecalibrationReport):
        _recalibration_table(report, console)
    elif isinstance(report, CheckReport):
        _check_table(report, console)
    else:
        _fuse_table(report, console)
    console.file.flush()


def to_json(report: Any) -> str:
    return json.dumps(to_dict(report), indent=2, allow_nan=False)


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _range(s: Spread | None) -> str:
    return "-" if s is None else f"{_g(s.min)}…{_g(s.max)}"


# --------------------------------------------------------------------------- inspect


def _drift_cells(layer: Any) -> list[str]:
    """With --data: the largest mean shift and the range of variance ratios, each with
    its worst channel (``c5``)."""
    shift, ratio = layer.mean_shift, layer.var_ratio

    def at(channel: int | None) -> str:
        return "" if channel is None else f" c{channel}"

    return [
        f"{shift.max:.2g}{at(layer.mean_shift_channel)}" if shift else "-",
        f"{ratio.min:.2g}…{ratio.max:.2g}{at(layer.var_ratio_channel)}" if ratio else "-",
    ]


def _data_table(r: InspectReport, console: Console) -> None:
    """--data: each BN's inputs on the data against its running statistics."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    assert r.data is not None
    console.print(Text(data_line(r.data)))
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, expand=False)
    table.add_column("BN layer", overflow="fold", ratio=3)
    table.add_column("values/ch", justify="right")
    table.add_column("mean shift max", justify="right")
    table.add_column("var ratio min…max", justify="right")
    for layer in r.layers:
        drifted = "stats_drift" in layer.warnings
        table.add_row(
            Text(layer.name),
            "-" if layer.data_values is None else str(layer.data_values),
            *(Text(cell, style="red" if drifted else "") for cell in _drift_cells(layer)),
        )
    console.print(table)
    th = r.thresholds
    console.print(
        Text(
            "mean shift: |data mean - running_mean| / sqrt(running_var + eps); var ratio: "
            f"(data var + eps) / (running_var + eps); cN: the worst channel; stats_drift over "
            f"{th.get('drift_mean', 0):g} or outside 1/{th.get('drift_var', 0):g}…"
            f"{th.get('drift_var', 0):g}",
            style="dim",
        )
    )


def data_line(d: DataSummary) -> str:
    shapes = " + ".join("x".join(str(n) for n in s) or "scalar" for s in d.input_shapes)
    return (
        f"data: {d.source} ({d.kind}), {d.samples} samples of {shapes} in {d.batches} "
        f"batches; {d.preprocessing}"
    )


def _fold_cell(layer: Any) -> str:
    if layer.fold_into:
        arrow = {"backward": "→", "forward": "←"}.get(layer.fold_direction or "", "⇉")
        return f"{arrow} {layer.fold_into}"
    return f"stays: {layer.reason}" if layer.reason else "-"


def _inspect_table(r: InspectReport, console: Console) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    s = r.summary
    console.print(
        Text(
            f"{r.model} ({r.format}), {s.bn_layers} BatchNorm layers, {r.order} order", style="bold"
        )
    )
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, expand=False)
    table.add_column("BN layer", overflow="fold", ratio=3)
    table.add_column("C", justify="right")
    table.add_column("folds", overflow="fold", ratio=2)
    table.add_column("scale min…max", justify="right")
    table.add_column("var min", justify="right")
    table.add_column("warnings", overflow="fold", ratio=2)
    for layer in r.layers:
        table.add_row(
            Text(layer.name),
            str(layer.channels),
            Text(_fold_cell(layer), style="green" if layer.fold_into else "yellow"),
            _range(layer.fold_scale),
            _g(layer.running_var.min if layer.running_var else None),
            Text(", ".join(layer.warnings) or "-", style="red" if layer.warnings else ""),
        )
    console.print(table)
    if r.data is not None:
        _data_table(r, console)
    foldable = "unknown (no architecture)" if s.foldable is None else f"{s.foldable}/{s.bn_layers}"
    console.print(
        Text(
            f"fold: {foldable}; removes {s.params_removed} parameters and {s.buffers_removed} "
            f"buffer values"
            + (f", adds {s.bias_params_added} bias values" if s.bias_params_added else "")
        )
    )
    if s.warnings_by_code:
        console.print(
            Text(
                "warnings: " + ", ".join(f"{k} ×{v}" for k, v in s.warnings_by_code.items()),
                style="red",
            )
        )
    details = [(layer.name, d.message) for layer in r.layers for d in layer.diagnostics]
    for name, message in details:
        console.print(Text(f"  {name}: {message}"))
    stays = [
        layer
        for layer in r.layers
        if not layer.fold_into
        and layer.reason
        and layer.reason not in ("architecture_unknown", "capture_failed")
    ]
    for layer in stays:
        console.print(
            Text(f"  {layer.name} stays ({layer.reason}): {layer.reason_detail}", style="yellow")
        )
    for note in r.notes:
        console.print(Text(f"note: {note}", style="dim"))


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _inspect_markdown(r: InspectReport) -> str:
    s = r.summary
    lines = [
        f"### bnfold inspect: `{r.model}`",
        "",
        f"{s.bn_layers} BatchNorm layers ({r.format}, {r.order} order); "
        + (
            "foldable: unknown (no architecture)"
            if s.foldable is None
            else f"foldable: **{s.foldable}/{s.bn_layers}**"
        )
        + f"; folding removes {s.params_removed} parameters and {s.buffers_removed} buffer values.",
        "",
    ]
    data = r.data is not None
    if r.data is not None:
        lines += [_md_escape(data_line(r.data)) + ".", ""]
    lines += [
        "| BN layer | kind | C | folds into | fold scale min / median / max | var min | "
        + ("data: mean shift max | var ratio min…max | " if data else "")
        + "warnings |",
        "|---|---|---:|---|---|---:|" + ("---:|---:|" if data else "") + "---|",
    ]
    for layer in r.layers:
        fs = layer.fold_scale
        scale = "-" if fs is None else f"{_g(fs.min)} / {_g(fs.median)} / {_g(fs.max)}"
        fold = (
            f"{layer.fold_into} ({layer.fold_direction})"
            if layer.fold_into
            else f"stays: `{layer.reason}`"
            if layer.reason
            else "-"
        )
        lines.append(
            f"| `{_md_escape(layer.name)}` | {layer.kind} | {layer.channels} | {_md_escape(fold)} "
            f"| {scale} | {_g(layer.running_var.min if layer.running_var else None)} "
            + ("".join(f"| {cell} " for cell in _drift_cells(layer)) if data else "")
            + f"| {', '.join(f'`{w}`' for w in layer.warnings) or '-'} |"
        )
    if s.warnings_by_code:
        lines += [
            "",
            "**Warnings:** " + ", ".join(f"`{k}` ×{v}" for k, v in s.warnings_by_code.items()),
        ]
        lines += [
            f"- `{_md_escape(layer.name)}`: {d.message}"
            for layer in r.layers
            for d in layer.diagnostics
        ]
    for note in r.notes:
        lines += ["", f"_Note: {note}_"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- fuse


def _fuse_table(r: FuseReport, console: Console) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    console.print(
        Text(f"{r.model} ({r.format}) → {r.output or '(no output)'} [{r.exporter}]", style="bold")
    )
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("BN", overflow="fold", ratio=3)
    table.add_column("result", overflow="fold", ratio=4)
    for f in r.folded:
        verb = "merged →" if f.direction == "merge" else "folded " + _ARROWS.get(f.direction, "→")
        table.add_row(Text(f.bn), Text(f"{verb} {f.into} ({f.rule})", style="green"))
    for sk in r.skipped:
        table.add_row(Text(sk.bn), Text(f"stays: {sk.reason} — {sk.detail}", style="yellow"))
    console.print(table)
    for m in r.merged:
        console.print(Text(merge_line(m)))
    if r.recalibration is not None:
        console.print(Text(recalibration_line(r.recalibration)))
    console.print(
        Text(
            f"folded {len(r.folded)}, kept {len(r.skipped)}; stored values {r.params_before} → "
            f"{r.params_after}"
            + (
                f"; graph ops {r.ops_before} → {r.ops_after}"
                f"; ONNX nodes {r.onnx_nodes}, BatchNormalization left {r.onnx_bn_nodes}"
                if r.onnx_nodes is not None
                else ""
            )
        )
    )
    if r.capture:
        console.print(Text(_capture_line(r)))
    for v in (r.verification, r.torch_verification):
        if v is not None:
            _verification_lines(v, console)
    if r.torch_output:
        console.print(Text(f"folded PyTorch model: {r.torch_output}"))
    for note in r.notes:
        console.print(Text(f"note: {note}", style="dim"))


_ARROWS = {"backward": "→", "forward": "←"}


def _branches(m: MergedSite) -> str:
    skips = [f"{m.skips} skip" + ("s" if m.skips > 1 else "")] if m.skips else []
    return ", ".join([*m.convs, *m.identity_bns, *skips])


def merge_line(m: MergedSite) -> str:
    """One branch merge: the merged conv, the rule, the branches it replaced."""
    return f"merged → {m.into} ({m.rule}): {_branches(m)}"


def _capture_line(r: FuseReport) -> str:
    """How the model was captured (and why not by torch.fx), and its batch axis."""
    how = {"fx": "torch.fx", "export": "torch.export", "onnx": "the ONNX graph"}.get(
        r.capture or "", str(r.capture)
    )
    line = f"capture: {how}"
    if r.capture_detail:
        line += f" (torch.fx: {r.capture_detail})"
    if r.dynamic_batch is not None and r.capture != "onnx":
        line += f"; batch axis {'dynamic' if r.dynamic_batch else 'static'}"
    return line


def _verification_lines(v: Any, console: Console) -> None:
    from rich.text import Text

    what = "ONNX in onnxruntime" if v.target == "onnx" else "saved PyTorch model"
    verdict = "PASSED" if v.passed else "FAILED"
    console.print(
        Text(
            f"verification {verdict} ({what}): {v.inputs} input batches; "
            f"max abs error {v.max_abs_error:.3g}, max rel error {v.max_rel_error:.3g} "
            f"(atol {v.atol:g}, rtol {v.rtol:g})",
            style="bold green" if v.passed else "bold red",
        )
    )
    for line in v.fed or (v.input_source,):
        console.print(Text(f"  fed: {line}"))
    if v.reference:
        console.print(Text(f"  reference: {v.reference}"))
    for o in v.outputs:
        console.print(
            Text(
                f"  output {o.name} {list(o.shape)}: abs {o.max_abs_error:.3g}, "
                f"rel {o.max_rel_error:.3g}, |ref| max {o.reference_max_abs:.3g}"
                + ("" if o.passed else "  FAILED")
            )
        )
    if v.folded_torch_max_abs_error is not None:
        console.print(
            Text(
                "  folded PyTorch model vs float64 reference: max abs "
                f"{v.folded_torch_max_abs_error:.3g}"
                + (
                    f" (float32 noise of the original: {v.baseline_max_abs_error:.3g})"
                    if v.baseline_max_abs_error is not None
                    else ""
                )
            )
        )


def _fuse_markdown(r: FuseReport) -> str:
    lines = [
        f"### bnfold fuse: `{r.model}` → `{r.output}`",
        "",
        f"Exporter: {r.exporter}, opset {r.opset}. Folded **{len(r.folded)}**, kept "
        f"**{len(r.skipped)}**. Stored values (parameters and buffers) "
        f"{r.params_before} → {r.params_after}."
        + (
            f" ONNX nodes: {r.onnx_nodes}, BatchNormalization left: {r.onnx_bn_nodes}."
            if r.onnx_nodes is not None
            else ""
        ),
        "",
    ]
    if r.recalibration is not None:
        lines += [_md_escape(recalibration_line(r.recalibration)), ""]
    if r.folded:
        lines += ["| BN | folded into | direction | rule |", "|---|---|---|---|"]
        lines += [
            f"| `{_md_escape(f.bn)}` | `{_md_escape(f.into)}` | {f.direction} | {f.rule} |"
            for f in r.folded
        ]
        lines.append("")
    if r.merged:
        lines += ["| merged into | rule | conv branches | identity BNs | skips |"]
        lines += ["|---|---|---|---|---|"]
        lines += [
            f"| `{_md_escape(m.into)}` | {m.rule} | "
            + ", ".join(f"`{_md_escape(c)}`" for c in m.convs)
            + " | "
            + ", ".join(f"`{_md_escape(b)}`" for b in m.identity_bns)
            + f" | {m.skips} |"
            for m in r.merged
        ]
        lines.append("")
    if r.skipped:
        lines += ["| BN kept | reason | detail |", "|---|---|---|"]
        lines += [
            f"| `{_md_escape(s.bn)}` | `{s.reason}` | {_md_escape(s.detail)} |" for s in r.skipped
        ]
        lines.append("")
    if r.capture:
        lines += [_capture_line(r) + ".", ""]
    for v in (r.verification, r.torch_verification):
        if v is None:
            continue
        what = "ONNX" if v.target == "onnx" else "saved PyTorch model"
        lines.append(
            f"**Verification {'passed' if v.passed else 'FAILED'}** ({what}): max abs "
            f"error {v.max_abs_error:.3g}, max rel error {v.max_rel_error:.3g} over {v.inputs} "
            f"input batches (atol {v.atol:g}, rtol {v.rtol:g}); fed: "
            + _md_escape("; ".join(v.fed or (v.input_source,)))
            + "."
        )
    return "\n".join(lines)


def to_markdown(report: Report) -> str:
    if isinstance(report, InspectReport):
        return _inspect_markdown(report)
    if isinstance(report, RecalibrationReport):
        return _recalibration_markdown(report)
    if isinstance(report, CheckReport):
        return _check_markdown(report)
    return _fuse_markdown(report)


# --------------------------------------------------------------------------- check


def _check_table(r: CheckReport, console: Console) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    for f in r.files:
        verdict = "PASSED" if f.passed else "UNREADABLE" if not f.readable else "FAILED"
        console.print(Text(f"{f.path}: {verdict}", style="bold green" if f.passed else "bold red"))
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("check")
        table.add_column("result")
        table.add_column("details", overflow="fold", ratio=1)
        for c in f.checks:
            table.add_row(
                c.name,
                Text("ok" if c.passed else "FAIL", style="green" if c.passed else "red"),
                Text(c.message),
            )
        console.print(table)
    passed = sum(f.passed for f in r.files)
    console.print(Text(f"{passed}/{len(r.files)} files passed; exit {r.exit_code}", style="bold"))


def _check_markdown(r: CheckReport) -> str:
    lines = [
        f"### bnfold check: {sum(f.passed for f in r.files)}/{len(r.files)} files passed",
        "",
        "| file | check | result | details |",
        "|---|---|---|---|",
    ]
    for f in r.files:
        for c in f.checks:
            lines.append(
                f"| `{_md_escape(f.path)}` | {c.name} | "
                f"{'✅' if c.passed else '❌'} | {_md_escape(c.message)} |"
            )
    return "\n".join(lines)


def to_junit(r: CheckReport) -> str:
    """JUnit XML: one <testsuite> per file, one <testcase> per check."""
    import xml.etree.ElementTree as ET

    root = ET.Element(
        "testsuites",
        name="bnfold check",
        tests=str(sum(len(f.checks) for f in r.files)),
        failures=str(sum(not c.passed for f in r.files if f.readable for c in f.checks)),
        errors=str(sum(not f.readable for f in r.files)),
    )
    for f in r.files:
        failed = sum(not c.passed for c in f.checks)
        suite = ET.SubElement(
            root,
            "testsuite",
            name=f.path,
            tests=str(len(f.checks)),
            failures=str(failed if f.readable else 0),
            errors=str(0 if f.readable else 1),
        )
        for c in f.checks:
            case = ET.SubElement(suite, "testcase", classname=f"bnfold.check.{f.path}", name=c.name)
            if not c.passed:
                tag = "failure" if f.readable else "error"
                ET.SubElement(case, tag, message=c.message).text = c.message
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode")


# --------------------------------------------------------------------------- recalibrate


def recalibration_line(r: RecalibrationReport) -> str:
    """One sentence for a report that re-estimated the statistics first (fuse)."""
    kept = [layer.name for layer in r.layers if not layer.updated]
    data = f" on {r.data.samples} samples of {r.data.source}" if r.data is not None else ""
    return (
        f"BatchNorm statistics re-estimated first{data} ({r.method}): {r.updated} of "
        f"{len(r.layers)} layers" + (f"; kept: {', '.join(kept)}" if kept else "")
    )


def _recalibration_head(r: RecalibrationReport) -> str:
    return (
        f"{r.model} ({r.format}) → {r.output or '(not written)'}: re-estimated {r.updated} of "
        f"{len(r.layers)} BatchNorm layers, method {r.method}, {r.batches} batches, "
        f"{r.passes} passes over the data, {r.seconds:.1f} s"
    )


def _result_cell(layer: Any) -> str:
    return "updated" if layer.updated else f"kept: {layer.reason}"


def _drift_cell(d: Any) -> str:
    """A Drift as ``shift max, ratio min…max``."""
    if d is None:
        return "-"
    return f"{d.mean_shift.max:.2g}, {d.var_ratio.min:.2g}…{d.var_ratio.max:.2g}"


def _recalibration_table(r: RecalibrationReport, console: Console) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    console.print(Text(_recalibration_head(r), style="bold"))
    if r.data is not None:
        console.print(Text(data_line(r.data)))
    measured = any(layer.drift_before or layer.drift_after for layer in r.layers)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("BN layer", overflow="fold", ratio=3)
    table.add_column("C", justify="right")
    table.add_column("result", overflow="fold", ratio=2)
    if measured:
        table.add_column("drift before", justify="right")
        table.add_column("drift after", justify="right")
    else:
        table.add_column("shift", justify="right")
        table.add_column("var ratio", justify="right")
        table.add_column("new var min", justify="right")
    for layer in r.layers:
        cells = (
            [_drift_cell(layer.drift_before), _drift_cell(layer.drift_after)]
            if measured
            else [*_drift_cells(layer), _g(layer.running_var.min if layer.running_var else None)]
        )
        table.add_row(
            Text(layer.name),
            str(layer.channels),
            Text(_result_cell(layer), style="green" if layer.updated else "yellow"),
            *cells,
        )
    console.print(table)
    if measured:
        console.print(
            Text(
                "drift on the data (eval mode), old and new statistics: largest mean shift "
                "|mean - running_mean| / sqrt(running_var + eps), variance ratio min…max",
                style="dim",
            )
        )
    for layer in r.layers:
        if not layer.updated:
            console.print(
                Text(f"  {layer.name} kept ({layer.reason}): {layer.detail}", style="yellow")
            )
    if not r.complete:
        console.print(
            Text("not every BatchNorm was re-estimated (exit 1); see above", style="bold red")
        )
    for note in r.notes:
        console.print(Text(f"note: {note}", style="dim"))


def _recalibration_markdown(r: RecalibrationReport) -> str:
    lines = [f"### bnfold recalibrate: `{r.model}`", "", _md_escape(_recalibration_head(r)) + "."]
    if r.data is not None:
        lines += ["", _md_escape(data_line(r.data)) + "."]
    lines += [
        "",
        "| BN layer | C | result | mean shift max | var ratio min…max | new var min "
        "| drift before | drift after |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for layer in r.layers:
        result = "updated" if layer.updated else f"kept: `{layer.reason}`"
        lines.append(
            f"| `{_md_escape(layer.name)}` | {layer.channels} | {result} | "
            + "".join(f"{cell} | " for cell in _drift_cells(layer))
            + f"{_g(layer.running_var.min if layer.running_var else None)} | "
            + f"{_drift_cell(layer.drift_before)} | {_drift_cell(layer.drift_after)} |"
        )
    for note in r.notes:
        lines += ["", f"_Note: {_md_escape(note)}_"]
    return "\n".join(lines)

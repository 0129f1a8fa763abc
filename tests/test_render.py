"""``bnfold.cli.render``: reports -> JSON, markdown and rich tables, from hand-made reports.

No torch here: render works on plain report objects only.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import subprocess
import sys

import pytest
from rich.console import Console

from bnfold.cli import render
from bnfold.reports import (
    SCHEMA_VERSION,
    BNLayerReport,
    Diagnostic,
    FoldedSite,
    FuseReport,
    InspectReport,
    InspectSummary,
    OutputCheck,
    SkippedSite,
    Spread,
    Verification,
)
from tests.helpers import bn_layer

NAN, INF = float("nan"), float("inf")
layer = bn_layer


def report(layers: tuple[BNLayerReport, ...], **changes) -> InspectReport:
    base = InspectReport(
        model="model.pt",
        format="state_dict",
        architecture_known=True,
        order="data-flow",
        layers=layers,
        summary=InspectSummary(
            bn_layers=len(layers),
            foldable=1,
            params_removed=128,
            buffers_removed=129,
            bias_params_added=0,
            warnings_by_code={"dead_channels": 1},
        ),
        thresholds={"dead_gamma": 1e-3, "tiny_variance": 1e-4, "scale_spread": 100.0},
        notes=("eps assumed",),
    )
    return dataclasses.replace(base, **changes)


def sample() -> InspectReport:
    return report(
        (
            layer("bn1"),
            layer(
                "layer1.0.bn2",
                fold_into=None,
                fold_direction=None,
                reason="producer_output_shared",
                reason_detail="conv1's output also feeds add",
                warnings=("dead_channels",),
                diagnostics=(Diagnostic("dead_channels", "3 of 64 channels have |gamma| < 0.001"),),
            ),
            layer("head.bn", channels=10, fold_into="head.fc", fold_direction="forward"),
        )
    )


def strict_loads(text: str):
    """json.loads that refuses NaN/Infinity tokens (plain json.loads accepts them)."""

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def table_text(r, width: int = 80, **console_kwargs) -> str:
    buf = io.StringIO()
    console = Console(width=width, file=buf, color_system=None, **console_kwargs)
    render.emit(r, "table", console)
    return buf.getvalue()


# --------------------------------------------------------------------------- JSON


def test_json_has_schema_layers_and_summary():
    """JSON carries schema_version, every layer with its fields and stats, and the summary."""
    data = strict_loads(render.to_json(sample()))
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert [entry["name"] for entry in data["layers"]] == ["bn1", "layer1.0.bn2", "head.bn"]
    first, second, third = data["layers"]
    for key in (
        "name",
        "kind",
        "channels",
        "eps",
        "momentum",
        "fold_into",
        "reason",
        "warnings",
        "running_mean",
        "running_var",
        "gamma",
        "beta",
        "fold_scale",
    ):
        assert key in first, key
    assert (first["kind"], first["channels"], first["eps"], first["momentum"]) == (
        "BatchNorm2d",
        64,
        1e-5,
        0.1,
    )
    assert first["fold_into"] == "layer1.0.conv1" and first["reason"] is None
    assert first["fold_scale"] == {"min": 0.25, "median": 1.0, "max": 3.0}
    assert first["running_var"] == {"min": 0.25, "median": 1.0, "max": 4.0}
    assert second["fold_into"] is None
    assert second["reason"] == "producer_output_shared"
    assert second["warnings"] == ["dead_channels"]
    assert second["diagnostics"] == [
        {"code": "dead_channels", "message": "3 of 64 channels have |gamma| < 0.001"}
    ]
    assert (third["fold_into"], third["fold_direction"]) == ("head.fc", "forward")
    assert data["summary"] == {
        "bn_layers": 3,
        "foldable": 1,
        "params_removed": 128,
        "buffers_removed": 129,
        "bias_params_added": 0,
        "warnings_by_code": {"dead_channels": 1},
    }
    assert data["thresholds"]["scale_spread"] == 100.0
    assert data["notes"] == ["eps assumed"]


def test_json_nonfinite_floats_become_null():
    """NaN and +-Inf anywhere (spreads, eps, thresholds) are written as null: valid JSON."""
    bad = layer(
        "bn", eps=NAN, fold_scale=Spread(NAN, INF, -INF), running_var=Spread(-INF, 1.0, INF)
    )
    text = render.to_json(report((bad,), thresholds={"scale_spread": INF}))
    assert "NaN" not in text and "Infinity" not in text
    data = strict_loads(text)
    entry = data["layers"][0]
    assert entry["eps"] is None
    assert entry["fold_scale"] == {"min": None, "median": None, "max": None}
    assert entry["running_var"] == {"min": None, "median": 1.0, "max": None}
    assert data["thresholds"] == {"scale_spread": None}


def test_json_round_trips_every_field():
    """The JSON holds exactly the report's fields (tuples as lists), nothing more or less."""
    r = sample()
    data = strict_loads(render.to_json(r))
    assert set(data) == {f.name for f in dataclasses.fields(InspectReport)}
    assert set(data["layers"][0]) == {f.name for f in dataclasses.fields(BNLayerReport)}


def test_emit_json_writes_only_json():
    """emit(..., 'json') writes the JSON document and a newline, nothing else."""
    buf = io.StringIO()
    render.emit(sample(), "json", Console(file=buf, width=80))
    text = buf.getvalue()
    assert text.endswith("}\n")
    assert strict_loads(text)["layers"][0]["name"] == "bn1"


# --------------------------------------------------------------------------- markdown


def _cells(row: str) -> list[str]:
    """The cells of a markdown table row, splitting only on unescaped pipes."""
    return re.split(r"(?<!\\)\|", row.strip())[1:-1]


def test_markdown_one_row_per_layer():
    """The markdown table has a header, a rule and exactly one row per layer, in order."""
    text = render.to_markdown(sample())
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| BN layer"))
    rows = [line for line in lines[header + 2 :] if line.startswith("|")]
    assert len(rows) == 3
    assert [_cells(row)[0].strip() for row in rows] == ["`bn1`", "`layer1.0.bn2`", "`head.bn`"]
    width = len(_cells(lines[header]))
    assert width == 7
    assert all(len(_cells(row)) == width for row in rows)
    assert "layer1.0.conv1 (backward)" in rows[0]
    assert "stays: `producer_output_shared`" in rows[1]
    assert "`dead_channels`" in rows[1]


def test_markdown_escapes_pipes_in_names():
    """A '|' in a layer name or fold target is escaped so the row keeps its column count."""
    r = report((layer("a|b", fold_into="x|y"), layer("plain")))
    lines = render.to_markdown(r).splitlines()
    header = next(line for line in lines if line.startswith("| BN layer"))
    rows = [line for line in lines if line.startswith("| `")]
    assert rows[0].startswith(r"| `a\|b` |")
    assert r"x\|y (backward)" in rows[0]
    assert [len(_cells(row)) for row in rows] == [len(_cells(header))] * 2


def test_markdown_lists_warnings_and_notes():
    """Markdown adds the warning counts, one bullet per diagnostic and the notes."""
    text = render.to_markdown(sample())
    assert "**Warnings:** `dead_channels` ×1" in text
    assert "- `layer1.0.bn2`: 3 of 64 channels have |gamma| < 0.001" in text
    assert "_Note: eps assumed_" in text
    assert "foldable: **1/3**" in text


def test_markdown_unknown_architecture():
    """Without an architecture the markdown says foldable is unknown."""
    r = report(
        (layer("bn"),), architecture_known=False, summary=InspectSummary(1, None, 0, 0, 0, {})
    )
    assert "foldable: unknown (no architecture)" in render.to_markdown(r)


# --------------------------------------------------------------------------- table


def test_table_fits_80_columns_and_names_every_layer():
    """The rich table at width 80 has no line longer than 80 and shows every layer name."""
    text = table_text(sample())
    assert max(len(line) for line in text.splitlines()) <= 80
    for name in ("bn1", "layer1.0.bn2", "head.bn"):
        assert name in text
    assert "→ layer1.0.conv1" in text.replace("\n", " ") or "layer1.0.conv1" in text
    assert "fold: 1/3; removes 128 parameters and 129 buffer values" in text
    assert "warnings: dead_channels ×1" in text
    assert "note: eps assumed" in text


def test_table_long_names_stay_within_80_columns():
    """Very long layer names and paths wrap inside their column instead of widening the table."""
    long = "backbone.stages.3.blocks.12.conv_dw.bn_with_an_unusually_long_name"
    r = report(
        (
            layer(
                long,
                fold_into="backbone.stages.3.blocks.12.conv_dw.conv_pointwise",
                warnings=("dead_channels", "tiny_variance", "large_scale_spread"),
            ),
        ),
        model="/very/long/path/" + "x" * 90 + "/model.pt",
    )
    text = table_text(r)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "backbone" in text


def test_table_prints_markup_literally():
    """Names, details, messages and notes containing rich markup are printed as written."""
    r = report(
        (
            layer(
                "[bold]x[/bold]",
                fold_into=None,
                fold_direction=None,
                reason="bn_output_shared",
                reason_detail="[red]feeds[/red] two",
                warnings=("dead_channels",),
                diagnostics=(Diagnostic("dead_channels", "1 of 8 [i]dead[/i]"),),
            ),
        ),
        model="[link=http://x]m[/link].pt",
        notes=("[blink]note[/blink]",),
    )
    text = table_text(r)  # a console with markup ON: render must not rely on it being off
    assert "[bold]x[/bold]" in text
    assert "[red]feeds[/red] two" in text
    assert "1 of 8 [i]dead[/i]" in text
    assert "[blink]note[/blink]" in text
    assert "[link=http://x]m[/link].pt" in text


def test_table_nonfinite_values_do_not_crash():
    """NaN/Inf statistics render as text in the table."""
    r = report((layer("bn", fold_scale=Spread(NAN, NAN, INF), running_var=Spread(-INF, 0, 1)),))
    text = table_text(r)
    assert "nan…inf" in text
    assert "-inf" in text


# --------------------------------------------------------------------------- fuse reports


def fuse_report(**changes) -> FuseReport:
    base = FuseReport(
        model="model.pt",
        format="state_dict",
        output="out|put.onnx",
        exporter="dynamo",
        opset=18,
        folded=(FoldedSite("bn|1", "conv|1", "backward", "conv_bn", "BatchNorm2d"),),
        skipped=(SkippedSite("[bold]bn2[/bold]", "bn_output_shared", "feeds a|b"),),
        params_before=100,
        params_after=84,
        onnx_nodes=5,
        onnx_bn_nodes=1,
        verification=Verification(
            passed=True,
            atol=1e-5,
            rtol=1e-4,
            inputs=2,
            input_source="random (seeded)",
            max_abs_error=NAN,
            max_rel_error=INF,
            outputs=(OutputCheck("y", (1, 10), 1e-7, 2e-7, 3.0, True),),
            folded_torch_max_abs_error=1e-15,
            baseline_max_abs_error=None,
        ),
    )
    return dataclasses.replace(base, **changes)


def test_fuse_json_is_valid_with_nonfinite_errors():
    """A fuse report's JSON turns NaN/Inf errors into null and keeps the shape as a list."""
    data = strict_loads(render.to_json(fuse_report()))
    assert data["schema_version"] == 1
    assert data["verification"]["max_abs_error"] is None
    assert data["verification"]["max_rel_error"] is None
    assert data["verification"]["outputs"][0]["shape"] == [1, 10]
    assert data["folded"][0] == {
        "bn": "bn|1",
        "into": "conv|1",
        "direction": "backward",
        "rule": "conv_bn",
        "bn_kind": "BatchNorm2d",
    }


def test_fuse_markdown_escapes_pipes():
    """Fuse markdown rows escape '|' in BN names, targets and details."""
    text = render.to_markdown(fuse_report())
    assert r"| `bn\|1` | `conv\|1` | backward | conv_bn |" in text
    assert r"| `[bold]bn2[/bold]` | `bn_output_shared` | feeds a\|b |" in text


def test_fuse_table_fits_and_is_literal():
    """The fuse table fits 80 columns and prints markup-looking names literally."""
    text = table_text(fuse_report())
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "[bold]bn2[/bold]" in text
    assert "folded 1, kept 1;" in text
    assert "100 → 84" in text
    assert "verification PASSED" in text


# --------------------------------------------------------------------------- imports


def test_render_imports_no_torch():
    """Importing the renderer in a fresh interpreter loads neither torch nor numpy."""
    code = (
        "import sys, bnfold.cli.render; "
        "print(sorted(m for m in ('torch', 'numpy', 'onnx') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("value", [0.0, -0.0, 1e-300, 1e300])
def test_json_keeps_finite_extremes(value):
    """Finite floats, however large or small, are written unchanged."""
    data = strict_loads(render.to_json(report((layer("bn", eps=value),))))
    assert data["layers"][0]["eps"] == value
    assert math.copysign(1.0, data["layers"][0]["eps"]) == math.copysign(1.0, value)

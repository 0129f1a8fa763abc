"""Rendering what --data adds (issue 17): the recalibration report and the inspect report's
data fields as table, JSON and markdown (``cli/render.py``), the drift panels
(``cli/plot.py``) and the HTML data columns (``cli/html.py``). Reports are built by hand:
no torch.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math

from rich.console import Console

from bnfold.cli import render
from bnfold.cli.html import inspect_html
from bnfold.cli.plot import figure_size
from bnfold.reports import (
    DataSummary,
    Diagnostic,
    InspectReport,
    InspectSummary,
    RecalibratedLayer,
    RecalibrationReport,
    Spread,
)
from tests.helpers import bn_layer

DATA = DataSummary(
    source="imgs/<script>|x",
    kind="images",
    samples=512,
    batches=16,
    batch_size=32,
    input_shapes=((3, 224, 224),),
    preprocessing="RGB, 224x224; scaled to [0, 1]; normalised with mean 0.485,0.456,0.406 "
    "std 0.229,0.224,0.225",
)
THRESHOLDS = {"dead_gamma": 1e-3, "tiny_variance": 1e-4, "scale_spread": 100.0}


def recalibration(n: int = 3) -> RecalibrationReport:
    layers = [
        RecalibratedLayer(
            name=f"layer{i}.with|pipe.and_a_rather_long_module_name.bn{i}",
            kind="BatchNorm2d",
            channels=64 * (i + 1),
            updated=i != 1,
            reason=None if i != 1 else "not_called",
            detail=None if i != 1 else "the data never reaches it",
            calls=0 if i == 1 else 1,
            values=0 if i == 1 else 512 * 56 * 56,
            mean_shift=None if i == 1 else Spread(0.0, 0.25, 3.5),
            var_ratio=None if i == 1 else Spread(0.125, 1.0, 8.0),
            running_var=Spread(1e-3, 0.5, 40.0),
        )
        for i in range(n)
    ]
    return RecalibrationReport(
        model="resnet50.pth",
        format="state_dict",
        output="out.pth",
        method="cumulative",
        data=DATA,
        layers=tuple(layers),
        updated=n - 1,
        complete=False,
        batches=16,
        passes=1,
        seconds=12.5,
    )


def with_data(layers, thresholds=None) -> InspectReport:
    return InspectReport(
        model="m.pt",
        format="state_dict",
        architecture_known=True,
        order="data-flow",
        layers=tuple(layers),
        summary=InspectSummary(len(layers), len(layers), 0, 0, 0, {"stats_drift": 1}),
        thresholds=thresholds or {**THRESHOLDS, "drift_mean": 0.5, "drift_var": 2.0},
        data=DATA,
    )


def drifted(name: str, **changes) -> object:
    values = {
        "data_values": 512,
        "data_mean": Spread(-1.0, 0.0, 2.0),
        "data_var": Spread(0.5, 1.0, 9.0),
        "mean_shift": Spread(0.0, 0.2, 1.5),
        "var_ratio": Spread(0.25, 1.0, 3.0),
        "mean_shift_channel": 17,
        "var_ratio_channel": 5,
        "warnings": ("stats_drift",),
        "diagnostics": (
            Diagnostic("stats_drift", "on the data: mean shift up to 1.5 (channel 17) ..."),
        ),
    }
    return bn_layer(name, **{**values, **changes})


def table(report) -> str:
    out = io.StringIO()
    render.emit(report, "table", Console(file=out, width=80, markup=False, color_system=None))
    return out.getvalue()


def test_recalibration_json_round_trips_every_field():
    """issue 17: the JSON has every field of the recalibration report, NaN as null."""
    report = recalibration()
    bad = dataclasses.replace(report.layers[0], mean_shift=Spread(math.nan, 0.0, math.inf))
    report = dataclasses.replace(report, layers=(bad, *report.layers[1:]))
    data = json.loads(render.to_json(report))
    assert data["schema_version"] == 1 and data["complete"] is False
    assert data["data"]["input_shapes"] == [[3, 224, 224]]
    assert data["layers"][0]["mean_shift"] == {"min": None, "median": 0.0, "max": None}
    assert data["layers"][1]["reason"] == "not_called"
    assert set(data) == {f.name for f in dataclasses.fields(RecalibrationReport)}


def test_recalibration_table_fits_80_columns_and_says_what_stayed():
    """issue 17: the table fits 80 columns, names each layer, the kept ones and exit 1."""
    text = table(recalibration(5))
    assert all(len(line) <= 80 for line in text.splitlines())
    words = " ".join(text.split())
    assert "kept (not_called): the data never reaches it" in words
    assert "not every BatchNorm was re-estimated (exit 1)" in words
    assert "re-estimated 4 of 5 BatchNorm layers, method cumulative" in words


def test_recalibration_table_with_drift_before_and_after_fits_80_columns():
    """issue 17: with the drift measured, the table shows it before and after (largest
    mean shift, variance ratio range) within 80 columns; markdown has both columns."""
    from bnfold.reports import Drift

    report = recalibration(4)
    before = Drift(Spread(0.1, 0.5, 3.5), Spread(0.125, 1.0, 8.0), 7, 2)
    after = Drift(Spread(0.0, 0.01, 0.02), Spread(0.99, 1.0, 1.01), 1, 3)
    layers = tuple(
        dataclasses.replace(layer, drift_before=before, drift_after=after)
        for layer in report.layers
    )
    text = table(dataclasses.replace(report, layers=layers))
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "drift before" in text and "3.5, 0.12…8" in text and "0.02, 0.99…1" in text
    markdown = render.to_markdown(dataclasses.replace(report, layers=layers))
    assert "| 3.5, 0.12…8 | 0.02, 0.99…1 |" in markdown


def test_recalibration_markdown_escapes_names():
    """issue 17: markdown has one row per layer, pipes in names and paths escaped."""
    text = render.to_markdown(recalibration())
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == 3 and all("with\\|pipe" in row for row in rows)
    assert "imgs/<script>\\|x" in text
    assert "kept: `not_called`" in text


def test_inspect_with_data_table_and_markdown():
    """issue 17: with data the table gets a second table of drifts within 80 columns and
    the markdown two more columns; without data neither appears."""
    report = with_data([drifted("layer1.0.bn1"), drifted("layer1.0.bn2")])
    text = table(report)
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "values/ch" in text and "0.25…3 c5" in text and "1.5 c17" in text
    assert "stats_drift over 0.5 or outside 1/2…2" in " ".join(text.split())
    markdown = render.to_markdown(report)
    assert "| 1.5 c17 | 0.25…3 c5 |" in markdown
    plain = dataclasses.replace(report, data=None)
    assert "values/ch" not in table(plain)
    assert "var ratio" not in render.to_markdown(plain)


def test_drift_panels_make_the_picture_taller():
    """issue 17: with data the figure has two more panels of the same height."""
    report = with_data([drifted(f"l{i}") for i in range(5)])
    width, height = figure_size(report)
    plain_width, plain_height = figure_size(dataclasses.replace(report, data=None))
    assert width == plain_width
    assert 2 * 2.4 <= height - plain_height <= 2 * 2.4 + 0.25  # sizes round up to 1/4 in


def test_drift_picture_renders(tmp_path):
    """issue 17: the picture with drift panels renders (missing drifts included) as PNG."""
    from bnfold.cli.plot import render as draw

    layers = [drifted("a"), drifted("b", mean_shift=None, var_ratio=None, warnings=())]
    data = draw(with_data(layers), "png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_has_the_data_and_escapes_its_source():
    """issue 17: the page lists the data (escaped), the data columns and explains the codes
    with the report's drift thresholds."""
    thresholds = {**THRESHOLDS, "drift_mean": 0.75, "drift_var": 3.0}
    page = inspect_html(with_data([drifted("x")], thresholds), None, "no picture")
    assert "imgs/&lt;script&gt;|x" in page and "<script>" not in page
    assert "<th>values/ch</th>" in page and "<th>var ratio</th>" in page
    assert "drift_mean (0.75)" in page and "below 1/3" in page
    assert '<h3 id="stats_drift">' in page
    assert "(worst: channel 17)" in page and "(worst: channel 5)" in page


def test_fuse_report_says_the_statistics_were_re_estimated_first():
    """issue 17: a fuse report carrying a recalibration says so in table, markdown, HTML
    and JSON, naming the layers that kept their statistics."""
    from bnfold.cli.html import fuse_html
    from bnfold.reports import FuseReport

    fuse = FuseReport(
        model="m.pt", format="state_dict", output="m.onnx", exporter="dynamo", opset=18,
        folded=(), skipped=(), params_before=10, params_after=8, onnx_nodes=3,
        onnx_bn_nodes=0, verification=None, recalibration=recalibration(),
    )  # fmt: skip
    sentence = "BatchNorm statistics re-estimated first on 512 samples"
    assert sentence in " ".join(table(fuse).split())
    assert sentence in render.to_markdown(fuse)
    assert sentence in fuse_html(fuse, None, None, "no picture")
    assert json.loads(render.to_json(fuse))["recalibration"]["updated"] == 2
    plain = dataclasses.replace(fuse, recalibration=None)
    assert "re-estimated" not in table(plain) + render.to_markdown(plain)

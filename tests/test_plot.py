"""Pictures and HTML reports (bnfold/cli/plot.py, bnfold/cli/html.py)."""

from __future__ import annotations

import json
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.cli.html import inspect_html
from bnfold.cli.plot import render
from bnfold.reports import BNLayerReport, InspectReport, InspectSummary, Spread

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
MODEL = str(SAMPLES / "convnet.state_dict.pt")
ARCH = f"{SAMPLES / 'archs.py'}:ConvNet"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def layer(name: str, warnings: tuple[str, ...] = ()) -> BNLayerReport:
    return BNLayerReport(
        name,
        "BatchNorm2d",
        8,
        1e-5,
        True,
        0.1,
        True,
        True,
        3,
        False,
        Spread(-1, 0, 1),
        Spread(0.01, 0.5, 2),
        Spread(1e-4, 1, 2),
        Spread(-1, 0, 1),
        Spread(-0.5, 1, 3),
        "conv",
        "backward",
        None,
        None,
        warnings,
        (),
    )


def report(layers: list[BNLayerReport]) -> InspectReport:
    return InspectReport(
        "m.pt",
        "state_dict",
        True,
        "data-flow",
        tuple(layers),
        InspectSummary(len(layers), len(layers), 0, 0, 0, {}),
        {},
    )


def test_png_of_a_sample_model(tmp_path):
    """--plot writes a valid PNG whose size follows the layer count; JSON stays clean."""
    out = tmp_path / "bn.png"
    result = CliRunner().invoke(
        app, ["inspect", MODEL, "--arch", ARCH, "--plot", str(out), "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)
    assert png_size(out.read_bytes()) == (800, 1000)
    assert f"wrote {out}" in result.stderr


def test_svg_and_pdf(tmp_path):
    """.svg is XML naming the layers; .pdf starts with %PDF."""
    runner = CliRunner()
    svg, pdf = tmp_path / "bn.svg", tmp_path / "bn.pdf"
    for path in (svg, pdf):
        result = runner.invoke(app, ["inspect", MODEL, "--arch", ARCH, "--plot", str(path)])
        assert result.exit_code == 0, result.output
    ET.fromstring(svg.read_bytes())
    assert b"stem.1" in svg.read_bytes()
    assert pdf.read_bytes()[:4] == b"%PDF"


def test_150_layers_render_wider():
    """A 150-layer report renders, wider than a 5-layer one."""
    small = png_size(render(report([layer(f"l{i}") for i in range(5)]), "png"))
    big = png_size(
        render(
            report(
                [layer(f"block.{i}.bn", ("dead_channels",) if i % 7 else ()) for i in range(150)]
            ),
            "png",
        )
    )
    assert small == (800, 1000)
    assert big[0] > 2 * small[0] and big[1] == 1000


def test_html_is_self_contained_and_escaped(tmp_path):
    """HTML: every layer, the summary, an embedded picture, no network, names escaped."""
    out = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["inspect", MODEL, "--arch", ARCH, "--html", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    for name in ("stem.1", "down1.1", "dw.1", "pw.1", "down2.1", "up.1"):
        assert f"<td>{name}</td>" in page
    assert "foldable: 6/6" in page
    assert "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page
    evil = inspect_html(report([layer("<script>alert(1)</script>")]), None)
    assert "<script>" not in evil and "&lt;script&gt;" in evil


def test_fuse_html_has_folds_and_verification(tmp_path):
    """fuse --html: what folded, into what, and the verification errors per output."""
    out = tmp_path / "f.html"
    result = CliRunner().invoke(
        app,
        [
            "fuse",
            MODEL,
            "--arch",
            ARCH,
            "--input-shape",
            "1,3,32,32",
            "--out",
            str(tmp_path / "m.onnx"),
            "--html",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "<td>up.1</td><td>up.0</td><td>backward</td><td>convtranspose_bn</td>" in page
    assert 'Verification: <span class="ok">passed</span>' in page
    assert "max abs error" in page
    assert "data:image/png;base64," in page


def test_without_matplotlib_plot_exits_2_with_the_hint(tmp_path, monkeypatch):
    """No matplotlib: --plot exits 2 and says how to install it; nothing is written."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "bn.png"
    result = CliRunner().invoke(app, ["inspect", MODEL, "--plot", str(out)])
    assert result.exit_code == 2
    assert "pip install 'bnfold[plot]'" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("name", ["bn.gif", "bn"])
def test_unsupported_plot_extension_exits_2(tmp_path, name):
    """Only .png, .svg and .pdf are drawn."""
    result = CliRunner().invoke(app, ["inspect", MODEL, "--plot", str(tmp_path / name)])
    assert result.exit_code == 2
    assert ".png, .svg or .pdf" in result.stderr

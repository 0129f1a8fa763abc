"""Pictures (``--plot``, bnfold/cli/plot.py) and HTML reports (``--html``, bnfold/cli/html.py).

Rendering tests build ``InspectReport``/``FuseReport`` objects by hand (no torch); the
CLI tests use the shipped sample models, which are really trained.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import struct
import sys
import textwrap
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.cli.html import fuse_html, inspect_html
from bnfold.cli.plot import DPI, figure_size, render
from bnfold.reports import (
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
from tests.helpers import assert_one_error_line, bn_layer, write_arch

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
MODEL = SAMPLES / "convnet.state_dict.pt"
ARCH = f"{SAMPLES / 'archs.py'}:ConvNet"
CONVNET_LAYERS = ("stem.1", "down1.1", "dw.1", "pw.1", "down2.1", "up.1")
INSTALL_HINT = "pip install 'bnfold[plot]'"
THRESHOLDS = {"dead_gamma": 1e-3, "tiny_variance": 1e-4, "scale_spread": 100.0}


# --------------------------------------------------------------------------- helpers


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def expected_pixels(report: InspectReport) -> tuple[int, int]:
    width, height = figure_size(report)
    return round(width * DPI), round(height * DPI)


def layer(name: str, warnings: tuple[str, ...] = (), **changes: object) -> BNLayerReport:
    values: dict[str, object] = {
        "channels": 8,
        "num_batches_tracked": 3,
        "running_var": Spread(0.01, 0.5, 2),
        "gamma": Spread(0.5, 1, 2),
        "beta": Spread(-1, 0, 1),
        "fold_scale": Spread(0.4, 1.4, 20),
        "fold_into": "conv",
        "warnings": warnings,
        "diagnostics": tuple(Diagnostic(w, f"{w} fired") for w in warnings),
    }
    return bn_layer(name, **{**values, **changes})


def report(layers: list[BNLayerReport], thresholds: dict | None = None) -> InspectReport:
    counts: dict[str, int] = {}
    for item in layers:
        for code in item.warnings:
            counts[code] = counts.get(code, 0) + 1
    return InspectReport(
        model="m.pt",
        format="state_dict",
        architecture_known=True,
        order="data-flow",
        layers=tuple(layers),
        summary=InspectSummary(len(layers), len(layers), 16, 24, 0, counts),
        thresholds=thresholds or THRESHOLDS,
    )


def varied_report(n: int, seed: int = 0) -> InspectReport:
    """n layers with realistic spreads, zeros, mixed signs and the common warnings."""
    rng = random.Random(seed)
    layers = []
    for i in range(n):
        var_mid = 10 ** rng.uniform(-2, 1)
        var = Spread(
            var_mid * 10 ** rng.uniform(-3, -0.3), var_mid, var_mid * 10 ** rng.uniform(0.3, 1)
        )
        g_mid = 10 ** rng.uniform(-0.5, 0.3)
        g_min, warnings = g_mid * 10 ** rng.uniform(-1.5, -0.2), []
        if i % 10 == 3:
            g_min = 0.0
            warnings.append("dead_channels")
        if i % 7 == 2:
            g_min = -3 * g_mid
        gamma = Spread(g_min, g_mid, g_mid * 10 ** rng.uniform(0.1, 0.8))
        scale = Spread(
            gamma.min / math.sqrt(var.max),
            gamma.median / math.sqrt(var.median),
            gamma.max / math.sqrt(var.min),
        )
        if var.min < 1e-4:
            warnings.append("tiny_variance")
        if abs(scale.max) > 100 * max(abs(scale.min), 1e-12):
            warnings.append("large_scale_spread")
        if i % 37 == 5:
            warnings.append("stale_stats")
        name = f"stages.{i // 30}.blocks.{i % 30 // 3}.conv_pw.bn{i % 3 + 1}"
        layers.append(layer(name, tuple(warnings), running_var=var, gamma=gamma, fold_scale=scale))
    return report(layers)


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


class _Checker(HTMLParser):
    """Collects every src/href and checks that non-void tags are closed in order."""

    VOID = frozenset({"meta", "img", "br", "hr", "link", "input"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [v or "" for k, v in attrs if k in ("src", "href")]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()


def check_self_contained(page: str) -> None:
    """Well-formed, and nothing it loads comes from a network (only data: URIs)."""
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert checker.stack == [], checker.stack
    assert all(link.startswith("data:") for link in checker.links), checker.links
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "@import" not in page and "url(" not in page


# --------------------------------------------------------------------------- --plot


def test_png_of_a_sample_model(tmp_path):
    """--plot x.png: a valid PNG of the expected size; JSON on stdout stays clean."""
    from bnfold.loading import load_model
    from bnfold.stats import inspect_model

    out = tmp_path / "bn.png"
    result = invoke("inspect", MODEL, "--arch", ARCH, "--plot", out, "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [item["name"] for item in data["layers"]] == list(CONVNET_LAYERS)
    assert result.stderr == f"wrote {out}\n"
    stats = inspect_model(load_model(MODEL, arch=ARCH))
    size = png_size(out.read_bytes())
    assert size == expected_pixels(stats)
    assert size[0] == 800  # 6 layers: the narrowest figure, 8 in at 100 dpi
    import matplotlib.image

    assert matplotlib.image.imread(out).shape[:2] == (size[1], size[0])
    assert [p.name for p in tmp_path.iterdir()] == ["bn.png"]  # no temporary file left


def test_svg_and_pdf(tmp_path):
    """.svg is XML that names every layer; .pdf starts with %PDF; the model is untouched."""
    before = MODEL.read_bytes()
    svg, pdf = tmp_path / "bn.svg", tmp_path / "BN.PDF"
    for path in (svg, pdf):
        result = invoke("inspect", MODEL, "--arch", ARCH, "--plot", path)
        assert result.exit_code == 0, result.output
    root = ET.fromstring(svg.read_bytes())
    assert root.tag.endswith("svg")
    text = " ".join(el.text or "" for el in root.iter() if el.tag.endswith("text"))
    for name in CONVNET_LAYERS:
        assert name in text
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert MODEL.read_bytes() == before


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_same_report_gives_the_same_bytes(fmt):
    """Rendering is deterministic: no dates, fixed SVG ids, the default style."""
    r = varied_report(12)
    assert render(r, fmt) == render(r, fmt)


def test_5_and_150_layers():
    """5 layers give an 8-inch figure; 150 layers a wider one with every name in it."""
    small = varied_report(5)
    assert (
        png_size(render(small, "png")) == expected_pixels(small) == (800, expected_pixels(small)[1])
    )
    big = varied_report(150)
    width, height = png_size(render(big, "png"))
    assert (width, height) == expected_pixels(big)
    assert width >= 150 * 0.16 * DPI
    assert height < 1.5 * expected_pixels(small)[1]  # wider, not taller
    svg = render(big, "svg").decode()
    for item in big.layers:  # 0.16 in per layer: every name fits
        assert f">{item.name}<" in svg


def test_thousands_of_layers_stay_within_bounds():
    """The width is capped (labels are thinned instead), so Agg's size limit is never hit."""
    r = report([layer(f"l{i}") for i in range(3000)])
    width, height = figure_size(r)
    assert width * DPI <= 12_000 and height * DPI < 2_000


def test_awkward_values_and_names_render_without_warnings():
    """NaN, Inf, None, zeros, negative variance, mixed signs, $ and CJK in names: no error."""
    nan, inf = math.nan, math.inf
    layers = [
        layer("$\\frac{a}{"),  # would be a mathtext error if parsed as TeX
        layer("<script>alert(1)</script>", ("weird_code",)),
        layer("层.卷积"),
        layer("zeros", ("dead_channels",), gamma=Spread(0, 0, 0), fold_scale=Spread(0, 0, 0)),
        layer("negative", gamma=Spread(-3, -1, -0.2), fold_scale=Spread(-3, -1, -0.2)),
        layer("mixed", gamma=Spread(-1, 0, 1), fold_scale=Spread(-1, 0, 1)),
        layer("nan", ("nonfinite",), running_var=Spread(nan, nan, nan), fold_scale=None),
        layer("inf", running_var=Spread(1, 2, inf), fold_scale=Spread(0, 1, inf)),
        layer("none", ("no_running_stats",), running_var=None, fold_scale=None, gamma=None),
        layer("negvar", ("negative_variance",), running_var=Spread(-1, 0.5, 2)),
        layer("x" * 300),
    ]
    r = dataclasses.replace(report(layers), model="odd $name$ <model>.pt")
    for fmt in ("png", "svg", "pdf"):
        assert render(r, fmt)
    empty = report([])
    assert png_size(render(empty, "png")) == expected_pixels(empty)
    blank = report([layer("a", running_var=None, fold_scale=None, gamma=None)])
    assert png_size(render(blank, "png")) == expected_pixels(blank)


@pytest.mark.parametrize("name", ["bn.gif", "bn", "bn.png.txt"])
def test_unsupported_plot_extension_exits_2(tmp_path, name):
    """Only .png, .svg and .pdf are drawn: anything else is one error line, exit 2."""
    result = invoke("inspect", MODEL, "--plot", tmp_path / name)
    assert_one_error_line(result, "--plot", ".png, .svg or .pdf")
    assert list(tmp_path.iterdir()) == []


def test_bad_output_paths_are_refused_before_loading(tmp_path):
    """A missing folder, a folder, or the model itself: exit 2 before the model is read."""
    absent = tmp_path / "absent.pt"  # the model is never opened: the path check comes first
    assert_one_error_line(
        invoke("inspect", absent, "--plot", tmp_path / "no" / "bn.png"), "does not exist"
    )
    (tmp_path / "dir.png").mkdir()
    assert_one_error_line(invoke("inspect", absent, "--plot", tmp_path / "dir.png"), "folder")
    model = tmp_path / "model.html"
    model.write_bytes(b"not really a model")
    assert_one_error_line(invoke("inspect", model, "--html", model), "refusing to overwrite")
    assert model.read_bytes() == b"not really a model"
    assert_one_error_line(
        invoke("inspect", absent, "--html", tmp_path / "a.htm", "--plot", tmp_path / "b.png"),
        "no such file",
    )


@pytest.mark.parametrize("name", ["report.txt", "model.pt", "report"])
def test_html_needs_an_html_extension(tmp_path, name):
    """--html with another extension is refused, so a typo cannot overwrite a model file."""
    assert_one_error_line(invoke("inspect", MODEL, "--html", tmp_path / name), ".html")


def test_without_matplotlib_plot_exits_2_with_the_hint(tmp_path, monkeypatch):
    """No matplotlib: --plot exits 2 with the install hint, before loading; nothing written."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "bn.png"
    for model in (MODEL, tmp_path / "absent.pt"):
        result = invoke("inspect", model, "--plot", out)
        assert_one_error_line(result, "matplotlib", INSTALL_HINT)
    assert not out.exists()


def test_without_matplotlib_html_has_no_pictures(tmp_path, monkeypatch):
    """No matplotlib: --html is still written, without pictures, and stderr says so."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "r.html"
    result = invoke("inspect", MODEL, "--arch", ARCH, "--html", out, "--format", "json")
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)
    assert INSTALL_HINT in result.stderr and f"wrote {out}" in result.stderr
    page = out.read_text(encoding="utf-8")
    assert "<img" not in page and "matplotlib is not installed" in page
    for name in CONVNET_LAYERS:
        assert f"<td>{name}</td>" in page


# --------------------------------------------------------------------------- --html


def test_inspect_html_is_self_contained(tmp_path):
    """inspect --html: every layer, the summary, the embedded picture, nothing from a network."""
    out = tmp_path / "r.html"
    result = invoke("inspect", MODEL, "--arch", ARCH, "--html", out, "--plot", tmp_path / "p.png")
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stderr
    page = out.read_text(encoding="utf-8")
    check_self_contained(page)
    for name in CONVNET_LAYERS:
        assert f"<td>{name}</td>" in page
    assert "<dt>BatchNorm layers</dt><dd>6</dd>" in page
    assert "<dt>foldable</dt><dd>6 of 6</dd>" in page
    assert "up.0" in page  # the fold target column
    match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert match is not None
    import base64

    assert base64.b64decode(match.group(1)) == (tmp_path / "p.png").read_bytes()


def test_html_escapes_every_user_string():
    """Layer names, kinds, reasons, notes and the model path are escaped, never markup."""
    evil = "<script>alert(1)</script>"
    r = dataclasses.replace(
        report(
            [
                layer(
                    evil,
                    ("dead_channels",),
                    kind=f'"{evil}',
                    fold_into=None,
                    reason="x<y",
                    reason_detail=evil,
                )
            ]
        ),
        model=f"/tmp/{evil}.pt",
        notes=(evil,),
    )
    page = inspect_html(r, None, "no picture")
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "x&lt;y" in page
    check_self_contained(page)


def test_html_explains_the_codes_that_fired_with_their_thresholds():
    """Each diagnostic that occurs is explained once, with the report's own thresholds."""
    r = report(
        [
            layer("a", ("dead_channels",)),
            layer("b", ("dead_channels", "tiny_variance")),
            layer("c"),
        ],
        thresholds={"dead_gamma": 0.05, "tiny_variance": 1e-6, "scale_spread": 10.0},
    )
    page = inspect_html(r, None)
    assert page.count('<h3 id="dead_channels">') == 1
    assert "dead_gamma (0.05)" in page
    assert "tiny_variance (1e-06)" in page and "1000·|gamma|" in page
    assert "(2 layers)" in page and "(1 layers)" in page
    assert "<li>b: tiny_variance fired</li>" in page
    assert 'id="large_scale_spread"' not in page and 'id="stale_stats"' not in page


def fuse_report(passed: bool = True) -> FuseReport:
    out = OutputCheck("logits", (2, 10), 3.5e-7, 2.5e-8, 13.4, passed)
    return FuseReport(
        model="/m/<net>.pt",
        format="state_dict",
        output="/m/net.onnx",
        exporter="torch.onnx.export(dynamo=True)",
        opset=20,
        folded=(FoldedSite("bn", "conv", "backward", "conv_bn", "BatchNorm2d"),),
        skipped=(SkippedSite("bn2", "zero_padding", "conv2 pads with <zeros>"),),
        params_before=1000,
        params_after=900,
        onnx_nodes=12,
        onnx_bn_nodes=1,
        verification=Verification(
            passed, 1e-6, 1e-5, 3, "random (seeded)", 3.5e-7, 2.5e-8, (out,), 1e-7, 2e-7
        ),
    )


def test_fuse_html_from_a_report():
    """fuse_html lists folded and kept layers (reason and detail), and the errors per output."""
    page = fuse_html(fuse_report(), report([layer("bn"), layer("bn2")]), None)
    check_self_contained(page)
    assert "<td>bn</td><td>BatchNorm2d</td><td>conv</td><td>→ backward</td>" in page
    assert "<td>bn2</td><td><code>zero_padding</code></td><td>conv2 pads with &lt;zeros&gt;" in page
    assert '<td>logits</td><td>[2, 10]</td><td class="num">3.5e-07</td>' in page
    assert 'Verification: <span class="ok">passed</span>' in page
    failed = fuse_html(fuse_report(passed=False), None, None)
    assert 'Verification: <span class="bad">FAILED</span>' in failed


ARCH_SOURCE = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.bn2 = nn.BatchNorm2d(4)  # after a ReLU, before a zero-padded conv: stays
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv2(self.bn2(torch.relu(self.bn(self.conv(x)))))
""")


def test_fuse_html_through_the_cli(tmp_path):
    """fuse --html: what folded into what, what stayed and why, the verification numbers."""
    import torch

    arch, namespace = write_arch(tmp_path, ARCH_SOURCE)
    torch.manual_seed(0)
    torch.save(namespace["Net"]().state_dict(), tmp_path / "net.pt")
    out, page_path = tmp_path / "net.onnx", tmp_path / "fuse.html"
    result = invoke(
        "fuse", tmp_path / "net.pt", "--arch", f"{arch}:Net", "--input-shape", "1,3,8,8",
        "-o", out, "--html", page_path, "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert f"wrote {page_path}" in result.stderr
    page = page_path.read_text(encoding="utf-8")
    check_self_contained(page)
    assert "<td>bn</td><td>BatchNorm2d</td><td>conv</td><td>→ backward</td>" in page
    assert "<td>bn2</td><td><code>zero_padding</code></td>" in page
    assert f"{data['verification']['max_abs_error']:.3g}" in page
    assert "data:image/png;base64," in page
    assert 'id="stale_stats"' in page  # freshly built BNs: statistics never updated


def test_fuse_html_may_not_be_another_output(tmp_path):
    """fuse --html equal to the model or to --out is refused before any work."""
    model = tmp_path / "m.html"
    model.write_bytes(b"x")
    assert_one_error_line(
        invoke("fuse", model, "-o", tmp_path / "m.onnx", "--html", model), "refusing"
    )
    out = tmp_path / "out.html"
    assert_one_error_line(invoke("fuse", MODEL, "-o", out, "--html", out), "another output")
    assert model.read_bytes() == b"x" and not out.exists()

"""Capture (bnfold/graph.py ``capture_model``): torch.fx where it traces, torch.export where
it does not, and the report says which (issue 14)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.graph import capture_model
from tests.helpers import write_arch
from tests.models import randomize_all

SOURCE = textwrap.dedent('''
    import torch
    from torch import nn


    class Iterating(nn.Module):
        """Iterates over a tensor's first axis: torch.fx cannot ("Proxy object cannot be
        iterated"), torch.export can."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            heads = [self.bn(self.conv(part)) for part in x.split(1, dim=1)[:1]]
            rows = [row.sum() for row in x]
            return heads[0] + torch.stack(rows).reshape(-1, 1, 1, 1)
''')


def test_fx_failure_falls_back_to_torch_export():
    """A model torch.fx cannot trace is captured by torch.export; its BN still folds."""
    from bnfold.fold_torch import fold_graph

    namespace: dict = {}
    exec(compile(SOURCE, "<arch>", "exec"), namespace)
    model = randomize_all(namespace["Iterating"]())
    x = torch.randn(2, 3, 8, 8)
    captured = capture_model(model, [x], [torch.randn(3, 3, 8, 8)])
    assert captured.how == "export" and "torch.fx" in (captured.why or "")
    outcome = fold_graph(captured.module, model, shapes_known=True)
    assert [d.into for d in outcome.decisions if d.folded]


@pytest.mark.parametrize("fmt", ["json", "table", "markdown"])
def test_report_says_which_capture_and_why(tmp_path, fmt):
    """Every output format says the capture used (fx | export) and why fx was not."""
    arch, namespace = write_arch(tmp_path, SOURCE, "iterating")
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    torch.save(randomize_all(namespace["Iterating"]()).state_dict(), weights)
    result = CliRunner().invoke(
        app,
        ["fuse", str(weights), "--arch", f"{arch}:Iterating", "--input-shape", "2,3,8,8",
         "--out", str(tmp_path / "m.onnx"), "--format", fmt],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    if fmt == "json":
        report = json.loads(result.stdout)
        assert report["capture"] == "export"
        assert "torch.fx" in report["capture_detail"]
        assert report["verification"]["passed"]
    else:
        assert "capture: torch.export (torch.fx: " in " ".join(result.stdout.split())


def test_torchscript_fuse_says_it_cannot(tmp_path):
    """Issue 14: fuse on a TorchScript archive exits 2 with one line saying why and what
    to do (never exit 3)."""
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), path)
    result = CliRunner().invoke(
        app, ["fuse", str(path), "--input-shape", "1,3,8,8", "--out", str(tmp_path / "m.onnx")]
    )
    assert result.exit_code == 2, result.output
    assert len(result.stderr.splitlines()) == 1
    assert "TorchScript" in result.stderr and "--arch" in result.stderr


def test_pt2_exported_at_batch_1_falls_back_to_a_static_batch(tmp_path):
    """Issue 13/14: a .pt2 saved by torch.export at batch 1 (its graph holds the batch
    fixed) failed; it is folded and exported with a static batch, and the report says so."""
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten()))
    program = torch.export.export(model, (torch.randn(1, 3, 8, 8),))
    path = tmp_path / "m.pt2"
    torch.export.save(program, path)
    result = CliRunner().invoke(
        app, ["fuse", str(path), "--out", str(tmp_path / "m.onnx"), "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dynamic_batch"] is False and report["verification"]["passed"]
    assert len(report["folded"]) == 1
    assert any("batch axis cannot be dynamic" in n for n in report["notes"])

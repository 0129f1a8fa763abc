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
from tests.helpers import count_torch_exports, write_arch
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


SPLITTING = textwrap.dedent('''
    import torch
    from torch import nn


    class Splitting(nn.Module):
        """Iterates over its input's channels: torch.fx cannot trace it, torch.export can,
        with a dynamic batch."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            parts = [part * (i + 1) for i, part in enumerate(x.split(1, dim=1))]
            return self.bn(self.conv(torch.cat(parts, 1))).flatten(1)
''')


def _splitting_model() -> nn.Module:
    namespace: dict = {}
    exec(compile(SPLITTING, "<arch>", "exec"), namespace)
    return randomize_all(namespace["Splitting"]())


def test_export_capture_reads_its_shapes_from_the_program(monkeypatch):
    """Issue 14: a torch.export capture takes every node's shape from the program (the
    batch symbol replaced by each input set's batch size) instead of running the graph
    again; the shapes are those running it gives."""
    import bnfold.graph as graph

    model = _splitting_model()
    sets = [[torch.randn(2, 3, 8, 8)], [torch.randn(3, 3, 8, 8)]]

    def not_run(*args, **kwargs):
        raise AssertionError("propagate_shapes ran on a torch.export capture")

    with monkeypatch.context() as m:
        m.setattr(graph, "propagate_shapes", not_run)
        captured = capture_model(model, sets[0], sets[1])
    assert captured.how == "export" and captured.dynamic_batch
    read = {n.name: n.meta["shapes"] for n in captured.module.graph.nodes}
    assert any(s[0] != s[1] for s in read.values() if s[0] is not None)  # batch 2 vs 3
    graph.propagate_shapes(captured.module, *sets)
    ran = {n.name: n.meta["shapes"] for n in captured.module.graph.nodes}
    assert read == ran


def test_program_shapes_are_not_used_out_of_their_range():
    """An input set the program was not proven for (a batch outside the symbol's range, a
    static size that differs) is not read from it: ``traced_shapes`` says no."""
    from bnfold.graph import _unlifted, capture, traced_shapes

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 8, 8)
    dynamic = torch.export.export(
        model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=2, max=8)},)
    )
    gm = capture(_unlifted(dynamic))
    assert traced_shapes(gm, dynamic, [[x], [torch.randn(8, 3, 8, 8)]])
    assert not traced_shapes(gm, dynamic, [[x], [torch.randn(9, 3, 8, 8)]])
    assert not traced_shapes(gm, dynamic, [[torch.randn(2, 3, 9, 9)]])
    static = torch.export.export(model, (x,))
    gm = capture(_unlifted(static))
    assert traced_shapes(gm, static, [[x]])
    assert not traced_shapes(gm, static, [[x], [torch.randn(3, 3, 8, 8)]])


def test_a_torch_export_capture_is_traced_once(tmp_path, monkeypatch):
    """Issue 14, "one trace, not two": the folded graph of a torch.export capture goes to
    the ONNX exporter as a program; torch.export runs once in the whole fuse."""
    import bnfold

    calls = count_torch_exports(monkeypatch)
    report = bnfold.fuse(
        _splitting_model(), tmp_path / "m.onnx", example_inputs=torch.randn(2, 3, 8, 8)
    )
    assert report.capture == "export" and report.verification.passed
    assert report.folded and report.dynamic_batch
    assert calls == ["Splitting"]


def test_a_pinned_program_is_traced_again(tmp_path):
    """Should something pin the captured program's batch size after the capture, the
    folded graph is not handed over as a program (its batch would be fixed); it is
    exported as a module, with a dynamic batch."""
    import onnx

    from bnfold.export import as_program, export_onnx

    x = torch.randn(2, 3, 8, 8)
    captured = capture_model(_splitting_model(), [x], [torch.randn(3, 3, 8, 8)])
    assert captured.program is not None
    placeholder = next(n for n in captured.module.graph.nodes if n.op == "placeholder")
    batch = placeholder.meta["val"].shape[0]
    assert bool(batch == 2)  # a guard on the symbol: the shape environment pins it
    with pytest.raises(ValueError, match="no longer symbolic"):
        as_program(captured.module, captured.program)
    result = export_onnx(captured.module, [x], tmp_path, "m.onnx", program=captured.program)
    assert result.dynamic_batch
    dims = onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param


CACHING = textwrap.dedent('''
    import torch
    from torch import nn


    class Head(nn.Module):
        """Caches a tensor computed from the input's shape in instance attributes that
        shadow class attributes, as ultralytics' detection head caches its anchors."""

        shape = None
        anchors = torch.empty(0)

        def forward(self, x):
            if self.shape != x.shape:
                self.anchors = torch.arange(x.shape[-1], dtype=x.dtype)
                self.shape = x.shape
            return x + self.anchors


    class Caching(nn.Module):
        """Iterates over its input's channels (torch.fx cannot trace it)."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.head = Head()

        def forward(self, x):
            parts = [part * (i + 1) for i, part in enumerate(x.split(1, dim=1))]
            return self.head(self.bn(self.conv(torch.cat(parts, 1))))
''')


def test_torch_export_leaves_the_model_as_it_was(tmp_path):
    """torch.export's trace runs the model's Python on fake tensors: a model that caches
    what it computes (ultralytics' anchors) kept fake tensors and symbolic sizes, and
    fuse with the batch size it was exported at ended in an internal error (exit 3).  The
    model's attributes are put back after the capture; fuse works at that batch size."""
    arch, namespace = write_arch(tmp_path, CACHING, "caching")
    model = randomize_all(namespace["Caching"]())
    captured = capture_model(model, [torch.randn(2, 3, 8, 8)], [torch.randn(3, 3, 8, 8)])
    assert captured.how == "export"
    assert "anchors" not in vars(model.head) and "shape" not in vars(model.head)
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    result = CliRunner().invoke(
        app,
        ["fuse", str(weights), "--arch", f"{arch}:Caching", "--input-shape", "2,3,8,8",
         "--out", str(tmp_path / "m.onnx"), "--format", "json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["capture"] == "export" and report["dynamic_batch"]
    assert report["verification"]["passed"] and len(report["folded"]) == 1

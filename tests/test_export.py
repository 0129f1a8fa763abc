"""Export (bnfold/export.py): the streamed single-file writer is onnx's own bytes."""

from __future__ import annotations

import gc
import weakref

import onnx_ir as ir
import pytest
import torch
from torch import nn

from bnfold.export import export_onnx, save_single_file


def exported(model: nn.Module, x: torch.Tensor):
    return torch.onnx.export(model.eval(), (x,), dynamo=True, verbose=False)


@pytest.mark.parametrize("with_small_constants", [False, True])
def test_streamed_file_is_byte_identical_to_ir_save(tmp_path, with_small_constants):
    """Weights streamed from a scratch file give exactly the bytes ir.save writes in memory,
    tiny initializers (kept inline by the scratch save) included; no scratch file is left."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 32, 1)]
    if with_small_constants:
        layers += [nn.Conv2d(32, 2, 1)]  # 2 outputs: a 16-byte bias, under ir.save's threshold
    program = exported(nn.Sequential(*layers), torch.randn(1, 3, 16, 16))
    ir.save(program.model, tmp_path / "reference.onnx")
    save_single_file(program.model, tmp_path / "streamed.onnx")
    assert (tmp_path / "streamed.onnx").read_bytes() == (tmp_path / "reference.onnx").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference.onnx", "streamed.onnx"]


@pytest.mark.parametrize("opset", [None, 23])
def test_exported_weights_are_freed_after_export(tmp_path, opset):
    """Once export_onnx returns and the model is dropped, no exported weight stays alive.

    onnxscript's rewrite rules (run by the dynamo exporter's optimiser) keep the last graph
    they matched, weights and all; without release_rewriter_state the folded weights lived
    on beside onnxruntime's copy during verification.  Opset 23 adds the fusion rules."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10)
    ).eval()
    alive = [weakref.ref(p) for p in model.parameters()]
    export_onnx(model, [torch.randn(2, 3, 16, 16)], tmp_path, "m.onnx", opset=opset)
    del model
    gc.collect()
    assert [ref() is None for ref in alive] == [True] * len(alive)


class Structured(nn.Module):
    """Outputs of several kinds at once: a dict holding a tensor and a tuple with a list
    (YOLO returns a tensor plus a list of feature maps)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return {"boxes": y.mean((2, 3)), "maps": (y, [y[:, :2], y.sum(1)])}


def test_outputs_of_any_structure_are_named_and_each_verified(tmp_path):
    """Issue 14: nested dict/tuple/list outputs become ONNX outputs named after their place,
    in pytree order (documented in the README), and every one is verified."""
    import onnx

    import bnfold
    from tests.models import randomize_all

    model = randomize_all(Structured())
    report = bnfold.fuse(model, tmp_path / "s.onnx", example_inputs=torch.randn(2, 3, 8, 8))
    names = [o.name for o in onnx.load(str(tmp_path / "s.onnx")).graph.output]
    assert names == ["boxes", "maps_0", "maps_1_0", "maps_1_1"]
    assert [o.name for o in report.verification.outputs] == [
        "['boxes']", "['maps'][0]", "['maps'][1][0]", "['maps'][1][1]"
    ]  # fmt: skip
    assert report.verification.passed and len(report.folded) == 1

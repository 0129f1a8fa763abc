"""Verification (bnfold/verify.py): passes a correct export, catches one wrong channel,
handles several outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from bnfold.export import export_onnx
from bnfold.fold_torch import fold_graph
from bnfold.graph import capture, propagate_shapes
from bnfold.inputs import random_batches
from bnfold.verify import flatten_outputs, verify_onnx
from tests.models import randomize_all


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    layers = []
    c = 3
    for width in (8, 16, 16, 32):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        c = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
    return randomize_all(nn.Sequential(*layers))


def first_outputs(module: nn.Module, batches) -> list[torch.Tensor]:
    """The folded module's outputs on the first batch, as verify_onnx takes them."""
    with torch.no_grad():
        return [t for _, t in flatten_outputs(module(*batches[0]))]


def folded_export(model: nn.Module, x: torch.Tensor, path):
    gm = capture(model)
    propagate_shapes(gm, [x])
    outcome = fold_graph(gm, model, shapes_known=True)
    export_onnx(outcome.module, [x], path.parent, path.name)
    return outcome


def test_correct_fold_passes_with_default_tolerances(tmp_path):
    """A correctly folded export passes, with errors at float32 noise level."""
    model = small_cnn()
    x = torch.randn(2, 3, 16, 16)
    out = folded_export(model, x, tmp_path / "m.onnx")
    batches = random_batches([(2, 3, 16, 16)], "float32", 3)
    v = verify_onnx(
        model, tmp_path / "m.onnx", batches, folded_outputs=first_outputs(out.module, batches)
    )
    assert v.passed
    assert v.max_rel_error < 1e-5
    assert (v.atol, v.rtol) == (1e-6, 1e-5)
    assert v.folded_torch_max_abs_error is not None and v.folded_torch_max_abs_error < 1e-5


@pytest.mark.parametrize("factor", [1.01, 0.99, -1.0])
def test_one_wrongly_folded_channel_fails(tmp_path, factor):
    """Scaling one live output channel of one conv by 1% (or flipping it) fails verification."""
    model = small_cnn()
    x = torch.randn(2, 3, 16, 16)
    folded_export(model, x, tmp_path / "m.onnx")
    with torch.no_grad():  # the channel of the third conv that is most alive after its ReLU
        channel = int(model[:9](x).mean((0, 2, 3)).argmax())
    proto = onnx.load(str(tmp_path / "m.onnx"))
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    target = convs[2].input[1]
    for init in proto.graph.initializer:
        if init.name == target:
            w = numpy_helper.to_array(init).copy()
            w[channel] *= factor
            init.CopyFrom(numpy_helper.from_array(w.astype(np.float32), init.name))
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    v = verify_onnx(model, tmp_path / "bad.onnx", random_batches([(2, 3, 16, 16)], "float32", 3))
    assert not v.passed
    assert v.max_rel_error > 1e-5


class TwoHeads(nn.Module):
    def __init__(self, as_dict: bool):
        super().__init__()
        self.as_dict = as_dict
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.a = nn.Linear(4, 2)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        h = self.bn(self.conv(x)).mean((2, 3))
        if self.as_dict:
            return {"first": self.a(h), "second": self.b(h)}
        return self.a(h), self.b(h)


@pytest.mark.parametrize("as_dict", [False, True])
def test_multi_output_models_are_compared_per_output(tmp_path, as_dict):
    """Tuple and dict outputs: one check per output, named, with its own shape."""
    model = randomize_all(TwoHeads(as_dict))
    x = torch.randn(2, 3, 6, 6)
    out = folded_export(model, x, tmp_path / "m.onnx")
    batches = random_batches([(2, 3, 6, 6)], "float32", 2)
    v = verify_onnx(
        model, tmp_path / "m.onnx", batches, folded_outputs=first_outputs(out.module, batches)
    )
    assert v.passed
    assert [o.shape for o in v.outputs] == [(2, 2), (2, 3)]
    if as_dict:
        assert [o.name for o in v.outputs] == ["['first']", "['second']"]


def test_layerwise_float64_reference_equals_the_whole_model_copy():
    """The reference computed on the captured graph, one layer widened at a time, is the
    float64 run of the whole model (up to float64 rounding)."""
    from bnfold.verify import compute_reference

    model = small_cnn().eval()
    batches = random_batches([(2, 3, 16, 16)], "float32", 2)
    gm = capture(model)
    propagate_shapes(gm, [batches[0][0]])
    layerwise = compute_reference(model, batches, graph=gm)
    whole = compute_reference(model, batches)
    assert layerwise.how.startswith("float64 run of the captured graph")
    assert whole.how == "float64 copy of the model"
    for a, b in zip(layerwise.expected, whole.expected, strict=True):
        assert a[0].dtype == torch.float64
        assert torch.allclose(a[0], b[0], rtol=1e-12, atol=1e-12)


def test_a_graph_that_disagrees_with_the_model_is_not_trusted():
    """If the eager model and the captured graph differ, the whole model is widened instead."""
    from bnfold.verify import compute_reference

    model = small_cnn().eval()
    batches = random_batches([(2, 3, 16, 16)], "float32", 1)
    other = small_cnn().eval()
    with torch.no_grad():
        other[0].weight.mul_(1.5)
    gm = capture(other)
    ref = compute_reference(model, batches, graph=gm)
    assert ref.how == "float64 copy of the model"
    with torch.no_grad():
        assert torch.allclose(ref.expected[0][0].float(), model(batches[0][0]), atol=1e-5)


def test_verification_errors_name_the_output_not_the_temporary_folder(tmp_path):
    """Issue 13: onnxruntime refusing the written file named bnfold's temporary folder;
    the error names --out."""
    from bnfold.errors import VerifyError
    from bnfold.pipeline import _named_as

    written = tmp_path / ".m.onnx.x.bnfold-tmp" / "m.onnx"
    with pytest.raises(VerifyError) as info, _named_as(written, tmp_path / "m.onnx"):
        raise VerifyError(f"onnxruntime cannot load the exported model: Load model from {written}")
    assert str(tmp_path / "m.onnx") in info.value.message and "bnfold-tmp" not in info.value.message


def test_a_scaled_batch_does_not_widen_the_tolerance_of_the_others(tmp_path):
    """An error that does not grow with the input (the last layer's bias shifted by 1e-4 of
    the output's scale on ordinary inputs) fails, although beside the batch scaled by 100
    it is under 1e-5 of the largest output seen: each batch is judged against its own
    scale."""
    torch.manual_seed(0)
    model = randomize_all(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(392, 10))
    )
    x = torch.randn(2, 3, 9, 9)
    folded_export(model, x, tmp_path / "m.onnx")
    plain = random_batches([(2, 3, 9, 9)], "float32", 1)
    batches = [*plain, [plain[0][0] * 100]]
    with torch.no_grad():
        scale = float(model(*plain[0]).abs().max())
        big = float(model(*batches[1]).abs().max())
    assert big > 20 * scale  # an affine network grows with its input
    proto = onnx.load(str(tmp_path / "m.onnx"))
    last = [n for n in proto.graph.node if n.op_type == "Gemm"][-1]
    for init in proto.graph.initializer:
        if init.name == last.input[2]:
            bias = numpy_helper.to_array(init) + np.float32(1e-4 * scale)
            init.CopyFrom(numpy_helper.from_array(bias.astype(np.float32), init.name))
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    v = verify_onnx(model, tmp_path / "bad.onnx", batches)
    assert not v.passed
    assert 1e-5 < v.max_rel_error < 1e-3
    assert v.max_abs_error < 1e-5 * v.outputs[0].reference_max_abs  # the old, global test
    assert verify_onnx(model, tmp_path / "m.onnx", batches).passed

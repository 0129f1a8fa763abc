"""The fold pass (bnfold/fold_torch.py): every rule folds with the right numbers, every BN that
must stay stays with its exact reason, and the input model is never modified."""

from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnfold.fold_torch import fold_graph, shared_modules
from bnfold.graph import capture, is_bn_module, propagate_shapes
from bnfold.rules import Reason
from tests.models import (
    ConvBN,
    TokenLinearBN,
    float64_reference,
    randomize_all,
    randomize_bn,
    state_fingerprint,
)


def fold(model: nn.Module, *inputs: torch.Tensor, shapes: bool = True):
    gm = capture(model)
    if shapes:
        propagate_shapes(gm, inputs)
    return fold_graph(gm, model, shapes_known=shapes)


def bn_calls_left(gm) -> int:
    """BN call sites left in the folded graph (modules and functional calls)."""
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and is_bn_module(gm.get_submodule(node.target)):
            n += 1
        if node.op == "call_function" and "batch_norm" in str(node.target):
            n += 1
    return n


def assert_exact(model: nn.Module, outcome, *inputs: torch.Tensor, tol: float = 2e-6):
    """Folded output equals the original's float64 output to float32 precision."""
    ref = float64_reference(model, *inputs)
    with torch.no_grad():
        got = outcome.module(*inputs).double()
    scale = ref.abs().max().clamp_min(1e-12)
    assert float((got - ref).abs().max() / scale) < tol


def only(outcome):
    (decision,) = outcome.decisions
    return decision


# --------------------------------------------------------------------------- folds


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(
    "conv_kwargs",
    [
        {},
        {"bias": False},
        {"stride": 2, "padding": 1},
        {"dilation": 2, "padding": 2},
        {"padding": 1, "padding_mode": "reflect"},
    ],
)
def test_conv_bn_folds_backward(dims, conv_kwargs):
    """Conv1d/2d/3d (stride, dilation, padding modes, bias or not) + BN fold into the conv."""
    model = randomize_all(ConvBN(3, 8, dims, **conv_kwargs))
    x = torch.randn(2, 3, *([9] * dims))
    out = fold(model, x)
    d = only(out)
    assert (d.into, d.direction.value, d.rule) == ("conv", "backward", "conv_bn")
    assert bn_calls_left(out.module) == 0
    assert_exact(model, out, x)


def test_depthwise_conv_folds():
    """A depthwise conv (groups == channels) folds per channel."""
    model = randomize_all(nn.Sequential(nn.Conv2d(6, 6, 3, groups=6, padding=1), nn.BatchNorm2d(6)))
    x = torch.randn(2, 6, 8, 8)
    out = fold(model, x)
    assert only(out).into == "0"
    assert_exact(model, out, x)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_transpose_with_groups_folds(dims, groups):
    """ConvTranspose1d/2d/3d with groups > 1 folds exactly (torch.fx's fuse gets it wrong)."""
    convt = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1]
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    model = randomize_all(nn.Sequential(convt(8, 12, 3, stride=2, groups=groups), bn(12)))
    x = torch.randn(2, 8, *([5] * dims))
    out = fold(model, x)
    assert only(out).rule == "convtranspose_bn"
    assert bn_calls_left(out.module) == 0
    assert_exact(model, out, x)


def test_linear_bn1d_on_2d_input_folds():
    """Linear + BatchNorm1d on (N, C) folds into the Linear."""
    model = randomize_all(nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7)))
    x = torch.randn(4, 5)
    out = fold(model, x)
    assert (only(out).into, only(out).rule) == ("0", "linear_bn")
    assert_exact(model, out, x)


def test_levit_token_linear_bn_folds():
    """LeViT's Linear -> flatten(0,1) -> BN1d -> reshape_as(x) folds into the Linear."""
    model = randomize_all(TokenLinearBN(8, 12))
    x = torch.randn(2, 16, 8)
    out = fold(model, x)
    assert (only(out).into, only(out).rule) == ("linear", "linear_bn")
    assert bn_calls_left(out.module) == 0
    assert_exact(model, out, x)


class TransposedTokens(nn.Module):
    """Linear on (B, N, C) tokens, BN1d over (B, C, N) after a transpose."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 10)
        self.bn = nn.BatchNorm1d(10)

    def forward(self, x):
        return self.bn(self.linear(x).transpose(1, 2))


def test_token_linear_through_transpose_folds():
    """The channel axis is tracked through transpose: Linear features == BN channels."""
    model = randomize_all(TransposedTokens())
    x = torch.randn(3, 7, 6)
    out = fold(model, x)
    assert only(out).into == "linear"
    assert_exact(model, out, x)


class CoincidentAxis(nn.Module):
    """Linear(4 -> 5) on (B, 5, 4) then BN1d(5) straight away: the BN normalises the 5
    *tokens*, not the Linear's 5 features. Same count, different axis: must not fold."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.linear(x))


def test_coincident_channel_count_on_wrong_axis_stays():
    """Equal sizes on the wrong axis are caught by shape tracking (channel_mismatch)."""
    model = randomize_all(CoincidentAxis())
    x = torch.randn(2, 5, 4)
    out = fold(model, x)
    assert only(out).reason is Reason.CHANNEL_MISMATCH
    assert bn_calls_left(out.module) == 1
    assert_exact(model, out, x)


def test_linear_without_shapes_needs_shapes():
    """Without tensor shapes a Linear+BN1d cannot be proven aligned: needs_shapes."""
    model = randomize_all(nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7)))
    out = fold(model, shapes=False)
    assert only(out).reason is Reason.NEEDS_SHAPES


def test_chain_conv_bn_bn_folds_both():
    """conv -> BN -> BN: both BNs fold into the conv, in order."""
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 8, 8)
    out = fold(model, x)
    assert [d.into for d in out.decisions] == ["0", "0"]
    assert bn_calls_left(out.module) == 0
    assert_exact(model, out, x)


def test_bn_before_unpadded_conv_folds_forward():
    """BN -> conv without padding folds into the conv's input side."""
    model = randomize_all(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, groups=2)))
    x = torch.randn(2, 4, 8, 8)
    out = fold(model, x)
    d = only(out)
    assert (d.into, d.direction.value, d.rule) == ("1", "forward", "bn_conv")
    assert_exact(model, out, x)


def test_bn_before_zero_padded_conv_stays():
    """BN -> conv with zero padding stays: the padded zeros would not see the BN's shift."""
    model = randomize_all(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1)))
    x = torch.randn(2, 4, 8, 8)
    out = fold(model, x)
    assert only(out).reason is Reason.ZERO_PADDING
    assert_exact(model, out, x)


def test_bn_before_reflect_padded_conv_folds():
    """Reflect padding copies BN outputs, so the forward fold stays exact."""
    model = randomize_all(
        nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"))
    )
    x = torch.randn(2, 4, 8, 8)
    out = fold(model, x)
    assert only(out).rule == "bn_conv"
    assert_exact(model, out, x)


class BNNeck(nn.Module):
    """Conv -> ReLU -> BN2d -> global pool -> flatten -> Linear (a BNNeck-like head)."""

    def __init__(self, pool: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1) if pool else nn.Identity()
        self.fc = nn.Linear(8 if pool else 8 * 4 * 4, 5)

    def forward(self, x):
        x = self.bn(torch.relu(self.conv(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.mark.parametrize("pool", [True, False])
def test_bn_before_classifier_folds_through_pool_or_flatten(pool):
    """BN -> (global avg pool) -> flatten -> Linear folds into the Linear."""
    model = randomize_all(BNNeck(pool))
    x = torch.randn(2, 3, 6, 6)
    out = fold(model, x)
    d = only(out)
    assert (d.into, d.rule) == ("fc", "bn_linear")
    assert bn_calls_left(out.module) == 0
    assert_exact(model, out, x)


# --------------------------------------------------------------------------- sharing


class SharedConv(nn.Module):
    """One conv module called twice; a BN follows only the first call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x * 2)


def test_shared_module_gets_its_own_folded_copy():
    """The folded call site gets a copy; the other call keeps the original weights.

    torch.fx's fuse folds the BN into the shared module and silently breaks the other call.
    """
    model = randomize_all(SharedConv())
    before = state_fingerprint(model)
    x = torch.randn(2, 4, 5, 5)
    out = fold(model, x)
    assert only(out).into == "conv"
    targets = [n.target for n in out.module.graph.nodes if n.op == "call_module"]
    assert sorted(targets) == ["conv", "conv_bnfold1"]
    assert_exact(model, out, x)
    after = state_fingerprint(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_original_can_be_let_go_before_folding():
    """Given the ids of the modules the graph shares, the caller may drop the model before
    folding; each layer folded away is then freed as soon as its folded copy is in, while
    a layer another call still uses stays (the pipeline folds this way, so that the old
    and the folded weights of a layer are not both held).  The garbage collector is off:
    no reference cycle may be what keeps a layer alive."""
    gc.disable()
    try:
        _let_go_before_folding()
    finally:
        gc.enable()


def _let_go_before_folding():
    model = randomize_all(SharedConv())
    x = torch.randn(2, 4, 5, 5)
    expected = float64_reference(model, x)
    gm = capture(model)
    propagate_shapes(gm, [x])
    protected = shared_modules(gm, model)
    assert protected == {id(model.conv), id(model.bn)}
    conv = weakref.ref(model.conv)
    del model
    out = fold_graph(gm, protected, shapes_known=True)
    assert only(out).into == "conv"
    assert conv() is out.module.conv  # still called unfolded by the second call
    assert out.module.conv_bnfold1 is not conv()
    with torch.no_grad():
        got = out.module(x).double()
    assert float((got - expected).abs().max() / expected.abs().max()) < 2e-6

    single = randomize_all(ConvBN())
    gm = capture(single)
    propagate_shapes(gm, [torch.randn(2, 3, 6, 6)])
    protected = shared_modules(gm, single)
    conv = weakref.ref(single.conv)
    del single
    fold_graph(gm, protected, shapes_known=True)
    assert conv() is None  # replaced by its folded copy and freed


def consume_fold(model: nn.Module, *inputs: torch.Tensor):
    """Fold as ``bnfold fuse`` does: the model handed over (only the ids of its modules
    protect them), each layer folded away freed as its folded copy goes in."""
    gm = capture(model)
    propagate_shapes(gm, inputs)
    return fold_graph(gm, shared_modules(gm, model), shapes_known=True)


class TiedConvs(nn.Module):
    """Two conv modules holding one weight tensor, each followed by its own BN."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.b.weight = self.a.weight
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_a(self.a(x)) + self.bn_b(self.b(x))


def test_consumed_model_keeps_shared_layers_and_tied_weights_intact():
    """Even when the model is handed over, a layer called twice and a weight two layers
    share are folded into new tensors: the other call and the other layer still compute
    what they computed."""
    for model, x in (
        (randomize_all(SharedConv()), torch.randn(2, 4, 5, 5)),
        (randomize_all(TiedConvs()), torch.randn(2, 4, 5, 5)),
    ):
        expected = float64_reference(model, x)
        before = state_fingerprint(model)
        out = consume_fold(model, x)
        assert all(d.folded for d in out.decisions)
        with torch.no_grad():
            got = out.module(x).double()
        assert float((got - expected).abs().max() / expected.abs().max()) < 2e-6
        after = state_fingerprint(model)
        assert all(torch.equal(before[k], after[k]) for k in before)


class LayerInsideAttention(nn.Module):
    """A Linear+BN where the Linear is also read inside another module's call: the
    attention's own ``out_proj``."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        a, _ = self.attn(x, x, x)
        return a.sum(1) + self.bn(self.attn.out_proj(x[:, 0]))


class WeightReadDirectly(nn.Module):
    """A Linear+BN whose weight the forward also reads by name (``get_attr``)."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.fc(x)) + F.linear(2 * x, self.fc.weight)


class NormedWeightReadDirectly(WeightReadDirectly):
    """The same with a weight computed by parametrizations (the new weight_norm): the
    graph calls ``fc.parametrizations.weight``, a path through the layer."""

    def __init__(self):
        super().__init__()
        torch.nn.utils.parametrizations.weight_norm(self.fc)


@pytest.mark.parametrize("consume", [False, True])
@pytest.mark.parametrize(
    "make, shape",
    [
        (LayerInsideAttention, (3, 5, 8)),
        (WeightReadDirectly, (3, 8)),
        (NormedWeightReadDirectly, (3, 8)),
    ],
)
def test_layer_read_elsewhere_folds_into_a_copy(make, shape, consume):
    """A layer the graph also reads other than by its call (inside another module's call,
    or its weight by name) is folded into a copy: what reads the old weights still gets
    them, in both routes (the second one was folded wrong before)."""
    model = randomize_all(make())
    x = torch.randn(*shape)
    expected = float64_reference(model, x)
    before = state_fingerprint(model)
    out = consume_fold(model, x) if consume else fold(model, x)
    assert only(out).folded
    with torch.no_grad():
        got = out.module(x).double()
    assert float((got - expected).abs().max() / expected.abs().max()) < 2e-6
    if not consume:
        after = state_fingerprint(model)
        assert all(torch.equal(before[k], after[k]) for k in before)


def _output_hook(model):
    model[0].register_forward_hook(lambda module, args, out: 3 * out)


def _bn_hook(model):
    model[1].register_forward_hook(lambda module, args, out: out.clamp(min=0))


def _old_weight_norm(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(model[0])  # a pre-hook computes conv.weight


@pytest.mark.parametrize("hook", [_output_hook, _bn_hook, _old_weight_norm])
def test_hooked_layer_or_bn_stays(hook):
    """Forward hooks on the layer or the BN run at its call: the BN stays (module_hooks)
    and the model computes what it did (an output hook was folded wrong before, the old
    weight_norm crashed)."""
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    hook(model)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    out = fold(model, x)
    assert only(out).reason is Reason.HOOKS
    with torch.no_grad():
        assert torch.equal(out.module(x), expected)


class _Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("consume", [False, True])
@pytest.mark.parametrize("how", ["weight_norm", "custom"])
def test_parametrized_layer_folds_into_a_plain_copy(how, consume):
    """A weight computed by parametrizations (the new weight_norm) folds with its value:
    the folded layer is the plain class holding the folded weight; the model's own layer
    keeps its parametrization (library route)."""
    from torch.nn.utils import parametrizations, parametrize

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    if how == "weight_norm":
        parametrizations.weight_norm(model[0])
    else:
        parametrize.register_parametrization(model[0], "weight", _Doubled())
    model = randomize_all(model)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x).double()
    out = consume_fold(model, x) if consume else fold(model, x)
    assert only(out).folded
    layer = out.module.get_submodule("0")
    assert type(layer) is nn.Conv2d and not parametrize.is_parametrized(layer)
    with torch.no_grad():
        got = out.module(x).double()
    assert float((got - expected).abs().max() / expected.abs().max()) < 2e-6
    if not consume:
        assert parametrize.is_parametrized(model[0], "weight")


def overflowing_half_model() -> nn.Module:
    """A float16 Conv+BN whose fold scale (1e3 / sqrt(1e-12)) overflows float16."""
    model = randomize_all(ConvBN())
    with torch.no_grad():
        model.bn.running_var.fill_(0.0)
        model.bn.eps = 1e-12
        model.bn.weight.fill_(1e3)
    return model.half()


def test_consumed_model_that_would_overflow_stays_untouched():
    """A fold declined for overflow (float16) has never written the consumed weights: the
    BN stays and the model computes what it did."""
    model = overflowing_half_model()
    x = torch.randn(2, 3, 6, 6).half()
    with torch.no_grad():
        expected = model(x)
    before = state_fingerprint(model)
    out = consume_fold(model, x)
    assert only(out).reason is Reason.OVERFLOW
    after = state_fingerprint(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(out.module(x), expected)


def test_negative_variance_stays_with_its_reason():
    """running_var + eps <= 0 would fold NaN into the weights: the BN stays
    (nonfinite_stats) and the detail says why, though every value is finite."""
    model = randomize_all(ConvBN())
    with torch.no_grad():
        model.bn.running_var[1] = -1.0
    d = only(fold(model, torch.randn(2, 3, 6, 6)))
    assert d.reason is Reason.NONFINITE_STATS and "running_var + eps" in d.detail


class ProducerUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(self.bn(y)) + y


def test_producer_output_used_elsewhere_stays():
    """A conv whose output also feeds a residual keeps its BN (producer_output_shared)."""
    model = randomize_all(ProducerUsedTwice())
    x = torch.randn(2, 3, 7, 7)
    out = fold(model, x)
    assert only(out).reason is Reason.PRODUCER_SHARED_OUTPUT
    assert bn_calls_left(out.module) == 1
    assert_exact(model, out, x)


class NonLinearBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(x)))


def test_nonlinearity_between_stays():
    """input -> BN -> ReLU -> conv: no exact fold either way (no_foldable_neighbour)."""
    model = randomize_all(NonLinearBetween())
    x = torch.randn(2, 3, 5, 5)
    out = fold(model, x)
    d = only(out)
    assert d.reason is Reason.NO_NEIGHBOUR
    assert "relu" in d.detail
    assert_exact(model, out, x)


def test_train_mode_and_no_running_stats_stay():
    """A BN in training mode, and one without running stats, stay with their reasons."""
    train = randomize_all(ConvBN())
    train.bn.train()
    assert only(fold(train, torch.randn(2, 3, 6, 6))).reason is Reason.TRAIN_MODE
    no_stats = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    assert only(fold(no_stats.eval(), torch.randn(2, 3, 6, 6))).reason is Reason.NO_RUNNING_STATS


def test_nonfinite_statistics_stay():
    """NaN in running_var: the BN stays (nonfinite_stats), nothing is folded into NaN."""
    model = randomize_all(ConvBN())
    with torch.no_grad():
        model.bn.running_var[0] = float("nan")
    assert only(fold(model, torch.randn(2, 3, 6, 6))).reason is Reason.NONFINITE_STATS


# --------------------------------------------------------------------------- BN kinds


def test_frozen_batchnorm_folds():
    """torchvision's FrozenBatchNorm2d folds like a BatchNorm2d."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = nn.Sequential(nn.Conv2d(3, 5, 3), FrozenBatchNorm2d(5))
    randomize_bn(model[1])
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    out = fold(model, x)
    assert (only(out).kind, only(out).into) == ("FrozenBatchNorm2d", "0")
    assert_exact(model, out, x)


def test_sync_batchnorm_and_affine_false_fold():
    """SyncBatchNorm (eval) and affine=False BNs fold."""
    model = randomize_all(
        nn.Sequential(
            nn.Conv2d(3, 5, 3),
            nn.SyncBatchNorm(5),
            nn.Conv2d(5, 5, 1),
            nn.BatchNorm2d(5, affine=False),
        )
    )
    x = torch.randn(2, 3, 6, 6)
    out = fold(model, x)
    assert [d.into for d in out.decisions] == ["0", "2"]
    assert_exact(model, out, x)


class PlainSubclassBN(nn.BatchNorm2d):
    pass


class ScaledBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


class ActBN(nn.BatchNorm2d):
    """timm BatchNormAct2d-like: functional batch_norm then an activation."""

    def forward(self, x):
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps
        )
        return torch.relu(x)


def test_custom_bn_that_cannot_be_traced_stays():
    """A BN subclass whose forward cannot be traced through stays whole (custom_forward)."""
    model = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), ScaledBN(4)))
    x = torch.randn(2, 3, 6, 6)
    out = fold(model, x)
    assert only(out).reason is Reason.CUSTOM_FORWARD
    assert_exact(model, out, x)


def test_bn_subclasses():
    """A plain subclass folds as a module; one with its own forward is traced through and
    its functional batch_norm folds; the rest of its forward (the ReLU) is kept."""
    for bn_cls in (PlainSubclassBN, ActBN):
        model = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), bn_cls(4)))
        x = torch.randn(2, 3, 6, 6)
        out = fold(model, x)
        assert only(out).into == "0", bn_cls
        assert bn_calls_left(out.module) == 0
        assert_exact(model, out, x)


class FunctionalBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.mean, self.var, training=False, eps=1e-3)


def test_functional_batch_norm_on_buffers_folds():
    """F.batch_norm on constant buffers is a BN site and folds."""
    model = FunctionalBN().eval()
    x = torch.randn(2, 3, 6, 6)
    out = fold(model, x)
    assert only(out).kind == "functional batch_norm"
    assert only(out).into == "conv"
    assert bn_calls_left(out.module) == 0
    assert_exact(model, out, x)


class PaddedConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1), value=3.0))


def test_conv_subclasses():
    """A Conv2d subclass folds; one that overrides forward is not trusted (custom_layer)."""

    class MyConv(nn.Conv2d):
        pass

    model = randomize_all(nn.Sequential(MyConv(3, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 6, 6)
    assert only(fold(model, x)).into == "0"
    custom = randomize_all(nn.Sequential(PaddedConv(3, 4, 3), nn.BatchNorm2d(4)))
    out = fold(custom, x)
    assert only(out).reason is Reason.CUSTOM_LAYER
    assert_exact(custom, out, x)


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_fold_in_float64_then_cast(dtype):
    """float16/bfloat16: folded weights keep the dtype and match a float64 reference."""
    model = randomize_all(ConvBN()).to(dtype)
    x = torch.randn(2, 3, 6, 6).to(dtype)
    out = fold(model, x)
    assert only(out).into == "conv"
    assert out.module.conv.weight.dtype == dtype
    ref = float64_reference(model, x)
    with torch.no_grad():
        got = out.module(x).double()
    assert float((got - ref).abs().max() / ref.abs().max()) < 3e-2


def test_overflowing_fold_stays():
    """A fold whose weights overflow float16 stays, with reason overflow."""
    out = fold(overflowing_half_model(), torch.randn(2, 3, 6, 6).half())
    assert only(out).reason is Reason.OVERFLOW


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_input_model_is_never_modified(dtype):
    """Folding leaves every parameter and buffer of the input model as it was; also in
    float64, where widening the weights to float64 would not copy them."""
    model = randomize_all(
        nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)
        )
    ).to(dtype)
    before = state_fingerprint(model)
    modules_before = [type(m) for m in model.modules()]
    fold(model, torch.randn(2, 3, 6, 6, dtype=dtype))
    after = state_fingerprint(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.modules()] == modules_before
    assert isinstance(model[1], nn.BatchNorm2d)


def test_fold_result_is_independent_of_later_changes():
    """The folded module does not share tensors with the original's folded layers."""
    model = randomize_all(ConvBN())
    out = fold(model, torch.randn(2, 3, 6, 6))
    assert out.module.conv is not model.conv
    assert out.module.conv.weight.data_ptr() != model.conv.weight.data_ptr()
    copy.deepcopy(out.module)  # the folded graph module is a normal, copyable module

"""``bnfold.stats``: statistics, diagnostics, state_dict grouping, fold plans and the summary.

Every expected number is worked out by hand from values exactly representable in
float32, so the checks are exact up to float64 rounding.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bnfold.loading import LoadedModel, ModelFormat
from bnfold.reports import BNLayerReport, InspectReport, Spread
from bnfold.stats import CODES, BNRecord, Thresholds, inspect_model, layer_report
from tests import corrupt
from tests.models import randomize_all

PATH = Path("model.pt")


def make_bn(
    mean,
    var,
    gamma=None,
    beta=None,
    *,
    nbt=10,
    eps=1e-5,
    momentum=0.1,
    cls=nn.BatchNorm2d,
    **kwargs,
) -> nn.Module:
    """A BN layer in eval mode holding exactly these statistics."""
    c = len(mean)
    bn = cls(c, eps=eps, momentum=momentum, **kwargs)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor(mean))
        bn.running_var.copy_(torch.tensor(var))
        if bn.weight is not None:
            bn.weight.copy_(torch.tensor(gamma if gamma is not None else [1.0] * c))
            bn.bias.copy_(torch.tensor(beta if beta is not None else [0.0] * c))
        bn.num_batches_tracked.fill_(nbt)
    return bn.eval()


class Wrap(nn.Module):
    """A lone BN called on the input (so only its statistics matter)."""

    def __init__(self, bn: nn.Module):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        return self.bn(x)


def inspect_module(model: nn.Module, thresholds: Thresholds | None = None) -> InspectReport:
    loaded = LoadedModel(
        PATH, ModelFormat.PICKLED_MODULE, state_dict=dict(model.state_dict()), module=model
    )
    return inspect_model(loaded, thresholds)


def inspect_state_dict(
    sd: dict[str, torch.Tensor], thresholds: Thresholds | None = None
) -> InspectReport:
    return inspect_model(LoadedModel(PATH, ModelFormat.STATE_DICT, state_dict=sd), thresholds)


def only_layer(report: InspectReport) -> BNLayerReport:
    (layer,) = report.layers
    return layer


HEALTHY = {
    "mean": [0.5, -1.0, 2.0, 0.0, 3.0],
    "var": [1.0, 0.25, 4.0, 2.0, 0.5],
    "gamma": [1.0, 0.5, -2.0, 1.5, 0.75],
    "beta": [0.125, -0.5, 0.0, 1.0, 0.25],
}


# --------------------------------------------------------------------------- statistics


def test_spreads_and_fold_scale_by_hand():
    """min/median/max of every vector and of gamma/sqrt(var+eps) equal the hand computation."""
    eps = 1e-3
    layer = only_layer(inspect_module(Wrap(make_bn(**HEALTHY, eps=eps, momentum=0.25))))
    assert layer.running_mean == Spread(-1.0, 0.5, 3.0)
    assert layer.running_var == Spread(0.25, 1.0, 4.0)
    assert layer.gamma == Spread(-2.0, 0.75, 1.5)
    assert layer.beta == Spread(-0.5, 0.125, 1.0)
    # scales: 1/sqrt(1.001)=0.9995, 0.5/sqrt(0.251)=0.9980, -2/sqrt(4.001)=-0.9999,
    #         1.5/sqrt(2.001)=1.0604, 0.75/sqrt(0.501)=1.0596
    assert layer.fold_scale.min == pytest.approx(-2.0 / math.sqrt(4.0 + eps), rel=1e-12)
    assert layer.fold_scale.median == pytest.approx(1.0 / math.sqrt(1.0 + eps), rel=1e-12)
    assert layer.fold_scale.max == pytest.approx(1.5 / math.sqrt(2.0 + eps), rel=1e-12)
    assert layer.eps == eps and layer.eps_known
    assert layer.momentum == 0.25
    assert layer.channels == 5
    assert layer.kind == "BatchNorm2d"
    assert layer.affine is True and layer.track_running_stats is True
    assert layer.num_batches_tracked == 10
    assert layer.training is False


def test_even_channel_median_is_the_mean_of_the_middle_two():
    """With an even channel count the median is the average of the two middle values."""
    bn = make_bn([0.0, 1.0, 3.0, 10.0], [1.0, 2.0, 4.0, 8.0])
    layer = only_layer(inspect_module(Wrap(bn)))
    assert layer.running_mean == Spread(0.0, 2.0, 10.0)
    assert layer.running_var == Spread(1.0, 3.0, 8.0)


def test_non_affine_fold_scale_is_inverse_std():
    """Without gamma the fold scale is 1/sqrt(var+eps) and gamma/beta spreads are None."""
    bn = make_bn([0.0, 1.0], [3.0, 0.0], affine=False, eps=1.0)
    layer = only_layer(inspect_module(Wrap(bn)))
    assert layer.gamma is None and layer.beta is None
    assert layer.affine is False
    assert layer.fold_scale.min == pytest.approx(0.5, rel=1e-12)  # 1/sqrt(3+1)
    assert layer.fold_scale.max == pytest.approx(1.0, rel=1e-12)  # 1/sqrt(0+1)
    assert layer.warnings == ()


def test_state_dict_stats_assume_default_eps():
    """From a bare state_dict eps is unknown: 1e-5 is assumed and flagged, momentum is None."""
    sd = make_bn(**HEALTHY, eps=0.5).state_dict()  # the 0.5 is lost in a state_dict
    layer = only_layer(inspect_state_dict({"bn." + k: v for k, v in sd.items()}))
    assert layer.eps == 1e-5 and layer.eps_known is False
    assert layer.momentum is None
    assert layer.fold_scale.max == pytest.approx(1.5 / math.sqrt(2.0 + 1e-5), rel=1e-12)
    assert layer.running_mean == Spread(-1.0, 0.5, 3.0)


# --------------------------------------------------------------------------- diagnostics


def test_healthy_layer_has_no_diagnostics():
    """A healthy layer in eval mode triggers none of the diagnostic codes."""
    layer = only_layer(inspect_module(Wrap(make_bn(**HEALTHY))))
    assert layer.warnings == ()
    assert layer.diagnostics == ()


def test_healthy_layer_from_state_dict_has_no_diagnostics():
    """The same healthy layer read from a state_dict triggers nothing either."""
    sd = make_bn(**HEALTHY).state_dict()
    layer = only_layer(inspect_state_dict({"bn." + k: v for k, v in sd.items()}))
    assert layer.warnings == ()


def _train(bn: nn.Module) -> nn.Module:
    return bn.train()


TRIGGERS = {
    # code: (layer, the message must contain, other codes allowed to fire with it)
    "stale_stats/never_tracked": (
        lambda: make_bn([0.5, -1.0], [1.0, 2.0], nbt=0),
        "num_batches_tracked is 0",
        set(),
    ),
    "stale_stats/initial_values": (
        lambda: make_bn([0.0, 0.0], [1.0, 1.0], nbt=5),
        "running_mean is all 0",
        set(),
    ),
    "dead_channels": (
        lambda: make_bn([0.5, -1.0, 0.0], [1.0, 2.0, 1.0], [1.0, 0.0005, -0.0009]),
        "2 of 3 channels have |gamma| < 0.001",
        set(),
    ),
    "tiny_variance": (
        lambda: make_bn([0.5, -1.0], [5e-5, 5e-5], nbt=3),
        "2 channels have running_var+eps",
        set(),
    ),
    "large_scale_spread": (
        lambda: make_bn([0.5, -1.0], [1.0, 1.0], [1.0, 200.0]),
        "fold scales span 200x",
        set(),
    ),
    "nonfinite/nan_mean": (
        lambda: make_bn([0.5, float("nan")], [1.0, 1.0]),
        "1 NaN/Inf values",
        set(),
    ),
    "nonfinite/inf_var": (
        lambda: make_bn([0.5, 1.0], [1.0, float("inf")]),
        "1 NaN/Inf values",
        set(),
    ),
    "nonfinite/nan_gamma": (
        lambda: make_bn([0.5, 1.0], [1.0, 2.0], [float("nan"), float("nan")]),
        "2 NaN/Inf values",
        set(),
    ),
    "negative_variance": (
        lambda: make_bn([0.5, 1.0], [1.0, -0.5]),
        "1 channels have running_var < 0",
        {"tiny_variance"},
    ),
    "train_mode": (lambda: _train(make_bn([0.5, -1.0], [1.0, 2.0])), "training mode", set()),
    "no_running_stats": (
        lambda: nn.BatchNorm2d(2, track_running_stats=False).eval(),
        "no running statistics",
        set(),
    ),
}


@pytest.mark.parametrize("case", sorted(TRIGGERS))
def test_each_diagnostic_fires_on_its_layer(case):
    """A layer built to trigger one code triggers it, with a counted message, and nothing else."""
    build, needle, allowed = TRIGGERS[case]
    code = case.split("/")[0]
    layer = only_layer(inspect_module(Wrap(build())))
    assert code in layer.warnings
    assert set(layer.warnings) - {code} <= allowed
    assert len(layer.warnings) == len(set(layer.warnings))  # each code at most once
    message = next(d.message for d in layer.diagnostics if d.code == code)
    assert needle in message
    assert layer.warnings == tuple(d.code for d in layer.diagnostics)


def test_codes_cover_every_trigger():
    """The trigger table above exercises every code bnfold documents."""
    assert {case.split("/")[0] for case in TRIGGERS} == set(CODES)


def test_stale_stats_from_state_dict_without_counter():
    """FrozenBatchNorm-style keys (no num_batches_tracked) at 0/1: the second stale variant."""
    sd = {
        "bn.weight": torch.ones(3),
        "bn.bias": torch.zeros(3),
        "bn.running_mean": torch.zeros(3),
        "bn.running_var": torch.ones(3),
    }
    layer = only_layer(inspect_state_dict(sd))
    assert layer.warnings == ("stale_stats",)
    assert "running_mean is all 0" in layer.diagnostics[0].message


def test_dead_channels_do_not_count_towards_scale_spread():
    """A dead channel's tiny fold scale is left out of the spread (it is reported as dead)."""
    layer = only_layer(inspect_module(Wrap(make_bn([0.0, 1.0], [1.0, 1.0], [1.0, 1e-6]))))
    assert layer.warnings == ("dead_channels",)


def test_thresholds_override_makes_codes_fire():
    """Raising thresholds makes the healthy layer dead, tiny-variance and widely spread."""
    th = Thresholds().with_overrides(
        {"dead_gamma": 0.6, "tiny_variance": 0.3, "scale_spread": 1.05}
    )
    layer = only_layer(inspect_module(Wrap(make_bn(**HEALTHY)), th))
    assert set(layer.warnings) == {"dead_channels", "tiny_variance", "large_scale_spread"}
    messages = {d.code: d.message for d in layer.diagnostics}
    assert messages["dead_channels"].startswith("1 of 5 channels have |gamma| < 0.6")
    assert messages["tiny_variance"].startswith("1 channels have running_var+eps < 0.3")
    # live scales: |gamma|/sqrt(var+eps) for gamma 1, -2, 1.5, 0.75 (0.5 is dead now)
    pairs = zip(HEALTHY["gamma"], HEALTHY["var"], strict=True)
    live = [abs(g) / math.sqrt(v + 1e-5) for g, v in pairs if abs(g) >= 0.6]
    assert f"span {max(live) / min(live):.3g}x" in messages["large_scale_spread"]


def test_thresholds_defaults_and_override_leave_original():
    """with_overrides returns a new Thresholds; the defaults are the documented ones."""
    base = Thresholds()
    new = base.with_overrides({"scale_spread": 2})
    assert (base.dead_gamma, base.tiny_variance, base.scale_spread) == (1e-3, 1e-4, 100.0)
    assert new.scale_spread == 2 and new.dead_gamma == 1e-3
    assert base.scale_spread == 100.0


def test_unknown_threshold_is_rejected():
    """An unknown threshold name is a ValueError that names it and lists the known ones."""
    with pytest.raises(ValueError) as info:
        Thresholds().with_overrides({"scale_sprad": 2.0, "dead_gamma": 0.1})
    assert str(info.value) == (
        "unknown threshold scale_sprad; known: dead_gamma, drift_mean, drift_var, scale_spread, "
        "tiny_variance"
    )


def test_thresholds_recorded_in_report():
    """The report carries the thresholds it was computed with."""
    th = Thresholds().with_overrides({"scale_spread": 7.0})
    report = inspect_module(Wrap(make_bn(**HEALTHY)), th)
    assert report.thresholds == {"dead_gamma": 1e-3, "tiny_variance": 1e-4, "scale_spread": 7.0}


def test_layer_report_from_hand_made_record():
    """layer_report on a BNRecord built by hand: spreads from the arrays, codes from diagnose."""
    rec = BNRecord(
        name="head.bn",
        kind="BatchNorm1d",
        channels=2,
        eps=0.0,
        momentum=None,
        affine=True,
        track_running_stats=True,
        num_batches_tracked=4,
        training=False,
        mean=np.array([1.0, 3.0]),
        var=np.array([4.0, 16.0]),
        gamma=np.array([2.0, 0.0]),
        beta=np.array([0.0, 1.0]),
        reason="no_foldable_neighbour",
        reason_detail="x",
    )
    layer = layer_report(rec, Thresholds())
    assert layer.fold_scale == Spread(0.0, 0.5, 1.0)  # 2/2 and 0/4
    assert layer.warnings == ("dead_channels",)
    assert (layer.reason, layer.reason_detail, layer.fold_into) == (
        "no_foldable_neighbour",
        "x",
        None,
    )


# --------------------------------------------------------------------------- state_dict grouping


def test_state_dict_grouping_finds_bn_by_running_buffers():
    """BNs are found by running_mean+running_var in file order; conv/linear keys are not BNs."""
    g = torch.Generator().manual_seed(0)
    sd = {
        "stem.conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "stem.conv.bias": torch.randn(4, generator=g),
        "stem.bn.weight": torch.ones(4),
        "stem.bn.bias": torch.zeros(4),
        "stem.bn.running_mean": torch.full((4,), 0.5),
        "stem.bn.running_var": torch.full((4,), 2.0),
        "stem.bn.num_batches_tracked": torch.tensor(9),
        "frozen.weight": torch.ones(6),
        "frozen.bias": torch.zeros(6),
        "frozen.running_mean": torch.full((6,), 0.25),
        "frozen.running_var": torch.full((6,), 4.0),
        "odd.running_mean": torch.zeros(5),  # no running_var: not a BN
        "head.weight": torch.randn(2, 6, generator=g),
        "head.bias": torch.zeros(2),
        "plain.running_mean": torch.full((3,), 1.0),
        "plain.running_var": torch.full((3,), 9.0),
    }
    report = inspect_state_dict(sd)
    assert [layer.name for layer in report.layers] == ["stem.bn", "frozen", "plain"]
    stem, frozen, plain = report.layers
    assert (stem.kind, stem.channels, stem.num_batches_tracked) == ("BatchNorm", 4, 9)
    assert (frozen.kind, frozen.channels, frozen.num_batches_tracked) == (
        "BatchNorm (no num_batches_tracked)",
        6,
        None,
    )
    assert frozen.running_var == Spread(4.0, 4.0, 4.0)
    assert (plain.affine, plain.gamma, plain.channels) == (False, None, 3)
    assert plain.fold_scale.min == pytest.approx(1 / math.sqrt(9.0 + 1e-5), rel=1e-12)
    for layer in report.layers:
        assert layer.reason == "architecture_unknown"
        assert layer.fold_into is None
    assert report.order == "file"
    assert report.architecture_known is False
    assert report.summary.foldable is None
    assert report.summary.bn_layers == 3
    assert report.summary.params_removed == 0 and report.summary.buffers_removed == 0
    assert any("eps and momentum are not stored" in note for note in report.notes)


def test_state_dict_root_level_bn():
    """A state_dict of a lone BN (keys without a prefix) is one layer named '<root>'."""
    sd = make_bn(**HEALTHY).state_dict()
    layer = only_layer(inspect_state_dict(dict(sd)))
    assert layer.name == "<root>"
    assert layer.channels == 5


# --------------------------------------------------------------------------- modules


class Order(nn.Module):
    """Registration order (bn_late first) differs from data-flow order (bn_early first)."""

    def __init__(self):
        super().__init__()
        self.bn_late = nn.BatchNorm2d(6)
        self.conv_a = nn.Conv2d(3, 8, 3, bias=False)
        self.bn_early = nn.BatchNorm2d(8)
        self.conv_b = nn.Conv2d(8, 6, 3)

    def forward(self, x):
        return self.bn_late(self.conv_b(torch.relu(self.bn_early(self.conv_a(x)))))


class ReluShared(nn.Module):
    """The BN follows a ReLU whose output also feeds an add: nothing to fold into."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.bn(y) + y


class ConvShared(nn.Module):
    """The conv's output feeds the BN and an add: folding would change the add's input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class OutputShared(nn.Module):
    """The BN reads the input and feeds two convs."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.c1 = nn.Conv2d(3, 4, 1)
        self.c2 = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.bn(x)
        return self.c1(y) + self.c2(y)


class Unused(nn.Module):
    """A registered BN the forward never calls."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.spare = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_module_layers_in_data_flow_order_with_fold_targets():
    """With an architecture, layers come in data-flow order, each with its fold target."""
    report = inspect_module(randomize_all(Order()))
    assert report.order == "data-flow"
    assert report.architecture_known is True
    assert [
        (layer.name, layer.fold_into, layer.fold_direction, layer.reason) for layer in report.layers
    ] == [
        ("bn_early", "conv_a", "backward", None),
        ("bn_late", "conv_b", "backward", None),
    ]
    assert report.format == "pickled_module"
    assert report.model == str(PATH)


@pytest.mark.parametrize(
    ("model", "reason", "detail"),
    [
        (ReluShared, "no_foldable_neighbour", "input comes from relu"),
        (ConvShared, "producer_output_shared", "conv's output also feeds add"),
        (OutputShared, "bn_output_shared", "bn feeds c1, c2"),
    ],
)
def test_bn_that_cannot_fold_has_a_reason(model, reason, detail):
    """A BN with no exact fold stays, with the reason code and a detail naming the blocker."""
    layer = only_layer(inspect_module(randomize_all(model())))
    assert layer.fold_into is None and layer.fold_direction is None
    assert layer.reason == reason
    assert detail in layer.reason_detail


def test_bn_never_called_is_reported():
    """A BN module the forward never calls stays with reason not_called, after the others."""
    report = inspect_module(randomize_all(Unused()))
    assert [(layer.name, layer.fold_into, layer.reason) for layer in report.layers] == [
        ("bn", "conv", None),
        ("spare", None, "not_called"),
    ]


def test_train_mode_bn_does_not_fold():
    """A BN in training mode gets the train_mode diagnostic and the train_mode reason."""
    model = randomize_all(Order())
    model.bn_early.train()
    report = inspect_module(model)
    early, late = report.layers
    assert (early.name, early.fold_into, early.reason, early.warnings) == (
        "bn_early",
        None,
        "train_mode",
        ("train_mode",),
    )
    assert (late.name, late.fold_into) == ("bn_late", "conv_b")
    assert report.summary.foldable == 1
    assert report.summary.warnings_by_code == {"train_mode": 1}


def test_no_running_stats_bn_does_not_fold():
    """track_running_stats=False: diagnostic and reason no_running_stats, no statistics."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    layer = only_layer(inspect_module(model))
    assert layer.name == "1"
    assert layer.reason == "no_running_stats"
    assert layer.warnings == ("no_running_stats",)
    assert layer.running_mean is None and layer.running_var is None and layer.fold_scale is None


def test_frozen_batchnorm_module_folds():
    """torchvision's FrozenBatchNorm2d (no num_batches_tracked) is found and folds."""
    from torchvision.ops import FrozenBatchNorm2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), FrozenBatchNorm2d(4))
    with torch.no_grad():
        model[1].running_var.copy_(torch.tensor([1.0, 2.0, 4.0, 0.5]))
        model[1].running_mean.copy_(torch.tensor([0.5, 0.0, -1.0, 2.0]))
    model.eval()
    report = inspect_module(model)
    layer = only_layer(report)
    assert (layer.name, layer.kind, layer.fold_into, layer.num_batches_tracked) == (
        "1",
        "FrozenBatchNorm2d",
        "0",
        None,
    )
    assert layer.running_var == Spread(0.5, 1.5, 4.0)
    assert report.summary.bias_params_added == 4  # the bias-less conv gains one


# --------------------------------------------------------------------------- summary


def test_summary_counts_params_buffers_and_biases():
    """Per folded BN: 2C params, 2C+1 buffer values removed; a bias-less conv gains C biases."""
    model = randomize_all(Order())  # bn_early C=8 into bias-less conv_a, bn_late C=6 into conv_b
    s = inspect_module(model).summary
    assert s.bn_layers == 2
    assert s.foldable == 2
    assert s.params_removed == 2 * 8 + 2 * 6
    assert s.buffers_removed == (2 * 8 + 1) + (2 * 6 + 1)
    assert s.bias_params_added == 8
    assert s.warnings_by_code == {}


def test_summary_non_affine_bn_removes_only_buffers():
    """A folded non-affine BN removes no parameters but still its 2C+1 buffer values."""
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, affine=False))
    s = inspect_module(randomize_all(model)).summary
    assert (s.foldable, s.params_removed, s.buffers_removed, s.bias_params_added) == (1, 0, 11, 0)


def test_summary_warnings_by_code_in_code_order():
    """warnings_by_code counts layers per code, in the documented code order."""

    class Three(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = make_bn([0.5, 1.0], [1.0, 2.0], [1.0, 0.0])  # dead
            self.b = make_bn([0.5, 1.0], [1.0, 2.0], [0.0, 1.0], nbt=0)  # dead + stale
            self.c = _train(make_bn([0.5, 1.0], [1.0, 2.0]))  # train mode

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    report = inspect_module(Three())
    assert report.summary.warnings_by_code == {
        "stale_stats": 1,
        "dead_channels": 2,
        "train_mode": 1,
    }
    assert list(report.summary.warnings_by_code) == ["stale_stats", "dead_channels", "train_mode"]
    assert report.summary.foldable == 0


# --------------------------------------------------------------------------- ONNX


def test_onnx_records_read_attributes_and_fold_target():
    """An ONNX Conv -> BatchNormalization: epsilon from the node, folds into the Conv."""
    loaded = LoadedModel(PATH, ModelFormat.ONNX, onnx_model=corrupt.onnx_conv_bn())
    report = inspect_model(loaded)
    layer = only_layer(report)
    assert (layer.name, layer.kind, layer.channels) == ("bn", "ONNX BatchNormalization", 4)
    assert layer.eps == pytest.approx(1e-3, rel=1e-6)  # stored as float32
    assert layer.momentum == pytest.approx(0.9)  # the ONNX default
    assert (layer.fold_into, layer.fold_direction, layer.reason) == ("conv", "backward", None)
    assert layer.running_mean == Spread(0.0, 1.5, 3.0)
    eps32 = float(np.float32(1e-3))
    assert layer.fold_scale.max == pytest.approx(2.0 / math.sqrt(4.0 + eps32), rel=1e-12)
    assert report.order == "data-flow"
    assert report.summary.foldable == 1
    assert (report.summary.params_removed, report.summary.buffers_removed) == (8, 8)


def test_onnx_bn_on_graph_input_does_not_fold():
    """An ONNX BN reading the graph input has no producer: no_foldable_neighbour."""
    model = corrupt.onnx_conv_bn()
    bn = model.graph.node[1]
    bn.input[0] = "x"
    del model.graph.node[0]
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "w"))
    layer = only_layer(inspect_model(LoadedModel(PATH, ModelFormat.ONNX, onnx_model=model)))
    assert layer.fold_into is None
    assert layer.reason == "no_foldable_neighbour"
    assert "input comes from a graph input" in layer.reason_detail

"""Property tests of the whole fold pass on random models (capture, shapes, rules, maths).

For random layer configurations folding keeps the output within float32 precision of a
float64 reference, and a BN that must not fold is reported with its reason and left
alone. ``BNFOLD_HYPOTHESIS=long`` runs ten times more examples.
"""

from __future__ import annotations

import torch
from hypothesis import given, note
from hypothesis import strategies as st
from torch import nn

from bnfold.fold_torch import fold_graph
from bnfold.graph import capture, is_bn_module, propagate_shapes
from tests.strategies import (
    MUST_STAY,
    BNConfig,
    ConvConfig,
    LinearConfig,
    bn_configs,
    conv_configs,
    conv_from_config,
    linear_configs,
)


def set_bn(bn: nn.Module, cfg: BNConfig) -> nn.Module:
    gen = torch.Generator().manual_seed(cfg.seed)
    c = bn.running_mean.shape[0]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(cfg.var_scale * (0.1 + torch.rand(c, generator=gen)))
        if bn.affine:
            bn.weight.copy_(torch.randn(c, generator=gen))
            bn.bias.copy_(torch.randn(c, generator=gen))
    return bn.eval()


def bn_for(dims: int, c: int, cfg: BNConfig) -> nn.Module:
    cls = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    return set_bn(cls(c, eps=cfg.eps, affine=cfg.affine), cfg)


def bn_left(gm) -> int:
    return sum(
        1
        for n in gm.graph.nodes
        if n.op == "call_module" and is_bn_module(gm.get_submodule(n.target))
    )


def fold_and_compare(model: nn.Module, x: torch.Tensor):
    """Fold; return the outcome and the error relative to a float64 reference."""
    import copy

    gm = capture(model)
    propagate_shapes(gm, [x])
    outcome = fold_graph(gm, model, shapes_known=True)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        got = outcome.module(x).double()
    scale = float(ref.abs().max())
    err = float((got - ref).abs().max())
    note(f"err={err:.3g} scale={scale:.3g} decisions={outcome.decisions}")
    return outcome, err / max(scale, 1e-30)


class ProducerBN(nn.Module):
    def __init__(self, layer: nn.Module, bn: nn.Module, tokens: int = 0):
        super().__init__()
        self.layer, self.bn, self.tokens = layer, bn, tokens

    def forward(self, x):
        y = self.layer(x)
        if self.tokens:
            return self.bn(y.flatten(0, 1)).reshape_as(y)
        return self.bn(y)


@given(conv_configs(), bn_configs, st.integers(0, 999))
def test_random_conv_bn_folds_exactly(cfg: ConvConfig, bn_cfg: BNConfig, seed: int):
    """Any conv / conv-transpose + BN folds backward and matches float64 to fp32 precision."""
    torch.manual_seed(seed)
    model = ProducerBN(conv_from_config(cfg), bn_for(cfg.dims, cfg.c_out, bn_cfg)).eval()
    x = torch.randn(2, cfg.c_in, *([6] * cfg.dims))
    outcome, err = fold_and_compare(model, x)
    (d,) = outcome.decisions
    assert d.folded, d
    assert bn_left(outcome.module) == 0
    assert err < 2e-5


@given(linear_configs, bn_configs, st.integers(0, 999))
def test_random_linear_bn_folds_exactly(cfg: LinearConfig, bn_cfg: BNConfig, seed: int):
    """Linear + BN1d on 2-D or token inputs folds and matches float64."""
    torch.manual_seed(seed)
    bn = set_bn(nn.BatchNorm1d(cfg.c_out, eps=bn_cfg.eps, affine=bn_cfg.affine), bn_cfg)
    model = ProducerBN(nn.Linear(cfg.c_in, cfg.c_out, bias=cfg.bias), bn, cfg.tokens).eval()
    x = torch.randn(3, cfg.tokens, cfg.c_in) if cfg.tokens else torch.randn(3, cfg.c_in)
    outcome, err = fold_and_compare(model, x)
    (d,) = outcome.decisions
    assert d.folded, d
    assert err < 2e-5


class ForwardCase(nn.Module):
    def __init__(self, bn: nn.Module, conv: nn.Module):
        super().__init__()
        self.bn, self.conv = bn, conv

    def forward(self, x):
        return self.conv(self.bn(x))


@given(conv_configs(transpose=False), bn_configs, st.integers(0, 999))
def test_random_forward_fold_is_exact_or_declined(cfg: ConvConfig, bn_cfg: BNConfig, seed: int):
    """BN -> conv folds forward exactly unless the conv zero-pads, which is declined."""
    torch.manual_seed(seed)
    model = ForwardCase(bn_for(cfg.dims, cfg.c_in, bn_cfg), conv_from_config(cfg)).eval()
    x = torch.randn(2, cfg.c_in, *([7] * cfg.dims))
    outcome, err = fold_and_compare(model, x)
    (d,) = outcome.decisions
    zero_padded = cfg.padding > 0 and cfg.padding_mode == "zeros"
    if zero_padded:
        assert d.reason is not None and d.reason.value == "zero_padding"
        assert bn_left(outcome.module) == 1
    else:
        assert d.folded, d
    assert err < 2e-5


class MustStay(nn.Module):
    def __init__(self, situation: str, c: int, bn_cfg: BNConfig):
        super().__init__()
        self.situation = situation
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = bn_for(2, c, bn_cfg)
        self.after = nn.Conv2d(c, c, 3, padding=1)
        if situation == "train_mode":
            self.bn.train()

    def forward(self, x):
        if self.situation == "second_consumer":
            y = self.conv(x)
            return torch.relu(self.bn(y)) + y
        if self.situation == "zero_padding":
            return self.after(self.bn(torch.relu(self.conv(x))))
        if self.situation == "nonlinearity":
            return self.after(torch.relu(self.bn(torch.relu(x))))
        return self.bn(self.conv(x))


@given(MUST_STAY, st.integers(1, 6), bn_configs)
def test_bn_that_must_not_fold_is_reported_and_left_alone(situation, c: int, bn_cfg: BNConfig):
    """Second consumer, zero padding, a non-linearity, training mode: reported, untouched."""
    name, code = situation
    model = MustStay(name, c, bn_cfg)
    model.conv.eval()
    model.after.eval()
    x = torch.randn(2, c, 5, 5)
    gm = capture(model)
    propagate_shapes(gm, [x])
    outcome = fold_graph(gm, model, shapes_known=True)
    (d,) = outcome.decisions
    assert not d.folded
    assert d.reason is not None and d.reason.value == code
    assert bn_left(outcome.module) == 1
    if name != "train_mode":  # eval: outputs must agree exactly (nothing was changed)
        with torch.no_grad():
            assert torch.equal(outcome.module(x), model(x))


class SharedTwice(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        return self.bn(self.conv(x)) + 0.5 * self.conv(x * 2)


@given(conv_configs(), bn_configs, st.integers(0, 999))
def test_shared_module_is_left_alone(cfg: ConvConfig, bn_cfg: BNConfig, seed: int):
    """A layer called twice: the BN's call site gets a folded copy; the shared module's own
    weights are untouched and its other call computes what it did."""
    torch.manual_seed(seed)
    conv = conv_from_config(cfg)
    model = SharedTwice(conv, bn_for(cfg.dims, cfg.c_out, bn_cfg)).eval()
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    x = torch.randn(2, cfg.c_in, *([6] * cfg.dims))
    outcome, err = fold_and_compare(model, x)
    assert outcome.decisions[0].folded
    assert all(torch.equal(before[k], v) for k, v in conv.state_dict().items())
    assert outcome.module.get_submodule("conv") is conv  # the unfolded call keeps the original
    assert err < 2e-5

"""The fold maths (bnfold/folding.py) against a float64 reference, for random layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from bnfold.folding import (
    FoldKind,
    bn_affine,
    cast,
    fold_backward,
    fold_forward,
    merge_parallel,
)
from tests.strategies import BNConfig, ConvConfig, bn_configs, conv_configs, conv_from_config


def make_conv(cfg: ConvConfig, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return conv_from_config(cfg).double()


def make_bn(channels: int, cfg: BNConfig) -> nn.Module:
    gen = torch.Generator().manual_seed(cfg.seed)
    bn = nn.BatchNorm1d(channels, eps=cfg.eps, affine=cfg.affine).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(
            cfg.var_scale * (0.1 + torch.rand(channels, generator=gen, dtype=torch.float64))
        )
        if cfg.affine:
            bn.weight.copy_(torch.randn(channels, generator=gen, dtype=torch.float64))
            bn.bias.copy_(torch.randn(channels, generator=gen, dtype=torch.float64))
    return bn


def apply_bn(bn: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """Eval BatchNorm along axis 1 of any-rank ``y``, the way BatchNorm1d/2d/3d do."""
    shape = [1, -1] + [1] * (y.dim() - 2)
    out = (y - bn.running_mean.reshape(shape)) / torch.sqrt(bn.running_var.reshape(shape) + bn.eps)
    if bn.affine:
        out = out * bn.weight.reshape(shape) + bn.bias.reshape(shape)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def input_for(cfg: ConvConfig, seed: int, length: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, cfg.c_in, *([length] * cfg.dims), generator=gen, dtype=torch.float64)


def with_weights(layer: nn.Module, w: torch.Tensor, b: torch.Tensor) -> nn.Module:
    layer.weight = nn.Parameter(w)
    layer.bias = nn.Parameter(b)
    return layer


@given(conv_configs(), bn_configs, st.integers(0, 1000))
def test_backward_fold_matches_float64_reference(cfg: ConvConfig, bn_cfg: BNConfig, seed: int):
    """conv/conv-transpose(any groups, stride, dilation, padding) then BN == folded layer."""
    conv = make_conv(cfg, seed)
    bn = make_bn(cfg.c_out, bn_cfg)
    x = input_for(cfg, seed)
    with torch.no_grad():
        expected = apply_bn(bn, conv(x))
        s, t = bn_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        kind = FoldKind.CONVT_OUT if cfg.transpose else FoldKind.CONV_OUT
        w, b, _ = fold_backward(conv.weight, conv.bias, s, t, kind, cfg.groups)
        got = with_weights(conv, w, b)(x)
    assert got.dtype == torch.float64
    assert rel_err(got, expected) < 1e-9


@given(conv_configs(transpose=False), bn_configs, st.integers(0, 1000))
def test_forward_fold_into_conv_matches_reference(cfg: ConvConfig, bn_cfg: BNConfig, seed: int):
    """BN then conv == conv with the BN folded into its input side, without zero padding."""
    conv = make_conv(cfg, seed)
    if cfg.padding_mode == "zeros":
        conv.padding = (0,) * cfg.dims  # zero padding makes a forward fold inexact
    bn = make_bn(cfg.c_in, bn_cfg)
    x = input_for(cfg, seed, length=9)
    with torch.no_grad():
        expected = conv(apply_bn(bn, x))
        s, t = bn_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        w, b, _ = fold_forward(conv.weight, conv.bias, s, t, FoldKind.CONV_IN, cfg.groups)
        got = with_weights(conv, w, b)(x)
    assert rel_err(got, expected) < 1e-9


@given(st.integers(1, 9), st.integers(1, 9), bn_configs, st.booleans(), st.integers(0, 999))
def test_linear_folds_both_directions(
    n_in: int, n_out: int, bn_cfg: BNConfig, bias: bool, seed: int
):
    """Linear then BN1d, and BN1d then Linear, fold exactly."""
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias).double()
    x = torch.randn(5, n_in, dtype=torch.float64)
    with torch.no_grad():
        bn = make_bn(n_out, bn_cfg)
        s, t = bn_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        w, b, _ = fold_backward(lin.weight, lin.bias, s, t, FoldKind.LINEAR_OUT)
        assert rel_err(x @ w.T + b, apply_bn(bn, lin(x))) < 1e-9
        bn_in = make_bn(n_in, bn_cfg)
        s, t = bn_affine(bn_in.running_mean, bn_in.running_var, bn_in.weight, bn_in.bias, bn_in.eps)
        w, b, _ = fold_forward(lin.weight, lin.bias, s, t, FoldKind.LINEAR_IN)
        assert rel_err(x @ w.T + b, lin(apply_bn(bn_in, x))) < 1e-9


def test_grouped_conv_transpose_scales_the_right_slices():
    """ConvTranspose groups=2: output channel j of group g is weight[g-th half, j].

    torch.nn.utils.fusion scales axis 1 as if groups were 1, which is wrong here;
    pin the exact slice arithmetic with hand-made numbers.
    """
    w = torch.ones(4, 3, 1, 1, dtype=torch.float64)  # C_in=4, C_out/groups=3, groups=2 -> C_out=6
    s = torch.arange(1.0, 7.0, dtype=torch.float64)
    new_w, _, _ = fold_backward(
        w, None, s, torch.zeros(6, dtype=torch.float64), FoldKind.CONVT_OUT, groups=2
    )
    assert new_w[:2, :, 0, 0].tolist() == [[1, 2, 3], [1, 2, 3]]
    assert new_w[2:, :, 0, 0].tolist() == [[4, 5, 6], [4, 5, 6]]


def test_affine_parts_are_the_eval_batchnorm():
    """bn_affine gives s = gamma/sqrt(var+eps), t = beta - mean*s, exactly, in float64."""
    s, t = bn_affine(
        torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([2.0]), torch.tensor([0.5]), eps=1.0
    )
    assert s.dtype == torch.float64
    assert s.item() == pytest.approx(1.0)
    assert t.item() == pytest.approx(-0.5)
    s, t = bn_affine(torch.tensor([2.0]), torch.tensor([0.0]), None, None, eps=0.25)
    assert (s.item(), t.item()) == (2.0, -4.0)


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cast_reports_overflow_only_when_it_happens(dtype):
    """cast() flags values that became Inf in the target dtype, not values already Inf."""
    big = torch.tensor([1e39, 1.0], dtype=torch.float64)
    out, overflow = cast(big, dtype)
    assert overflow is True
    assert out.dtype == dtype
    fine, overflow = cast(torch.tensor([1.0, float("inf")], dtype=torch.float64), dtype)
    assert overflow is False
    assert fine[0].item() == 1.0


def round_once(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 values rounded to the nearest ``dtype`` value.

    torch's float64 -> float16 conversion goes through float32 (two roundings, off by one
    unit in the last place for about 1 value in 10,000); numpy's is direct.
    """
    if dtype is torch.float16:
        return torch.from_numpy(exact.numpy().astype(np.float16))
    return exact.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", [FoldKind.CONV_OUT, FoldKind.CONVT_OUT])
@pytest.mark.parametrize("c_out", [8, 512])
def test_folded_weights_are_the_float64_product_rounded_once(dtype, kind, c_out):
    """Bit for bit: W' == round_to_dtype(float64(W) * s), whatever route computes it."""
    gen = torch.Generator().manual_seed(c_out)
    groups = 2
    shape = (
        (c_out, 256 // groups, 3, 3) if kind is FoldKind.CONV_OUT else (256, c_out // groups, 3, 3)
    )
    w = torch.randn(shape, generator=gen).to(dtype)
    original = w.clone()
    s = torch.rand(c_out, generator=gen, dtype=torch.float64) * 3 + 1e-3
    t = torch.randn(c_out, generator=gen, dtype=torch.float64)
    got, b, overflow = fold_backward(w, None, s, t, kind, groups, dtype)
    if kind is FoldKind.CONV_OUT:
        exact = w.double() * s.reshape(-1, 1, 1, 1)
    else:  # output channel g * C_out/g + j of ConvTranspose is weight[rows of group g, j]
        rows = w.double().reshape(groups, 256 // groups, c_out // groups, 9)
        exact = (rows * s.reshape(groups, 1, c_out // groups, 1)).reshape(shape)
    expected = round_once(exact, dtype)
    assert got.dtype == dtype and not overflow
    assert torch.equal(got, expected)
    assert torch.equal(b, t.to(dtype))
    assert torch.equal(w, original)  # a fold never writes its input


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [4, 4096])
def test_fold_flags_overflow_but_not_inputs_already_infinite(dtype, rows):
    big = torch.finfo(dtype).max
    w = torch.ones(rows, 128, dtype=dtype)
    s = torch.ones(rows, dtype=torch.float64)
    zero = torch.zeros(rows, dtype=torch.float64)
    w[rows - 1, 5] = big
    s[rows - 1] = 4.0
    assert fold_backward(w, None, s, zero, FoldKind.LINEAR_OUT, 1, dtype).overflow
    w[rows - 1, 5] = float("inf")
    folded = fold_backward(w, None, s, zero, FoldKind.LINEAR_OUT, 1, dtype)
    assert not folded.overflow and folded.weight[rows - 1, 5] == float("inf")


@st.composite
def branch_sets(draw):
    """Parallel conv branches (kernel 1/3/5, one groups, bias or not) and identity branches,
    with each branch's padding centring its kernel."""
    dims = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2]))
    depthwise = draw(st.booleans())
    c = 4
    c_in_g = 1 if depthwise else c // groups
    groups = c if depthwise else groups
    sizes = draw(st.lists(st.sampled_from([1, 3, 5]), min_size=1, max_size=3))
    identities = draw(st.integers(0, 2))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    kernels = [
        (
            torch.randn(c, c_in_g, *([k] * dims), generator=gen, dtype=torch.float64),
            torch.randn(c, generator=gen, dtype=torch.float64) if draw(st.booleans()) else None,
        )
        for k in sizes
    ]
    idents = [
        (
            torch.randn(c, generator=gen, dtype=torch.float64),
            torch.randn(c, generator=gen, dtype=torch.float64),
        )
        for _ in range(identities)
    ]
    return dims, groups, kernels, idents


@given(branch_sets())
def test_merged_branches_are_the_sum_of_the_branches(case):
    """merge_parallel: one conv equals the float64 sum of centred conv branches and
    per-channel identity branches (issue 18)."""
    dims, groups, kernels, idents = case
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d}[dims]
    x = torch.randn(
        2, 4, *([9] * dims), dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    expected = sum(conv(x, w, b, padding=w.shape[-1] // 2, groups=groups) for w, b in kernels)
    for s, t in idents:
        shape = [1, -1] + [1] * dims
        expected = expected + s.reshape(shape) * x + t.reshape(shape)
    merged = merge_parallel(kernels, idents, groups=groups)
    k = merged.weight.shape[-1]
    got = conv(x, merged.weight, merged.bias, padding=k // 2, groups=groups)
    assert not merged.overflow
    assert rel_err(got, expected) < 1e-12


def test_merge_refuses_what_cannot_centre():
    """merge_parallel raises on kernels that cannot share a centre or an identity without one."""
    w3, w2 = torch.randn(4, 4, 3, 3), torch.randn(4, 4, 2, 2)
    with pytest.raises(ValueError, match="centre"):
        merge_parallel([(w3, None), (w2, None)], [])
    with pytest.raises(ValueError, match="identity"):
        merge_parallel([(w2, None)], [(torch.ones(4), torch.zeros(4))])
    with pytest.raises(ValueError, match="identity"):
        merge_parallel([(torch.randn(8, 4, 3, 3), None)], [(torch.ones(8), torch.zeros(8))])

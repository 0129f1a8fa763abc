"""Hypothesis strategies for layer configurations and BatchNorm statistics (one place)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st


@dataclass(frozen=True)
class ConvConfig:
    dims: int
    transpose: bool
    groups: int
    c_in: int
    c_out: int
    kernel: int
    stride: int
    dilation: int
    padding: int
    padding_mode: str
    bias: bool
    output_padding: int


def conv_from_config(cfg: ConvConfig) -> Any:
    """The nn.ConvNd / nn.ConvTransposeNd a ConvConfig describes (float32, torch's init)."""
    from torch import nn

    common = {
        "stride": cfg.stride,
        "padding": cfg.padding,
        "groups": cfg.groups,
        "bias": cfg.bias,
        "dilation": cfg.dilation,
    }
    if cfg.transpose:
        cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[cfg.dims - 1]
        return cls(cfg.c_in, cfg.c_out, cfg.kernel, output_padding=cfg.output_padding, **common)
    cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[cfg.dims - 1]
    return cls(cfg.c_in, cfg.c_out, cfg.kernel, padding_mode=cfg.padding_mode, **common)


@st.composite
def conv_configs(draw: st.DrawFn, transpose: bool | None = None) -> ConvConfig:
    dims = draw(st.integers(1, 3))
    is_t = draw(st.booleans()) if transpose is None else transpose
    groups = draw(st.integers(1, 4))
    c_in = groups * draw(st.integers(1, 3))
    c_out = groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 2))
    modes = ["zeros"] if is_t else ["zeros", "reflect", "replicate", "circular"]
    padding_mode = draw(st.sampled_from(modes))
    output_padding = draw(st.integers(0, max(0, min(stride, dilation) - 1))) if is_t else 0
    return ConvConfig(
        dims,
        is_t,
        groups,
        c_in,
        c_out,
        kernel,
        stride,
        dilation,
        padding,
        padding_mode,
        draw(st.booleans()),
        output_padding,
    )


@dataclass(frozen=True)
class BNConfig:
    eps: float
    affine: bool
    var_scale: float  # variances drawn around this magnitude (tiny to huge)
    seed: int


bn_configs = st.builds(
    BNConfig,
    eps=st.sampled_from([1e-5, 1e-3, 1e-1, 1e-8]),
    affine=st.booleans(),
    var_scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e2, 1e4]),
    seed=st.integers(0, 2**16),
)


@dataclass(frozen=True)
class LinearConfig:
    c_in: int
    c_out: int
    bias: bool
    tokens: int  # 0: a 2-D (N, C) input; else (N, tokens, C) with a LeViT flatten around the BN


linear_configs = st.builds(
    LinearConfig,
    c_in=st.integers(1, 9),
    c_out=st.integers(1, 9),
    bias=st.booleans(),
    tokens=st.sampled_from([0, 0, 1, 3, 5]),
)

# situations in which a BN must stay, with the reason code bnfold must give
MUST_STAY = st.sampled_from(
    [
        ("second_consumer", "producer_output_shared"),
        ("zero_padding", "zero_padding"),
        ("nonlinearity", "no_foldable_neighbour"),
        ("train_mode", "train_mode"),
    ]
)


@dataclass(frozen=True)
class BranchSet:
    """Parallel branches summed (issue 18): conv branches, each with a BN, reading one
    tensor, and maybe a BN on the identity branch."""

    dims: int
    channels: int
    depthwise: bool
    kernels: tuple[int, ...]  # one conv branch per kernel size, padding dilation * (k // 2)
    biases: tuple[bool, ...]
    stride: int  # 1 whenever there is an identity branch
    dilation: int
    padding_mode: str
    identity: bool
    seed: int


@st.composite
def branch_sets(draw: st.DrawFn) -> BranchSet:
    identity = draw(st.booleans())
    convs = draw(st.integers(2 - identity, 3 - identity))
    kernels = tuple(draw(st.lists(st.sampled_from([1, 3, 5]), min_size=convs, max_size=convs)))
    return BranchSet(
        dims=draw(st.sampled_from([1, 2, 2, 3])),
        channels=draw(st.integers(1, 6)),
        depthwise=draw(st.booleans()),
        kernels=kernels,
        biases=tuple(draw(st.lists(st.booleans(), min_size=convs, max_size=convs))),
        stride=1 if identity else draw(st.integers(1, 2)),
        dilation=draw(st.sampled_from([1, 1, 2])),
        padding_mode=draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"])),
        identity=identity,
        seed=draw(st.integers(0, 2**16)),
    )

"""Tiny models the tests build, and helpers to give BatchNorm layers real statistics."""

from __future__ import annotations

import torch
from torch import nn


def randomize_bn(
    bn: nn.Module, seed: int = 0, var_range: tuple[float, float] = (0.25, 4.0), nbt: int = 7
) -> nn.Module:
    """Give a BN layer non-trivial statistics and affine parameters, deterministically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        c = bn.running_mean.shape[0]
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        lo, hi = var_range
        bn.running_var.copy_(lo + (hi - lo) * torch.rand(c, generator=gen))
        if getattr(bn, "weight", None) is not None:
            bn.weight.copy_(0.5 + torch.rand(c, generator=gen))
            bn.weight.mul_(torch.where(torch.rand(c, generator=gen) < 0.2, -1.0, 1.0))
            bn.bias.copy_(torch.randn(c, generator=gen))
        if getattr(bn, "num_batches_tracked", None) is not None:
            bn.num_batches_tracked.fill_(nbt)
    return bn


def randomize_all(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomize every BN-like layer of ``model`` and put it in eval mode."""
    for i, m in enumerate(model.modules()):
        if hasattr(m, "running_var") and m.running_var is not None:
            randomize_bn(m, seed + i)
    return model.eval()


class ConvBN(nn.Module):
    def __init__(self, c_in: int = 3, c_out: int = 8, dims: int = 2, **conv_kwargs):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
        self.conv = conv(c_in, c_out, 3, **conv_kwargs)
        self.bn = bn(c_out)

    def forward(self, x):
        return self.bn(self.conv(x))


class TokenLinearBN(nn.Module):
    """LeViT's Linear_BN: Linear on (B, N, C) tokens, BatchNorm1d over flattened tokens."""

    def __init__(self, c_in: int = 8, c_out: int = 12):
        super().__init__()
        self.linear = nn.Linear(c_in, c_out)
        self.bn = nn.BatchNorm1d(c_out)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


def float64_reference(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """The model's output computed in float64 on a copy (the model is untouched)."""
    import copy

    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        return ref(*(t.double() for t in inputs))


def state_fingerprint(model: nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of every parameter and buffer, to prove a model was not modified."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

"""Small sample architectures with BatchNorm in every position bnfold cares about.

Plain module code (only torch imports); every class is constructible with no
arguments and has a static forward, so ``torch.fx.symbolic_trace``,
``torch.jit.script`` and ``torch.export`` all work on it.

Use with bnfold as ``--arch sample_models/archs.py:ConvNet`` (or ``:MLP``,
``:TokenNet``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ARCHS", "INPUT_SHAPES", "MLP", "ConvNet", "LinearBN", "TokenNet"]


def _conv_bn_relu(
    cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, bias: bool = False
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=bias),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ConvNet(nn.Module):
    """(N, 3, 32, 32) -> (N, num_classes).

    stem conv(3->16, with bias)+BN+ReLU -> conv(16->32, stride 2)+BN+ReLU
    -> depthwise conv(32, groups=32)+BN+ReLU -> pointwise 1x1 conv(32->32)+BN+ReLU
    -> conv(32->32, stride 2)+BN+ReLU -> ConvTranspose2d(32->16, stride 2)+BN+ReLU
    -> global average pool -> Linear(16->num_classes).
    """

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w1, w2 = width, 2 * width
        self.stem = _conv_bn_relu(3, w1, bias=True)  # 32x32
        self.down1 = _conv_bn_relu(w1, w2, stride=2)  # 16x16
        self.dw = _conv_bn_relu(w2, w2, groups=w2)  # depthwise 3x3
        self.pw = _conv_bn_relu(w2, w2, kernel=1)  # pointwise 1x1
        self.down2 = _conv_bn_relu(w2, w2, stride=2)  # 8x8
        self.up = nn.Sequential(  # back to 16x16
            nn.ConvTranspose2d(w2, w1, kernel_size=2, stride=2, bias=False),
            nn.BatchNorm2d(w1),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w1, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.down1(x)
        x = self.dw(x)
        x = self.pw(x)
        x = self.down2(x)
        x = self.up(x)
        x = self.pool(x).flatten(1)
        return self.fc(x)


class MLP(nn.Module):
    """(N, in_features) -> (N, num_classes).

    Linear+BatchNorm1d+ReLU -> Linear+BatchNorm1d+ReLU -> Linear.
    """

    def __init__(self, in_features: int = 20, hidden: int = 64, num_classes: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.bn2 = nn.BatchNorm1d(hidden)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.fc1(x)))
        x = self.act2(self.bn2(self.fc2(x)))
        return self.head(x)


class LinearBN(nn.Module):
    """LeViT-style Linear followed by BatchNorm1d over the flattened tokens.

    (N, T, in_features) -> (N, T, out_features).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class TokenNet(nn.Module):
    """(N, 16, 8) tokens -> (N, num_classes).

    LinearBN(8->32) -> GELU -> LinearBN(32->32) -> GELU -> mean over tokens -> Linear.
    """

    def __init__(self, in_features: int = 8, dim: int = 32, num_classes: int = 4) -> None:
        super().__init__()
        self.block1 = LinearBN(in_features, dim)
        self.act1 = nn.GELU()
        self.block2 = LinearBN(dim, dim)
        self.act2 = nn.GELU()
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.block1(x))
        x = self.act2(self.block2(x))
        return self.head(x.mean(dim=1))


ARCHS: dict[str, type[nn.Module]] = {"convnet": ConvNet, "mlp": MLP, "tokennet": TokenNet}
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "convnet": (1, 3, 32, 32),
    "mlp": (1, 20),
    "tokennet": (1, 16, 8),
}

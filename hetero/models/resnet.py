"""CIFAR-style ResNets (He et al. 2016, sec. 4.2): three stages of basic blocks, depth = 6n + 2.

Used as cloud models. Width scales every stage (16/32/64 at width=16).
"""
from __future__ import annotations

import torch
from torch import nn

from hetero.errors import HeteroError
from hetero.models.registry import register_backbone


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, width: int = 16, in_channels: int = 1):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise HeteroError(f"ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
        n = (depth - 2) // 6
        widths = (width, 2 * width, 4 * width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        blocks: list[nn.Module] = []
        cin = width
        for stage, cout in enumerate(widths):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.blocks(self.stem(x))), 1)


@register_backbone("resnet")
def resnet(depth: int = 20, width: int = 16, in_channels: int = 1) -> CifarResNet:
    return CifarResNet(depth, width, in_channels)


def _named(depth: int):
    def factory(width: int = 16, in_channels: int = 1) -> CifarResNet:
        return CifarResNet(depth, width, in_channels)

    factory.__doc__ = f"CIFAR ResNet-{depth}."
    return factory


for _d in (8, 14, 20, 32, 44, 56):
    register_backbone(f"resnet{_d}")(_named(_d))


@register_backbone("test_resnet")
def test_resnet(width: int = 4, in_channels: int = 1) -> CifarResNet:
    """Tiny ResNet-8 for unit tests."""
    return CifarResNet(8, width, in_channels)

"""MobileNetV1-style edge networks (Howard et al. 2017): depthwise-separable conv stacks.

``width`` multiplies every channel count, ``depth`` multiplies the repeats of each stage.
The base layout is sized for 28-32 px inputs (one stride-1 stem, three stride-2 stages).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from hetero.errors import HeteroError
from hetero.models.registry import register_backbone

# (out_channels, repeats, stride) per stage
BASE_LAYOUT: tuple[tuple[int, int, int], ...] = ((32, 1, 1), (64, 2, 2), (128, 2, 2), (256, 2, 2))
STEM = 16


def _ch(c: float) -> int:
    return max(4, int(round(c / 4.0)) * 4)


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.dw = nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        )
        self.pw = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class MobileNet(nn.Module):
    def __init__(
        self,
        width: float = 1.0,
        depth: float = 1.0,
        in_channels: int = 1,
        layout: tuple[tuple[int, int, int], ...] = BASE_LAYOUT,
    ):
        super().__init__()
        if width <= 0 or depth <= 0:
            raise HeteroError(f"MobileNet width and depth multipliers must be > 0, got width={width} depth={depth}")
        stem = _ch(STEM * width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True)
        )
        blocks: list[nn.Module] = []
        cin = stem
        for cout, repeats, stride in layout:
            cout = _ch(cout * width)
            for i in range(max(1, math.ceil(repeats * depth))):
                blocks.append(DepthwiseSeparable(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.blocks(self.stem(x))), 1)


@register_backbone("mobilenet")
def mobilenet(width: float = 1.0, depth: float = 1.0, in_channels: int = 1) -> MobileNet:
    return MobileNet(width, depth, in_channels)


@register_backbone("mobilenet_w050")
def mobilenet_w050(in_channels: int = 1) -> MobileNet:
    """Half-width MobileNet: about a 20x FLOPs cut against ResNet-20 on 28 px."""
    return MobileNet(0.5, 1.0, in_channels)


@register_backbone("mobilenet_w025")
def mobilenet_w025(in_channels: int = 1) -> MobileNet:
    """Quarter-width, shallower MobileNet for the smallest devices."""
    return MobileNet(0.25, 0.5, in_channels)


@register_backbone("test_mobilenet")
def test_mobilenet(in_channels: int = 1) -> MobileNet:
    """Tiny MobileNet for unit tests."""
    return MobileNet(0.125, 0.5, in_channels)

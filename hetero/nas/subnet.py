"""The static network of one arch: what ``Supernet.extract`` fills and what a checkpoint rebuilds.

Registered as backbone ``nas_mbv3`` with JSON kwargs ``arch`` and ``space`` (their ``to_dict()``),
so an extracted subnet saves, loads, trains and exports like any other edge backbone. Plain layers
only (conv, batch norm, ReLU, sigmoid, global average pooling; in a MobileNetV3-style space also
hard-swish and hard-sigmoid), so every exporter handles it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hetero.errors import HeteroError
from hetero.models.registry import register_backbone
from hetero.nas.space import STEM_KERNEL, Arch, Block, SearchSpace, largest, smallest


def activation(name: str) -> nn.Module:
    """``relu`` or ``hswish`` (MobileNetV3's hard-swish) as a module."""
    return nn.Hardswish(inplace=True) if name == "hswish" else nn.ReLU(inplace=True)


class SqueezeExcite(nn.Module):
    """x * gate(W2 relu(W1 avgpool(x))) (Hu et al. 2018), reduction 4; the gate a sigmoid, or
    MobileNetV3's hard-sigmoid."""

    def __init__(self, channels: int, hidden: int, gate: str = "sigmoid"):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Hardsigmoid() if gate == "hsigmoid" else nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(torch.relu(self.fc1(self.pool(x)))))


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 block: 1x1 expand, depthwise kxk, optional SE, 1x1 project; residual when shapes allow."""

    def __init__(self, b: Block):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(b.cin, b.mid, 1, bias=False), nn.BatchNorm2d(b.mid), activation(b.act))
        self.dw = nn.Sequential(nn.Conv2d(b.mid, b.mid, b.kernel, b.stride, b.kernel // 2, groups=b.mid, bias=False),
                                nn.BatchNorm2d(b.mid), activation(b.act))
        self.se = SqueezeExcite(b.mid, b.hidden, b.gate) if b.se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(b.mid, b.cout, 1, bias=False), nn.BatchNorm2d(b.cout))
        self.residual = b.residual
        self.block = b  # the shapes it was built from: what the latency predictor keys it by

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class NasMobileNetV3(nn.Module):
    """A fixed subnet of the elastic MobileNetV3-style space; maps [N,C,H,W] to [N, out_features]."""

    def __init__(self, arch: Arch, space: SearchSpace):
        super().__init__()
        self.arch, self.space = arch, space
        stem = space.stem_channels(arch.width)
        self.stem = nn.Sequential(
            nn.Conv2d(space.in_channels, stem, STEM_KERNEL, space.stem_stride, STEM_KERNEL // 2, bias=False),
            nn.BatchNorm2d(stem), activation(space.stem_act))
        blocks: list[nn.Module] = [InvertedResidual(b) for b in arch.blocks(space)]
        if space.head:  # MobileNetV3's last 1x1 conv; a plain conv-BN-ReLU block, so the latency table knows it
            cin = space.stage_channels(arch.width)[-1]
            blocks.append(nn.Sequential(nn.Conv2d(cin, space.head, 1, bias=False), nn.BatchNorm2d(space.head),
                                        activation(space.head_act)))
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = arch.out_features(space)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.blocks(self.stem(x))), 1)


def resolve(arch: Any, space: Any, in_channels: int | None) -> tuple[Arch, SearchSpace]:
    """(Arch, SearchSpace) from backbone kwargs: dicts as written by ``to_dict()``; None means defaults."""
    if space is None:
        sp = SearchSpace(in_channels=in_channels or 1)
    else:
        sp = space if isinstance(space, SearchSpace) else SearchSpace.from_dict(space)
        if in_channels is not None and in_channels != sp.in_channels:
            raise HeteroError(f"the nas_mbv3 space takes {sp.in_channels}-channel input but the model is built for "
                              f"{in_channels}; search a supernet trained on this data's channels")
    a = largest(sp) if arch is None else Arch.from_dict(arch, sp)
    return a, sp


@register_backbone("nas_mbv3")
def nas_mbv3(arch: dict[str, Any] | None = None, space: dict[str, Any] | None = None,
             in_channels: int | None = None) -> NasMobileNetV3:
    """A subnet of the elastic MobileNetV3-style space (``arch`` None: the largest one)."""
    return NasMobileNetV3(*resolve(arch, space, in_channels))


@register_backbone("test_nas_mbv3")
def test_nas_mbv3(in_channels: int = 1) -> NasMobileNetV3:
    """The smallest subnet of the default space, for unit tests."""
    sp = SearchSpace(in_channels=in_channels)
    return NasMobileNetV3(smallest(sp), sp)

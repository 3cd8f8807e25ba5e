"""Backbones from the model libraries users already have, by prefix in the one backbone registry:
``tv:NAME`` is a torchvision classification model (``torchvision.models.get_model``) without its last
linear layer, so hetero's embedding head (projection -> L2 norm) goes on its pooled features. Any
channel count: the first convolution is rebuilt for ``in_channels`` when it is not the model's own.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hetero.errors import HeteroError, require

TORCHVISION = "tv:"
PREFIXES = (TORCHVISION,)


class LibraryBackbone(nn.Module):
    """A library model whose classifier's last linear layer is removed: [N, C, H, W] -> [N, out_features]."""

    def __init__(self, net: nn.Module, out_features: int):
        super().__init__()
        self.net, self.out_features = net, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.net(x), 1)


def _replace(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def headless(net: nn.Module, in_channels: int, name: str) -> LibraryBackbone:
    """``net`` without its last ``nn.Linear`` (the classifier), taking ``in_channels`` channels."""
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    convs = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    if not linears or not convs:
        raise HeteroError(f"{name} has no final linear classifier or no convolution to take images; "
                          "use another model, or bring it as a cloud with import-cloud")
    last_name, last = linears[-1]
    _replace(net, last_name, nn.Identity())
    first_name, first = convs[0]
    if first.in_channels != in_channels:  # e.g. grey images into an RGB model: a new first convolution
        _replace(net, first_name, nn.Conv2d(in_channels, first.out_channels, first.kernel_size, first.stride,
                                            first.padding, first.dilation, first.groups, first.bias is not None))
    return LibraryBackbone(net, last.in_features)


def torchvision_backbone(name: str, in_channels: int = 3, **kwargs: Any) -> LibraryBackbone:
    """torchvision's ``name`` (random weights), headless, for ``in_channels`` channels; ``kwargs`` go to
    ``torchvision.models.get_model`` (e.g. ``image_size`` of a ViT)."""
    tv = require("torchvision", "byo")
    if name not in tv.models.list_models(module=tv.models):
        raise HeteroError(f"torchvision has no classification model {name!r}; choose one of "
                          f"torchvision.models.list_models(), e.g. mobilenet_v3_small, efficientnet_b0, resnet50")
    return headless(tv.models.get_model(name, weights=None, **kwargs), in_channels, f"tv:{name}")


def library_backbone(name: str, **kwargs: Any) -> nn.Module:
    """The backbone a prefixed name (``tv:NAME``) stands for."""
    if name.startswith(TORCHVISION):
        return torchvision_backbone(name[len(TORCHVISION):], **kwargs)
    raise HeteroError(f"unknown backbone library in {name!r}; prefixes: {', '.join(PREFIXES)}")

"""Backbones from the model libraries users already have, by prefix in the one backbone registry:
``tv:NAME`` is a torchvision classification model (``torchvision.models.get_model``) without its last
linear layer, ``timm:NAME`` a timm model built headless (``num_classes=0``: its pooled features), so
hetero's embedding head (projection -> L2 norm) goes on their features. Any channel count: torchvision's
first convolution is rebuilt for ``in_channels`` when it is not the model's own; timm builds it so
(``in_chans``). :func:`library_defaults` gives a model's native input size and normalisation without
building it.
"""
from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from hetero.errors import HeteroError, require

TORCHVISION = "tv:"
TIMM = "timm:"
PREFIXES = (TORCHVISION, TIMM)


BN_MOMENTUM = 0.1  # torch's default; see LibraryBackbone


class LibraryBackbone(nn.Module):
    """A library model without its classifier: [N, C, H, W] -> [N, out_features].

    ``name`` is the prefixed name; ``classifier`` the module names the headless model lacks and
    ``first_conv`` the module name of its first convolution, in the library's own key space
    (``net``'s state dict): what loading the library's ImageNet weights leaves out or adapts."""

    def __init__(self, net: nn.Module, out_features: int, *, name: str = "", classifier: tuple[str, ...] = (),
                 first_conv: tuple[str, ...] = ()):
        super().__init__()
        self.net, self.out_features = net, out_features
        self.library_name, self.classifier, self.first_conv = name, tuple(classifier), tuple(first_conv)
        # torchvision's MobileNetV3 (and others) set batch-norm momentum 0.01 for 600-epoch ImageNet runs: after
        # the few hundred steps of an edge's training the running statistics have barely left (0, 1), and
        # the model in eval mode embeds every image alike. torch's default 0.1 tracks them within ~50 steps.
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None and m.momentum < BN_MOMENTUM:
                m.momentum = BN_MOMENTUM

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
    return LibraryBackbone(net, last.in_features, name=name, classifier=(last_name,), first_conv=(first_name,))


def _unknown(library: str, prefix: str, name: str, names: list[str]) -> HeteroError:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = (f"close matches: {', '.join(prefix + c for c in close)}" if close else
            "e.g. " + ", ".join(prefix + n for n in CURATED[prefix][:4]))
    return HeteroError(f"{library} has no classification model {name!r}; {hint} (`hetero models` lists more)")


def torchvision_names() -> list[str]:
    tv = require("torchvision", "byo")
    return list(tv.models.list_models(module=tv.models))


def timm_names() -> list[str]:
    return list(require("timm", "timm").list_models())


def torchvision_backbone(name: str, in_channels: int = 3, **kwargs: Any) -> LibraryBackbone:
    """torchvision's ``name`` (random weights), headless, for ``in_channels`` channels; ``kwargs`` go to
    ``torchvision.models.get_model`` (e.g. ``image_size`` of a ViT)."""
    tv = require("torchvision", "byo")
    if name not in torchvision_names():
        raise _unknown("torchvision", TORCHVISION, name, torchvision_names())
    return headless(tv.models.get_model(name, weights=None, **kwargs), in_channels, f"{TORCHVISION}{name}")


def _names(v: Any) -> tuple[str, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) if v else ()


def timm_backbone(name: str, in_channels: int = 3, **kwargs: Any) -> LibraryBackbone:
    """timm's ``name`` (random weights; ``name.tag`` allowed) built headless for ``in_channels``
    channels (``num_classes=0``, ``in_chans``); ``kwargs`` go to ``timm.create_model`` (e.g. ``img_size``)."""
    timm = require("timm", "timm")
    if not timm.is_model(name):
        raise _unknown("timm", TIMM, name, timm_names())
    net = timm.create_model(name, pretrained=False, **{**kwargs, "num_classes": 0, "in_chans": in_channels})
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    out = getattr(net, "head_hidden_size", None) or net.num_features  # a pre-logits layer past the features
    return LibraryBackbone(net, int(out), name=f"{TIMM}{name}", classifier=_names(cfg.get("classifier")),
                           first_conv=_names(cfg.get("first_conv")))


def library_backbone(name: str, **kwargs: Any) -> nn.Module:
    """The backbone a prefixed name (``tv:NAME``, ``timm:NAME``) stands for."""
    if name.startswith(TORCHVISION):
        return torchvision_backbone(name[len(TORCHVISION):], **kwargs)
    if name.startswith(TIMM):
        return timm_backbone(name[len(TIMM):], **kwargs)
    raise HeteroError(f"unknown backbone library in {name!r}; prefixes: {', '.join(PREFIXES)}")


def is_library(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIXES)


def library_defaults(name: str) -> dict[str, Any] | None:
    """The native preprocessing of a ``tv:``/``timm:`` model, from its default ImageNet weights' recipe
    without building it: ``{"size", "mean", "std", "crop"}`` (crop: the centre-crop fraction, crop size
    over resize size); None for a name of hetero's own registry. Also ``min_size`` where the library
    says it (torchvision), else 1."""
    if not is_library(name):
        return None
    if name.startswith(TORCHVISION):
        tv, short = require("torchvision", "byo"), name[len(TORCHVISION):]
        if short not in torchvision_names():
            raise _unknown("torchvision", TORCHVISION, short, torchvision_names())
        w = tv.models.get_model_weights(short).DEFAULT
        t = w.transforms()
        crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
        return {"size": crop, "mean": tuple(map(float, t.mean)), "std": tuple(map(float, t.std)),
                "crop": crop / resize, "min_size": int(w.meta.get("min_size", (1, 1))[0])}
    timm, short = require("timm", "timm"), name[len(TIMM):]
    if not timm.is_model(short):
        raise _unknown("timm", TIMM, short, timm_names())
    cfg = timm.models.get_pretrained_cfg(short)
    if cfg is None:  # an architecture without pretrained weights: timm's defaults
        return {"size": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop": 0.875, "min_size": 1}
    return {"size": int(cfg.input_size[-1]), "mean": tuple(map(float, cfg.mean)), "std": tuple(map(float, cfg.std)),
            "crop": float(cfg.crop_pct or 1.0),
            "min_size": int(cfg.input_size[-1]) if cfg.fixed_input_size else int((cfg.min_input_size or (3, 1, 1))[-1])}


# hetero models lists these (MFLOPs at native size precomputed: library_flops.json); any other name works
CURATED = {TORCHVISION: ["mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "resnet18", "resnet50",
                         "regnet_y_400mf", "convnext_tiny", "vit_b_16"],
           TIMM: ["mobilenetv4_conv_small", "fastvit_t8", "efficientvit_b0", "mobilevit_xs"]}

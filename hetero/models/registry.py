"""The backbone registry: one ``create_backbone(name, **kw)`` entry point, tiny ``test_*`` variants included."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hetero.errors import HeteroError
from hetero.models.library import PREFIXES, is_library, library_backbone, library_defaults
from hetero.registry import Registry

BACKBONES: Registry[nn.Module] = Registry("backbone")
register_backbone = BACKBONES.register


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a backbone by registered name, or a library's model by prefix (``tv:NAME``, ``timm:NAME``, see
    :mod:`hetero.models.library`). A backbone maps [N,C,H,W] to [N, out_features]."""
    try:
        if name.startswith(PREFIXES):
            return library_backbone(name, **kwargs)
        return BACKBONES.create(name, **kwargs)
    except TypeError as e:
        raise HeteroError(f"backbone {name!r} does not take these options ({e}); check the model kwargs") from None
    except (ValueError, RuntimeError, OverflowError, ZeroDivisionError) as e:  # e.g. width=-1 reaches torch

        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HeteroError(f"backbone {name!r} cannot be built with these options ({first}); check the model kwargs") from None


def list_backbones(prefix: str = "") -> list[str]:
    return BACKBONES.names(prefix)


def check_input(backbone: nn.Module | str, channels: int, size: int, **kwargs: Any) -> None:
    """Refuse, in one line, a backbone (or embedding model) that cannot take ``channels`` x ``size`` x ``size``
    images: one zero image goes through it (eval mode, no grad), and the library's error (a ViT's fixed
    size, a size too small for the network's strides, another channel count) becomes what to change.
    A name is built first (``kwargs``: its options). Costs one forward pass at that size."""
    net = create_backbone(backbone, in_channels=channels, **kwargs) if isinstance(backbone, str) else backbone
    inner = getattr(net, "backbone", net)
    name = backbone if isinstance(backbone, str) else getattr(inner, "library_name", "") or type(inner).__name__
    first = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first.in_channels != channels:
        raise HeteroError(f"{name} takes {first.in_channels}-channel images, not {channels}; build it for "
                          f"the data's {channels}-channel images, or convert the images")
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, channels, size, size))
    except (RuntimeError, AssertionError, ValueError, IndexError) as e:
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise HeteroError(f"{name} cannot take {channels}x{size}x{size} images ({why}); {_size_fix(name, size)}") from None
    finally:
        net.train(was)


def _size_fix(name: str, size: int) -> str:
    d = library_defaults(name) if is_library(name) else None
    if d is None:
        return "use a larger --size, or another --model"
    fixed = ("; or build it for this size with --model-kwargs image_size=" if name.startswith("tv:vit") else
             "; or build it for this size with --model-kwargs img_size=" if d["min_size"] == d["size"] and
             name.startswith("timm:") else "")
    least = f"; at least {d['min_size']}" if 1 < d["min_size"] < d["size"] else ""
    return f"use --size {d['size']} (its native size{least}){fixed}{size if fixed else ''}"

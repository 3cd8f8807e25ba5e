"""The backbone registry: one ``create_backbone(name, **kw)`` entry point, tiny ``test_*`` variants included."""
from __future__ import annotations

from typing import Any

from torch import nn

from hetero.errors import HeteroError
from hetero.models.library import PREFIXES, library_backbone
from hetero.registry import Registry

BACKBONES: Registry[nn.Module] = Registry("backbone")
register_backbone = BACKBONES.register


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a backbone by registered name, or a library's model by prefix (``tv:NAME``, see
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

"""Architecture search for edge models (CMP-NAS on Once-for-All): the search space and its
architectures (``hetero.nas.space``), the elastic weight-sharing supernet and its analytic cost
model (``hetero.nas.supernet``), and the static ``nas_mbv3`` backbone an arch extracts to.

The supernet names load on first use, so that ``hetero.models`` (which registers ``nas_mbv3``
through ``hetero.nas.static``) and this package can import each other in either order.
"""
from __future__ import annotations

from typing import Any

from hetero.nas.space import Arch, SearchSpace, crossover, largest, mutate, sample, smallest

_SUPERNET = ("Supernet", "arch_flops", "arch_params", "recalibrate_bn")

__all__ = ["Arch", "SearchSpace", "crossover", "largest", "mutate", "sample", "smallest", *_SUPERNET]


def __getattr__(name: str) -> Any:
    if name in _SUPERNET:
        from hetero.nas import supernet

        return getattr(supernet, name)
    raise AttributeError(f"module 'hetero.nas' has no attribute {name!r}")

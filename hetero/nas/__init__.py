"""Architecture search for edge models (CMP-NAS on Once-for-All): the search space and its
architectures (``hetero.nas.space``), the static ``nas_mbv3`` network an arch extracts to
(``hetero.nas.subnet``), the elastic weight-sharing supernet and its analytic cost model
(``hetero.nas.supernet``), its training (``hetero.nas.train``), the evolution under a cost budget
(``hetero.nas.evolution``) and the latency predictor (``hetero.nas.latency``). The search that wires
them to data, checkpoints and devices is ``hetero.app.search``.
"""
from __future__ import annotations

from hetero.nas.space import SPACES, Arch, SearchSpace, crossover, largest, mutate, preset, sample, smallest
from hetero.nas.supernet import Supernet, arch_flops, arch_params, recalibrate_bn

__all__ = ["SPACES", "Arch", "SearchSpace", "Supernet", "arch_flops", "arch_params", "crossover", "largest", "mutate",
           "preset", "recalibrate_bn", "sample", "smallest"]

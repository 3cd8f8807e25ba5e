"""hetero: edge embedding models trained into a cloud model's embedding space, exported to device
runtimes and verified by cross-model retrieval.

The Python API does what the CLI does, and returns result objects::

    import hetero
    cloud = hetero.train_cloud("runs/cloud", data="synthetic")
    edge = hetero.train_edge(cloud.path, "runs/edge", data="synthetic")
    exp = hetero.export(edge.path, "runs/export", formats=["onnx"])
    report = hetero.verify(exp.path, cloud.path, data="synthetic")

The packages, from the bottom up: ``devices`` (run an artifact: numpy and the runtime), ``hetero``'s
learning core (data, models, losses, training, metrics, checkpoints, NAS), ``export`` (convert), and
``hetero.app`` (the API above, the CLI, verify, the demo), the only layer that wires them together.
"""
from __future__ import annotations

import importlib
from typing import Any

from hetero.version import __version__

# name -> the application-layer module that defines it. Loaded on first use (PEP 562): ``import
# hetero`` stays cheap, and the learning core, which imports ``hetero.*`` modules (and so runs this
# file first), never pulls in the application layer.
_API = {
    "train_cloud": "training", "train_edge": "training", "train_supernet": "training", "import_cloud": "training",
    "fit_classifier": "training", "TrainResult": "training", "SupernetResult": "training",
    "export": "deploy", "bench": "deploy", "pack_runner": "deploy", "save_latency": "deploy", "Remote": "deploy",
    "ExportResult": "deploy", "LatencyResult": "deploy",
    "evaluate": "checks", "verify": "checks", "EvaluateResult": "checks", "VerifyResult": "checks",
    "search": "search", "SearchResult": "search",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f"hetero.app.{_API[name]}"), name)
    raise AttributeError(f"module 'hetero' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])

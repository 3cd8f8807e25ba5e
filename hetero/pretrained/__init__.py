"""Cloud checkpoints shipped with hetero, so the demo can start from a cloud that has already
indexed its gallery (the real-world case) instead of spending minutes training one.

Each is an ordinary checkpoint directory (``weights.safetensors`` + ``hetero.json``), trained by
hetero's own ``train-cloud`` with the command recorded in its ``info.provenance``, and loaded
with the usual sha256 and fingerprint checks. Nothing is unpickled.
"""
from __future__ import annotations

from pathlib import Path

from hetero.checkpoint import load_checkpoint
from hetero.errors import HeteroError

ROOT = Path(__file__).resolve().parent
PRETRAINED = {  # name -> what it is; the directory of the same name holds the checkpoint
    "fmnist-resnet20": "ResNet-20 cloud, dim 128, Fashion-MNIST train split, 10 epochs, flips and shifts, CosFace margin 0.2",
}


def pretrained_path(name: str) -> Path:
    if name not in PRETRAINED:
        raise HeteroError(f"no shipped checkpoint named {name!r}; known: {', '.join(PRETRAINED)}")
    path = ROOT / name
    if not (path / "hetero.json").is_file():
        raise HeteroError(f"the shipped checkpoint {name} is missing from {path}; reinstall hetero, or train a cloud "
                          "with `hetero train-cloud` (the demo: --train-cloud)")
    return path


def load_pretrained(name: str):
    """The shipped checkpoint ``name``, loaded and verified like any other."""

    return load_checkpoint(pretrained_path(name), role="cloud")

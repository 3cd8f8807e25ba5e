"""Where hetero keeps what it caches and what it is told to trust: the one place these paths are decided."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "HETERO_CACHE"


def cache_dir() -> Path:
    """``$HETERO_CACHE``, else ``~/.cache/hetero``: cloud targets (``targets/``), decoded images
    (``images/``) and a downloaded Fashion-MNIST (``fashion-mnist/``)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hetero")


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/hetero`` (an absolute one; a relative one is ignored, as XDG says), else
    ``~/.config/hetero``: the user's trust list of model factories."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    return (Path(base) if base and Path(base).is_absolute() else Path.home() / ".config") / "hetero"

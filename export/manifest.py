"""The export manifest: what was exported, from which model, into which cloud space, and how faithful
it is. ``devices`` reads the same JSON without importing this module (its core stays torch-free)."""
from __future__ import annotations

import datetime as _dt
import platform
from typing import Any

FORMAT = "hetero-manifest"
VERSION = 1
FILENAME = "manifest.json"


def new_manifest(ckpt, name: str) -> dict[str, Any]:
    """Manifest header for the artifacts of one checkpoint (``ckpt``: a loaded hetero Checkpoint)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "system": platform.system(), "python": platform.python_version()},
        "model": {
            "name": name,
            "role": ckpt.role,
            "spec": ckpt.spec.to_dict(),
            "checkpoint": str(ckpt.path) if ckpt.path else None,
            "checkpoint_fingerprint": ckpt.fingerprint,
        },
        "space": ckpt.space,
        "dim": ckpt.spec.dim,
        "preprocess": ckpt.preprocess.to_dict(),
        "classes": list(ckpt.classes),
        "artifacts": [],
    }

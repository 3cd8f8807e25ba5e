"""The export manifest: what was exported, from which model, into which cloud space, and how faithful
it is. ``devices`` reads the same JSON without importing this module (its core stays torch-free)."""
from __future__ import annotations

import datetime as _dt
import platform
from typing import Any

from devices.artifact import preprocess_problem
from devices.schema import MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION
from hetero.errors import HeteroError

FORMAT, VERSION, FILENAME = MANIFEST_FORMAT, MANIFEST_VERSION, MANIFEST_FILE


def check_exportable(ckpt) -> None:
    """The checkpoint's preprocessing must be one the device runners accept from a manifest
    (``devices.artifact.preprocess_problem``: e.g. at most ``MAX_IMAGE_SIZE`` px)."""
    why = preprocess_problem(ckpt.preprocess.to_dict())
    if why:
        raise HeteroError(f"{ckpt.path or 'the checkpoint'} cannot be exported: its {why}, which the device runners "
                          "refuse")


def new_manifest(ckpt, name: str) -> dict[str, Any]:
    """Manifest header for the artifacts of one checkpoint (``ckpt``: a loaded hetero Checkpoint)."""
    check_exportable(ckpt)
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

"""Read an export directory's ``manifest.json`` and pick an artifact, verifying its sha256.

Only the standard library: this file is part of the torch-free runner core.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devices.errors import DeviceError

MANIFEST = "manifest.json"
FORMAT = "hetero-manifest"


@dataclass(frozen=True)
class Artifact:
    path: Path
    entry: dict[str, Any]  # the manifest's artifact entry
    manifest: dict[str, Any]

    @property
    def format(self) -> str:
        return self.entry["format"]

    @property
    def space(self) -> str:
        return self.manifest.get("space", "")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.entry["input"]["shape"][1:])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(export_dir: str | Path) -> dict[str, Any]:
    d = Path(export_dir)
    if d.is_file() and d.name == MANIFEST:
        d = d.parent
    if not (d / MANIFEST).is_file():
        raise DeviceError(f"{export_dir} has no {MANIFEST}; pass a directory written by `hetero export`")
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DeviceError(f"{d / MANIFEST} is not valid JSON ({e.__class__.__name__}); re-run `hetero export`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("artifacts"), list):
        raise DeviceError(f"{d / MANIFEST} is not a hetero export manifest; re-run `hetero export`")
    manifest["_dir"] = str(d)
    return manifest


def open_artifact(export_dir: str | Path, fmt: str = "onnx", precision: str | None = None) -> Artifact:
    """The first artifact of ``fmt`` (and ``precision``) in the manifest, after checking its sha256."""
    manifest = load_manifest(export_dir)
    d = Path(manifest["_dir"])
    for entry in manifest["artifacts"]:
        if entry.get("format") == fmt and (precision is None or entry.get("precision") == precision):
            path = d / entry["file"]
            if not path.is_file():
                raise DeviceError(f"{path} listed in {MANIFEST} is missing; re-run `hetero export`")
            if _sha256(path) != entry.get("sha256"):
                raise DeviceError(f"{path} does not match its sha256 in {MANIFEST}; the file is corrupt or was replaced, re-run `hetero export`")
            return Artifact(path, entry, manifest)
    have = ", ".join(f"{e.get('format')}/{e.get('precision')}" for e in manifest["artifacts"]) or "none"
    raise DeviceError(f"{d} has no {fmt} artifact{' of precision ' + precision if precision else ''} (it has: {have}); export it first")

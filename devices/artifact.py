"""Read an export directory's ``manifest.json`` and pick an artifact, verifying its sha256.

Only the standard library: this file is part of the torch-free runner core.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devices.errors import DeviceError

MANIFEST = "manifest.json"


class NoSuchArtifact(DeviceError):
    """The manifest lists no artifact of the asked format/precision."""
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


def _sha256_file(path: Path, h) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def sha256_path(path: str | Path) -> str:
    """sha256 of a file; of a directory (a ``.mlpackage``), over its files' relative paths and
    contents in sorted order, so the digest changes when any file is renamed, added or edited."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = f.relative_to(path).as_posix().encode()
            h.update(len(rel).to_bytes(8, "little") + rel + f.stat().st_size.to_bytes(8, "little"))
            _sha256_file(f, h)
    else:
        _sha256_file(path, h)
    return h.hexdigest()


def path_bytes(path: str | Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def resolve_inside(root: Path, name: Any) -> Path:
    """``root / name``, refused unless it stays inside ``root`` (no absolute paths, no ``..``, no
    links out): a manifest handed over by someone else must not point at files elsewhere."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or "\\" in name:
        raise DeviceError(f"{MANIFEST} in {root} lists an invalid artifact path {name!r}; re-run `hetero export`")
    path = root / name
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        raise DeviceError(f"{MANIFEST} in {root} lists {name!r}, which escapes the export directory; "
                          "refusing it (re-run `hetero export`)") from None
    return path


def load_manifest(export_dir: str | Path) -> dict[str, Any]:
    d = Path(export_dir)
    if d.is_file() and d.name == MANIFEST:
        d = d.parent
    if not (d / MANIFEST).is_file():
        raise DeviceError(f"{export_dir} has no {MANIFEST}; pass a directory written by `hetero export`")
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DeviceError(f"{d / MANIFEST} is not valid JSON ({e.__class__.__name__}); re-run `hetero export`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("artifacts"), list):
        raise DeviceError(f"{d / MANIFEST} is not a hetero export manifest; re-run `hetero export`")
    why = _header_problem(manifest)
    if why:
        raise DeviceError(f"{d / MANIFEST} is malformed ({why}); re-run `hetero export`")
    for i, entry in enumerate(manifest["artifacts"]):
        why = _entry_problem(entry)
        if why:
            raise DeviceError(f"{d / MANIFEST} has a malformed artifact entry #{i + 1} ({why}); re-run `hetero export`")
        if entry.get("file") is not None:
            resolve_inside(d, entry["file"])
    manifest["_dir"] = str(d)
    return manifest


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _header_problem(m: dict[str, Any]) -> str | None:
    """What is wrong with the manifest's own fields that runners and verify read, if anything."""
    if not _is_count(m.get("dim")):
        return f"dim {m.get('dim')!r} is not a positive whole number"
    for key in ("space", "name"):
        if m.get(key) is not None and not isinstance(m[key], str):
            return f"{key} must be a string"
    if m.get("classes") is not None and not (isinstance(m["classes"], list) and all(isinstance(c, str) for c in m["classes"])):
        return "classes must be a list of names"
    model = m.get("model")
    if model is not None:
        if not isinstance(model, dict):
            return "model must be an object"
        for key in ("checkpoint", "checkpoint_fingerprint", "role", "name"):
            if model.get(key) is not None and not isinstance(model[key], str):
                return f"model.{key} must be a string"
    if m.get("preprocess") is not None and not isinstance(m["preprocess"], dict):
        return "preprocess must be an object"
    return None


def _entry_problem(e: Any) -> str | None:
    """What is wrong with an artifact entry, if anything (an entry with no file is a build recipe)."""
    if not isinstance(e, dict):
        return "not an object"
    if not isinstance(e.get("format"), str) or not e["format"]:
        return "no format"
    for key in ("precision", "export_format"):
        if e.get(key) is not None and not isinstance(e[key], str):
            return f"{key} must be a string"
    if e.get("file") is None:
        return None
    if not isinstance(e.get("sha256"), str):
        return "no sha256"
    for key in ("input", "output"):
        io = e.get(key)
        if not isinstance(io, dict) or not isinstance(io.get("name"), str):
            return f"no {key} name"
    shape = e["input"].get("shape")
    if not isinstance(shape, list) or len(shape) < 2 or not all(_is_count(n) for n in shape[1:]):
        return f"input shape {shape!r} is not [batch, positive sizes...]"
    return None


def checked_file(export_dir: Path, entry: dict[str, Any]) -> Path:
    """The artifact file of a manifest entry, refused unless it exists inside the export directory
    and matches its sha256."""
    path = resolve_inside(export_dir, entry["file"])
    if not path.exists():
        raise DeviceError(f"{path} listed in {MANIFEST} is missing; re-run `hetero export`")
    if path.is_dir():  # a .mlpackage: no link inside it may lead out of the export directory either
        root = Path(export_dir).resolve()
        for base, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    (Path(base) / name).resolve().relative_to(root)
                except ValueError:
                    rel = (Path(base) / name).relative_to(export_dir).as_posix()
                    raise DeviceError(f"{rel} in {export_dir} links outside the export directory; refusing it "
                                      "(re-run `hetero export`)") from None
    if sha256_path(path) != entry.get("sha256"):
        raise DeviceError(f"{path} does not match its sha256 in {MANIFEST}; the file is corrupt or was replaced, re-run `hetero export`")
    return path


def open_artifact(export_dir: str | Path, fmt: str = "onnx", precision: str | None = None) -> Artifact:
    """The first artifact of ``fmt`` (and ``precision``) in the manifest, after checking its sha256."""
    manifest = load_manifest(export_dir)
    d = Path(manifest["_dir"])
    for entry in manifest["artifacts"]:
        if entry.get("format") == fmt and (precision is None or entry.get("precision") == precision):
            if entry.get("file") is None:  # e.g. a TensorRT engine to be built on the target
                continue
            return Artifact(checked_file(d, entry), entry, manifest)
    have = ", ".join(f"{e.get('format')}/{e.get('precision')}" for e in manifest["artifacts"]) or "none"
    raise NoSuchArtifact(f"{d} has no {fmt} artifact{' of precision ' + precision if precision else ''} (it has: {have}); export it first")

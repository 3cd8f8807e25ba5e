"""Read an export directory's ``manifest.json`` and pick an artifact, verifying its sha256 and that
the file is what its entry says (format, precision, input shape: read from the file, see
``devices._inspect``).

Only the standard library: this file is part of the torch-free runner core.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devices._inspect import Inspection, inspect_artifact
from devices.errors import DeviceError
from devices.images import check_crop
from devices.schema import MANIFEST_FILE, MANIFEST_FORMAT

MANIFEST = MANIFEST_FILE
MAX_IMAGE_SIZE = 4096  # px: a manifest asking for larger inputs is refused before any image is resized to it
ARTIFACT_SUFFIXES = (".onnx", ".ort", ".mlpackage")  # what `hetero export` writes and its entries list


class NoSuchArtifact(DeviceError):
    """The manifest lists no artifact of the asked format/precision."""
FORMAT = MANIFEST_FORMAT


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
            why = _shape_problem(manifest.get("preprocess"), entry)
            if why:
                raise DeviceError(f"{d / MANIFEST}: {why}; the manifest was edited, re-run `hetero export`")
    why = _listing_problem(d, manifest)
    if why:
        raise DeviceError(f"{d / MANIFEST} {why}")
    manifest["_dir"] = str(d)
    return manifest


def preprocess_problem(pre: Any) -> str | None:
    """What is wrong with a ``preprocess`` block, if anything: the rules of hetero's ``Preprocess``
    (exactly size, channels, mean, std, and an optional centre-crop fraction; channels 1 or 3; one finite mean and one finite positive std
    per channel) and a size of 1 to ``MAX_IMAGE_SIZE`` px. JSON admits ``Infinity`` and ``NaN``,
    and ``std: Infinity`` would turn every image into the same zero input."""
    keys = ("size", "channels", "mean", "std")
    if not isinstance(pre, dict) or not set(keys) <= set(pre) <= {*keys, "crop"}:
        return f"preprocess must hold exactly {', '.join(keys)} (and an optional crop)"
    crop = check_crop(pre.get("crop"))
    if crop is not None:
        return f"preprocess.{crop}"
    size, channels = pre["size"], pre["channels"]
    if isinstance(size, float) and size.is_integer():
        size = int(size)
    if isinstance(channels, float) and channels.is_integer():
        channels = int(channels)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_IMAGE_SIZE:
        return f"preprocess.size {pre['size']!r} is not a whole number of pixels in 1..{MAX_IMAGE_SIZE}"
    if isinstance(channels, bool) or channels not in (1, 3):
        return f"preprocess.channels {pre['channels']!r} is not 1 or 3"
    for key in ("mean", "std"):
        vals = pre[key]
        if not isinstance(vals, list) or len(vals) != channels or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            return f"preprocess.{key} must be a list of {channels} number(s), one per channel, got {vals!r}"
        if not all(math.isfinite(v) for v in vals):
            return f"preprocess.{key} {vals!r} is not finite"
    if not all(v > 0 for v in pre["std"]):
        return f"preprocess.std {pre['std']!r} must be positive"
    return None


def _shape_problem(pre: Any, entry: dict[str, Any]) -> str | None:
    """An artifact's input [C, H, W] must be what the preprocessing makes: [channels, size, size]."""
    if not isinstance(pre, dict):
        return None
    shape = [int(n) for n in entry["input"]["shape"][1:]]
    want = [pre["channels"], pre["size"], pre["size"]]
    if len(shape) == 3 and shape != [int(n) for n in want]:
        return (f"preprocess (channels {pre['channels']}, size {pre['size']}) does not match the input "
                f"[N, {', '.join(map(str, shape))}] of {entry['file']}")
    return None


def _listing_problem(d: Path, manifest: dict[str, Any]) -> str | None:
    """Every artifact file of the directory is listed once, and every format the export was asked for
    is either listed or recorded as skipped: an entry removed by hand (or pointed at another
    artifact's file) is caught here."""
    listed: dict[str, str] = {}
    for e in manifest["artifacts"]:
        name = e.get("file")
        if name is None:
            continue
        key = Path(os.path.normpath(name)).as_posix()
        if key in listed:
            return (f"lists {name} for two artifacts ({listed[key]} and {e.get('export_format', e['format'])}); "
                    "an entry was pointed at another artifact's file, re-run `hetero export`")
        listed[key] = e.get("export_format", e["format"])
    try:
        present = sorted(p.name for p in d.iterdir() if p.name.endswith(ARTIFACT_SUFFIXES))
    except OSError:
        present = []
    unlisted = [n for n in present if n not in listed]
    if unlisted:
        gone = [n for n in listed if not (d / n).exists()]
        if gone:  # an entry's path edited to another name
            return (f"lists {gone[0]}, which is not in the export directory, and no entry for {unlisted[0]}, which is: "
                    "an artifact path was edited, re-run `hetero export`")
        return (f"lists no entry for {unlisted[0]}, which is in the export directory (an entry was removed); "
                "re-run `hetero export`, or move the file out of the directory")
    requested = (manifest.get("export") or {}).get("requested") if isinstance(manifest.get("export"), dict) else None
    if isinstance(requested, list):
        have = {e.get("export_format") for e in manifest["artifacts"]}
        skipped = manifest.get("skipped") if isinstance(manifest.get("skipped"), list) else []
        have |= {s.get("format") for s in skipped if isinstance(s, dict)}
        missing = [f for f in requested if isinstance(f, str) and f not in have]
        if missing:
            return (f"has no entry for {missing[0]}, which the export was asked for (an artifact was removed); "
                    "re-run `hetero export`")
    return None


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
    if m.get("preprocess") is not None:
        return preprocess_problem(m["preprocess"])
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
    """The artifact file of a manifest entry, refused unless it exists inside the export directory,
    matches its sha256 and is what the entry says (see :func:`inspected_file`)."""
    return inspected_file(export_dir, entry)[0]


def inspected_file(export_dir: Path, entry: dict[str, Any]) -> tuple[Path, Inspection]:
    """:func:`checked_file`, and what the file turned out to be. A hash can be re-recorded by whoever
    edits the manifest, so the format, precision and input shape are read from the file itself: a
    relabelled precision would otherwise pick another artifact's (looser) gates."""
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
    found = inspect_artifact(path)
    why = _contents_problem(found, entry)
    if why:
        raise DeviceError(f"{entry['file']} {why}; {MANIFEST} in {export_dir} was edited by hand or the file replaced, "
                          "re-run `hetero export`")
    return path, found


def _nothing_compressed(found: Inspection, entry: dict[str, Any]) -> bool:
    """A weight compression (Core ML int8-weights, palettes) that found no tensor above its threshold
    writes plain FP32 constants under its compressed name: legitimate, and judged (gated) as the FP32
    it is. Only FP32, the strictest gates, is let through this way, so no edit can loosen them."""
    record = entry.get("compression")
    compressed = record.get("compressed") if isinstance(record, dict) else None
    return found.precision == "fp32" and isinstance(compressed, dict) and compressed.get("tensors") == 0


def _contents_problem(found: Inspection, entry: dict[str, Any]) -> str | None:
    """How the file disagrees with its entry, if it does (a file that could not be inspected cannot)."""
    if found.format is not None and found.format != entry["format"]:
        return f"is a {found.format} file, but its entry says format {entry['format']}"
    if found.precision is not None and found.precision != entry.get("precision") and not _nothing_compressed(found, entry):
        return (f"holds {found.precision} weights ({found.evidence}), but its entry says precision "
                f"{entry.get('precision') or '(none)'}")
    dims = found.input_dims
    if dims and len(dims) == len(entry["input"]["shape"]) and all(isinstance(n, int) and n > 0 for n in dims[1:]):
        want = [int(n) for n in entry["input"]["shape"][1:]]
        if list(dims[1:]) != want:
            return (f"takes inputs [N, {', '.join(map(str, dims[1:]))}], but its entry says "
                    f"[N, {', '.join(map(str, want))}]")
    return None


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

"""Export a checkpoint to its artifacts plus ``manifest.json``, atomically, with a parity check.

Every format is one registered :class:`Exporter` that says what it makes and from what (Polygraphy
style): ONNX FP32 from the torch model, ONNX FP16 and INT8 from the FP32 ONNX. Asking for a
format builds what it is made from first.
"""
from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.formats import EXPORTERS, Exporter, ExportJob, FormatCannotExpress, exporter, fidelity
from export.manifest import FILENAME, check_exportable, new_manifest
from export.manifest import FORMAT as MANIFEST_FORMAT
from hetero._atomic import atomic_dir, check_output_dest, write_json_atomic
from hetero._progress import progress_bar
from hetero.errors import HeteroError

# One module per target family; importing it registers its exporters.
FAMILIES = ("export.onnx", "export.onnx_precision", "export.ort_mobile", "export.coreml", "export.tensorrt")
for _m in FAMILIES:
    importlib.import_module(_m)

__all__ = ["EXPORTERS", "Exporter", "ExportJob", "default_formats", "export_checkpoint", "exporter", "fidelity"]


def check_export_dest(dest: Path, overwrite: bool) -> None:
    """``dest`` may be new, empty, or (with ``overwrite``) an earlier hetero export; anything else is
    refused, so that ``--overwrite`` never deletes a directory hetero did not write."""
    check_output_dest(dest, "export", overwrite, _legacy_export)


def _legacy_export(d: Path) -> str | None:
    """An export written before output markers: a hetero manifest.json."""
    return "export" if _is_hetero_export(d) else None


def _is_hetero_export(d: Path) -> bool:
    try:
        return json.loads((d / FILENAME).read_text(encoding="utf-8")).get("format") == MANIFEST_FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def default_formats(*, calib: bool, int8_mode: str = "static") -> tuple[list[str], list[dict[str, str]]]:
    """Every format this host can produce, and the others with the reason each is skipped."""
    ok, skipped = [], []
    for name in EXPORTERS.registered():
        ex = exporter(name)
        why = ex.unavailable()
        if why is None and name == "onnx-int8" and not calib and int8_mode == "static":
            why = "needs calibration images from the model's training data (hetero export --data DIR --calib N; the API's calib_inputs)"
        (skipped.append({"format": name, "reason": why}) if why else ok.append(name))
    return ok, skipped


def _build_order(formats: list[str]) -> list[str]:
    """``formats`` plus what they are made from, sources first."""
    order: list[str] = []

    def visit(name: str) -> None:
        ex = exporter(name)  # raises on an unknown name, listing the known ones
        if ex.source:
            visit(ex.source)
        if name not in order:
            order.append(name)

    for f in formats:
        visit(f)
    return order


def export_checkpoint(ckpt, out: str | Path, *, formats: tuple[str, ...] | list[str] | None = ("onnx",),
                      name: str | None = None, check_inputs: np.ndarray | None = None, check_desc: str | None = None,
                      calib_inputs: np.ndarray | None = None, gallery: np.ndarray | None = None,
                      gallery_desc: str = "", options: dict[str, Any] | None = None, overwrite: bool = False,
                      progress: bool = False) -> dict[str, Any]:
    """Export ``ckpt`` (a loaded Checkpoint) to ``out``: one file per format plus ``manifest.json``.

    ``formats=None`` means every format this host can produce (the manifest lists the others under
    ``skipped`` with the reason). ``check_inputs`` (preprocessed float32 [N,C,H,W]) are run through
    torch and every artifact; without them, 256 seeded standard-normal inputs are used.
    ``calib_inputs`` are training images for INT8 calibration. ``gallery`` (unit rows, e.g. the
    cloud embeddings of the training split) is what the top-10 retrieval agreement searches; without
    it, the torch embeddings of the other check inputs. ``options`` are per-format settings (see
    each exporter). Returns the manifest. Nothing is left behind if any format fails.
    """
    name = name or ckpt.role
    check_export_dest(Path(out), overwrite)  # before any work
    check_exportable(ckpt)
    skipped: list[dict[str, str]] = []
    default_set = formats is None
    if formats is None:
        formats, skipped = default_formats(calib=calib_inputs is not None, int8_mode=(options or {}).get("int8_mode", "static"))
    order = _build_order(list(formats))
    for f in order:
        why = exporter(f).unavailable()
        if why:
            raise HeteroError(f"format {f} cannot be produced here: {why}")
    options = dict(options or {})
    if "onnx-int8" in order and calib_inputs is None and options.get("int8_mode", "static") == "static":
        raise HeteroError("format onnx-int8 needs calibration images from the training split; pass --data DIR (and --calib N)")
    if check_inputs is None:
        check_inputs = np.random.default_rng(0).standard_normal((256, *ckpt.input_shape)).astype(np.float32)
        check_desc = "256 seeded standard-normal inputs (synthetic)"
    check_inputs = np.ascontiguousarray(check_inputs, dtype=np.float32)
    if check_inputs.shape[1:] != ckpt.input_shape:
        raise HeteroError(f"check inputs have shape {check_inputs.shape[1:]}, the model takes {ckpt.input_shape}")
    if calib_inputs is not None:
        calib_inputs = np.ascontiguousarray(calib_inputs, dtype=np.float32)
        if calib_inputs.shape[1:] != ckpt.input_shape:
            raise HeteroError(f"calibration inputs have shape {calib_inputs.shape[1:]}, the model takes {ckpt.input_shape}")
    with torch.no_grad():
        ref = torch.cat([ckpt.model.eval()(torch.from_numpy(check_inputs[i:i + 1024]))
                         for i in range(0, len(check_inputs), 1024)]).numpy()
    manifest = new_manifest(ckpt, name)
    with atomic_dir(out, "export", overwrite, _legacy_export) as tmp:
        job = ExportJob(ckpt, tmp, name, check_inputs, check_desc or "given inputs", ref, calib_inputs=calib_inputs,
                        gallery=gallery, gallery_desc=gallery_desc, options=options)
        bar = progress_bar(order, desc="export", unit="format", disable=not progress)
        for f in bar:
            bar.set_postfix_str(f, refresh=False)
            ex = exporter(f)
            job.current_format = f
            t0 = time.perf_counter()
            if ex.source and ex.source not in job.built:  # its source was skipped (default set only)
                skipped.append({"format": f, "reason": f"made from {ex.source}, which was skipped"})
                continue
            try:
                entry = ex.build(job, job.built.get(ex.source) if ex.source else None)
            except FormatCannotExpress as e:
                if not default_set:
                    raise
                skipped.append({"format": f, "reason": str(e)})
                continue
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            if entry.get("file") is not None:
                job.built[f] = tmp / entry["file"]
            manifest["artifacts"].append({"export_format": f, **entry})
        manifest["skipped"] = skipped
        manifest["export"] = {"requested": None if default_set else list(formats), "options": options,
                              "seconds": round(sum(a.get("seconds", 0.0) for a in manifest["artifacts"]), 2)}
        write_json_atomic(tmp / FILENAME, manifest)
    return manifest

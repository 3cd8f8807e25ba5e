"""Export a checkpoint to its artifacts plus ``manifest.json``, atomically, with a parity check.

Every format is one registered :class:`Exporter` that says what it makes and from what (Polygraphy
style): ONNX FP32 from the torch model, ONNX FP16 and INT8 from the FP32 ONNX. Asking for a
format builds what it is made from first.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from export.manifest import FILENAME, new_manifest
from export.onnx import INPUT_NAME, OPSET, OUTPUT_NAME, onnx_from_torch
from export.onnx_precision import onnx_fp16_from_onnx, onnx_int8_from_onnx, weight_bytes
from hetero._atomic import atomic_dir, sha256_file, write_json_atomic
from hetero.errors import HeteroError, require
from hetero.registry import Registry


@dataclass
class ExportJob:
    """What every exporter may use: the checkpoint, the output dir, and the inputs of the checks."""

    ckpt: Any
    out_dir: Path
    name: str
    check_inputs: np.ndarray
    check_desc: str
    reference: np.ndarray  # the torch model's embeddings of check_inputs
    calib_inputs: np.ndarray | None  # preprocessed training images for INT8 calibration
    built: dict[str, Path]  # format name -> file made so far in this export


@dataclass(frozen=True)
class Exporter:
    name: str
    makes: str  # what the artifact is, for people
    source: str | None  # the format it is made from; None: the torch model
    modules: tuple[str, ...]  # Python modules it needs
    extra: str  # the pip extra that brings them
    build: Callable[[ExportJob, Path | None], dict[str, Any]]

    def unavailable(self) -> str | None:
        """Why this format cannot be produced on this host, or None if it can."""
        missing = [m for m in self.modules if importlib.util.find_spec(m.split(".")[0]) is None]
        if missing:
            return f"{', '.join(missing)} not installed (pip install 'hetero[{self.extra}]')"
        return None


EXPORTERS: Registry[Exporter] = Registry("export format")


def _exporter(name: str, makes: str, source: str | None, modules: tuple[str, ...], extra: str):
    def deco(fn: Callable[[ExportJob, Path | None], dict[str, Any]]):
        ex = Exporter(name, makes, source, modules, extra, fn)
        EXPORTERS.register(name)(lambda: ex)
        return fn

    return deco


def exporter(name: str) -> Exporter:
    return EXPORTERS.create(name)


def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Row-wise cosine between two embedding sets (min and mean) and the max absolute difference."""
    a = reference.astype(np.float64)
    b = candidate.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "max_abs_diff": float(np.abs(a - b).max())}


def _ort_embed(path: Path, inputs: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, str]:
    ort = require("onnxruntime", "onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = [sess.run([OUTPUT_NAME], {INPUT_NAME: inputs[i:i + batch_size]})[0] for i in range(0, len(inputs), batch_size)]
    return np.concatenate(out), f"onnxruntime {ort.__version__} CPUExecutionProvider"


def _onnx_entry(job: ExportJob, path: Path, precision: str, made_from: str, **extra: Any) -> dict[str, Any]:
    """Manifest entry of an ONNX file, with its fidelity measured through onnxruntime."""
    import onnx
    import onnxruntime

    got, runtime = _ort_embed(path, job.check_inputs)
    if not np.isfinite(got).all():
        raise HeteroError(f"the {precision} ONNX model gives NaN/Inf embeddings on the check inputs; "
                          "do not ship it, and report the model")
    c, h, w = job.ckpt.input_shape
    return {
        "format": "onnx",
        "precision": precision,
        "file": path.name,
        "made_from": made_from,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "weight_bytes": weight_bytes(path),
        "opset": OPSET,
        "input": {"name": INPUT_NAME, "shape": ["batch", c, h, w], "dtype": "float32", "layout": "NCHW, preprocessed"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", job.ckpt.spec.dim], "dtype": "float32", "normalized": True},
        "runtime": "onnxruntime",
        "libraries": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        **extra,
        "fidelity": {"reference": "torch fp32", "runtime": runtime, "inputs": job.check_desc,
                     "num_inputs": int(len(job.check_inputs)), "label": "measured", **fidelity(job.reference, got)},
    }


@_exporter("onnx", "ONNX FP32, one file, dynamic batch", None, ("onnx", "onnxscript", "onnxruntime"), "onnx")
def _export_onnx(job: ExportJob, source: Path | None) -> dict[str, Any]:
    path = onnx_from_torch(job.ckpt.model, job.ckpt.input_shape, job.out_dir / f"{job.name}.onnx")
    return _onnx_entry(job, path, "fp32", "torch (dynamo exporter)")


@_exporter("onnx-fp16", "ONNX FP16 weights and activations, FP32 I/O and normalisation", "onnx",
           ("onnx", "onnxconverter_common", "onnxruntime"), "onnx")
def _export_onnx_fp16(job: ExportJob, source: Path | None) -> dict[str, Any]:
    import onnxconverter_common

    path = onnx_fp16_from_onnx(source, job.out_dir / f"{job.name}.fp16.onnx")
    return _onnx_entry(job, path, "fp16", source.name, converter=f"onnxconverter-common {onnxconverter_common.__version__}")


@_exporter("onnx-int8", "ONNX INT8, static QDQ, per-channel weights, calibrated on training images", "onnx",
           ("onnx", "onnxruntime"), "onnx")
def _export_onnx_int8(job: ExportJob, source: Path | None) -> dict[str, Any]:
    path = onnx_int8_from_onnx(source, job.out_dir / f"{job.name}.int8.onnx", job.calib_inputs, input_name=INPUT_NAME)
    return _onnx_entry(job, path, "int8", source.name,
                       converter="onnxruntime quantize_static (QDQ, per-channel, percentile calibration)",
                       calibration={"images": int(len(job.calib_inputs)), "source": "training split"})


def default_formats(*, calib: bool) -> tuple[list[str], list[dict[str, str]]]:
    """Every format this host can produce, and the others with the reason each is skipped."""
    ok, skipped = [], []
    for name in EXPORTERS.names():
        ex = exporter(name)
        why = ex.unavailable()
        if why is None and name == "onnx-int8" and not calib:
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
                      calib_inputs: np.ndarray | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Export ``ckpt`` (a loaded Checkpoint) to ``out``: one file per format plus ``manifest.json``.

    ``formats=None`` means every format this host can produce (the manifest lists the others under
    ``skipped`` with the reason). ``check_inputs`` (preprocessed float32 [N,C,H,W]) are run through
    torch and every artifact; without them, 256 seeded standard-normal inputs are used.
    ``calib_inputs`` are training images for INT8 calibration. Returns the manifest. Nothing is
    left behind if any format fails.
    """
    name = name or ckpt.role
    skipped: list[dict[str, str]] = []
    if formats is None:
        formats, skipped = default_formats(calib=calib_inputs is not None)
    order = _build_order(list(formats))
    for f in order:
        why = exporter(f).unavailable()
        if why:
            raise HeteroError(f"format {f} cannot be produced here: {why}")
    if "onnx-int8" in order and calib_inputs is None:
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
    with atomic_dir(out, overwrite=overwrite) as tmp:
        job = ExportJob(ckpt, tmp, name, check_inputs, check_desc or "given inputs", ref, calib_inputs, {})
        for f in order:
            ex = exporter(f)
            entry = ex.build(job, job.built.get(ex.source) if ex.source else None)
            job.built[f] = tmp / entry["file"]
            manifest["artifacts"].append({"export_format": f, **entry})
        manifest["skipped"] = skipped
        write_json_atomic(tmp / FILENAME, manifest)
    return manifest

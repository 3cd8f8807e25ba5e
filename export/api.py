"""Export a checkpoint to its artifacts plus ``manifest.json``, atomically, with a parity check."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from export.manifest import FILENAME, new_manifest
from export.onnx import INPUT_NAME, OPSET, OUTPUT_NAME, onnx_from_torch
from hetero._atomic import atomic_dir, sha256_file, write_json_atomic
from hetero.errors import HeteroError, require
from hetero.registry import Registry

EXPORTERS: Registry[Callable[..., dict[str, Any]]] = Registry("export format")


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


@EXPORTERS.register("onnx")
def _export_onnx(ckpt, out_dir: Path, name: str, check_inputs: np.ndarray, check_desc: str) -> dict[str, Any]:
    path = onnx_from_torch(ckpt.model, ckpt.input_shape, out_dir / f"{name}.onnx")
    with torch.no_grad():
        ref = torch.cat([ckpt.model(torch.from_numpy(check_inputs[i:i + 1024])) for i in range(0, len(check_inputs), 1024)]).numpy()
    got, runtime = _ort_embed(path, check_inputs)
    c, h, w = ckpt.input_shape
    return {
        "format": "onnx",
        "precision": "fp32",
        "file": path.name,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "opset": OPSET,
        "input": {"name": INPUT_NAME, "shape": ["batch", c, h, w], "dtype": "float32", "layout": "NCHW, preprocessed"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", ckpt.spec.dim], "dtype": "float32", "normalized": True},
        "runtime": "onnxruntime",
        "fidelity": {"reference": "torch fp32", "runtime": runtime, "inputs": check_desc,
                     "num_inputs": int(len(check_inputs)), "label": "measured", **fidelity(ref, got)},
    }


def export_checkpoint(ckpt, out: str | Path, *, formats: tuple[str, ...] = ("onnx",), name: str | None = None,
                      check_inputs: np.ndarray | None = None, check_desc: str | None = None,
                      overwrite: bool = False) -> dict[str, Any]:
    """Export ``ckpt`` (a loaded Checkpoint) to ``out``: one file per format plus ``manifest.json``.

    ``check_inputs`` (preprocessed float32 [N,C,H,W]) are run through torch and the exported model;
    without them, 256 seeded standard-normal inputs are used. Returns the manifest.
    """
    name = name or ckpt.role
    for f in formats:
        EXPORTERS.get(f)
    if check_inputs is None:
        check_inputs = np.random.default_rng(0).standard_normal((256, *ckpt.input_shape)).astype(np.float32)
        check_desc = "256 seeded standard-normal inputs (synthetic)"
    check_inputs = np.ascontiguousarray(check_inputs, dtype=np.float32)
    if check_inputs.shape[1:] != ckpt.input_shape:
        raise HeteroError(f"check inputs have shape {check_inputs.shape[1:]}, the model takes {ckpt.input_shape}")
    manifest = new_manifest(ckpt, name)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for f in formats:
            manifest["artifacts"].append(EXPORTERS.get(f)(ckpt, tmp, name, check_inputs, check_desc or "given inputs"))
        write_json_atomic(tmp / FILENAME, manifest)
    return manifest

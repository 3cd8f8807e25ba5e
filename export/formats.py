"""The format table every exporter registers in (one row per format), the job it works on, and the
manifest entry with its fidelity.

One file per target family (``onnx.py``, ``onnx_precision.py``, ``ort_mobile.py``, ``coreml.py``,
``tensorrt.py``) registers its exporters here with :func:`register_exporter`; ``run.py`` drives
them. An exporter declares what it makes and from what (Polygraphy style): ONNX FP16 is made from
the FP32 ONNX, a TensorRT plan from an ONNX, a Core ML package from the torch model.
"""
from __future__ import annotations

import importlib.util
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from devices import create_runner
from devices.artifact import path_bytes, sha256_path
from hetero.compare import fidelity, topk_overlap
from hetero.errors import HeteroError
from hetero.knn import knn_search
from hetero.registry import Registry
from hetero.version import __version__

# the tensor names of every artifact hetero exports (ONNX, Core ML, TensorRT alike): the runners and the
# manifest name them
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"

TOPK = 10  # retrieval agreement is measured on the top-10 results
BATCH_SIZES = (1, 8, 32)  # the batch sizes a fixed-shape target (Core ML, TensorRT profiles) is built for


class FormatCannotExpress(HeteroError):
    """The model uses an op (or attribute) that this format cannot express. The message names the op,
    the node and the format. Asked for explicitly, the export fails with it; as part of the default
    "every format" export, the format is listed as skipped with it instead."""


@dataclass
class ExportJob:
    """What every exporter may use: the checkpoint, the output dir, and the inputs of the checks."""

    ckpt: Any  # a loaded hetero Checkpoint (role edge/control/cloud)
    out_dir: Path  # the temporary export directory; artifacts go directly inside it
    name: str  # artifact base name, e.g. "edge" -> edge.onnx, edge.fp16.onnx, edge.mlpackage
    check_inputs: np.ndarray  # preprocessed float32 [N,C,H,W]
    check_desc: str
    reference: np.ndarray  # the torch model's embeddings of check_inputs, float32 [N,dim]
    calib_inputs: np.ndarray | None = None  # preprocessed training images for INT8 calibration
    gallery: np.ndarray | None = None  # float32 [G,dim] unit rows searched for retrieval agreement
    gallery_desc: str = ""
    # per-format options: "batch_sizes" (tuple of ints, default BATCH_SIZES), "int8_mode" ("static" or
    # "dynamic"), "coreml.image_input" (bool), ...; see each exporter
    options: dict[str, Any] = field(default_factory=dict)
    built: dict[str, Path] = field(default_factory=dict)  # format name -> file made so far in this export
    current_format: str = ""  # the format being built now (set by the driver)
    _ref_topk: np.ndarray | None = None

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(self.options.get("batch_sizes") or BATCH_SIZES)

    def reference_topk(self) -> np.ndarray:
        if self._ref_topk is None:
            self._ref_topk = topk_ids(self.reference, self.search_gallery(), exclude_diagonal=self.gallery is None)
        return self._ref_topk

    def search_gallery(self) -> np.ndarray:
        """The gallery of the retrieval-agreement check: the given (cloud) gallery, else the torch
        reference embeddings themselves."""
        return self.gallery if self.gallery is not None else self.reference


@dataclass(frozen=True)
class Exporter:
    name: str  # the --formats name, e.g. "onnx-fp16"
    makes: str  # what the artifact is, for people
    source: str | None  # the format it is made from; None: the torch model
    modules: tuple[str, ...]  # Python modules it needs
    extra: str  # the pip extra that brings them
    build: Callable[[ExportJob, Path | None], dict[str, Any]]
    check: Callable[[], str | None] | None = None  # any other reason it cannot run here

    def unavailable(self) -> str | None:
        """Why this format cannot be produced on this host, or None if it can."""
        missing = [m for m in self.modules if importlib.util.find_spec(m.split(".")[0]) is None]
        if missing:
            return f"{', '.join(missing)} not installed (pip install 'hetero[{self.extra}]')"
        return self.check() if self.check else None


class FormatBreaksModel(FormatCannotExpress):
    """The artifact was made but its embeddings no longer match the model's (mean cosine below
    ``BROKEN_MEAN_COSINE``): not something to ship, so handled like an op the format cannot express."""


BROKEN_MEAN_COSINE = 0.9  # far below every precision's target: the conversion broke the model


def check_not_broken(fmt: str, fid: dict[str, Any]) -> None:
    if fid.get("mean_cosine") is not None and fid["mean_cosine"] < BROKEN_MEAN_COSINE:
        raise FormatBreaksModel(f"{fmt} breaks this model: mean cosine {fid['mean_cosine']:.4f} vs torch on "
                                f"{fid.get('inputs')} (min {fid['min_cosine']:.4f}); do not ship it, use another format")


EXPORTERS: Registry[Exporter] = Registry("export format")


def register_exporter(name: str, makes: str, source: str | None, modules: tuple[str, ...], extra: str,
                      check: Callable[[], str | None] | None = None):
    """Decorator: register ``fn(job, source_path) -> manifest entry`` as the exporter ``name``."""

    def deco(fn: Callable[[ExportJob, Path | None], dict[str, Any]]):
        ex = Exporter(name, makes, source, modules, extra, fn, check)
        EXPORTERS.register(name)(lambda: ex)
        return fn

    return deco


def exporter(name: str) -> Exporter:
    return EXPORTERS.create(name)


def topk_ids(queries: np.ndarray, gallery: np.ndarray, k: int = TOPK, *, exclude_diagonal: bool = False) -> np.ndarray:
    """Exact inner-product top-k gallery ids of each query row, best first (hetero's faiss search).
    ``exclude_diagonal``: query i never retrieves gallery row i (the gallery is the queries' own set)."""

    k = min(k, len(gallery) - int(exclude_diagonal))
    return knn_search(queries, gallery, k, exclude_self=exclude_diagonal)[1]


def retrieval_agreement(job: ExportJob, candidate: np.ndarray, k: int = TOPK) -> float:
    """Mean fraction of the torch model's top-k results that the candidate's queries also retrieve,
    searching the job's gallery (or, without one, the torch embeddings of the other check inputs)."""
    got = topk_ids(candidate, job.search_gallery(), k, exclude_diagonal=job.gallery is None)
    return topk_overlap(job.reference_topk(), got)


def runner_embeddings(job: ExportJob, path: Path, runtime: str, entry: dict[str, Any],
                      **settings: Any) -> tuple[np.ndarray, str]:
    """``job.check_inputs`` embedded by the artifact just written at ``path``, through the devices
    runner ``runtime`` (the one verify and the device harness use), and that runner's description.
    ``entry``: the artifact's format and what the runner reads besides the input and output spec."""
    inp, out = io_spec(job)
    with create_runner(path, runtime, entry={"input": inp, "output": out, **entry}, **settings) as r:
        return r.embed(job.check_inputs), r.runtime


def measured_fidelity(job: ExportJob, got: np.ndarray, runtime: str, label: str = "measured") -> dict[str, Any]:
    """Fidelity of ``got`` (the artifact's embeddings of ``job.check_inputs``) against torch, by the
    one comparator (:mod:`hetero.compare`)."""
    return {"reference": "torch fp32", "runtime": runtime, "inputs": job.check_desc,
            "num_inputs": int(len(job.check_inputs)), "label": label, **fidelity(job.reference, got),
            "top10_agreement": retrieval_agreement(job, got),
            "top10_gallery": job.gallery_desc or "the reference embeddings of the check inputs (edge x edge, self excluded)"}


def pending_fidelity(why: str) -> dict[str, Any]:
    """Fidelity that cannot be measured here (yet): never reported as passed."""
    return {"reference": "torch fp32", "label": "pending", "reason": why}


def io_spec(job: ExportJob, *, batch: Any = "batch", dtype: str = "float32") -> tuple[dict[str, Any], dict[str, Any]]:
    """The input and output spec of an artifact of ``job.ckpt`` (NCHW preprocessed in, unit rows out)."""

    c, h, w = job.ckpt.input_shape
    return ({"name": INPUT_NAME, "shape": [batch, c, h, w], "dtype": dtype, "layout": "NCHW, preprocessed"},
            {"name": OUTPUT_NAME, "shape": [batch, job.ckpt.spec.dim], "dtype": dtype, "normalized": True})


def artifact_metadata(job: ExportJob, precision: str) -> dict[str, str]:
    """The key/value metadata every artifact file carries about itself (ONNX ``metadata_props``, Core
    ML ``user_defined_metadata``): what it embeds, how to preprocess, and which space it lives in. A
    reader may show these; hetero itself never trusts them over what it can recompute."""
    ckpt = job.ckpt
    return {
        "hetero.version": __version__,
        "hetero.role": str(ckpt.role),
        "hetero.precision": precision,
        "hetero.embedding_dim": str(ckpt.spec.dim),
        "hetero.preprocessing": json.dumps(ckpt.preprocess.to_dict(), sort_keys=True),
        "hetero.space_fingerprint": ckpt.space,
        "hetero.checkpoint_fingerprint": ckpt.fingerprint,
    }


def artifact_entry(job: ExportJob, path: Path, *, fmt: str, precision: str, made_from: str, runtime: str,
                   libraries: dict[str, str], fidelity: dict[str, Any], weight_bytes: int | None,
                   **extra: Any) -> dict[str, Any]:
    """One manifest entry: the file (or package directory) with its sha256 and sizes, how it was
    made, what it takes and gives, and how faithful it is. ``extra`` keys are format-specific."""
    inp, out = io_spec(job)
    return {
        "format": fmt,
        "precision": precision,
        "status": "built",
        "file": path.name,
        "made_from": made_from,
        "sha256": sha256_path(path),
        "bytes": path_bytes(path),
        "weight_bytes": weight_bytes,
        "input": inp,
        "output": out,
        "runtime": runtime,
        "libraries": {"python": platform.python_version(), **libraries},
        **extra,
        "fidelity": fidelity,
    }

"""Deployment, as the Python API and `hetero export`, `bench` and `pack-runner` do it: export a
checkpoint with real check images, INT8 calibration images and the cloud gallery chosen for it, and
time an export (or a checkpoint) on a runner here or on another machine over SSH."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from devices.bench import check_result
from devices.outputs import COMPARE_SCHEMA
from devices.remote import remote_bench
from devices.schema import CHECKPOINT_FILE
from devices.standalone import bench_export
from devices.standalone import pack_runner as _pack_runner
from export import EXPORTERS, export_checkpoint, exporter
from export.run import check_export_dest
from hetero._atomic import check_output_file, write_json_atomic
from hetero.checkpoint import Checkpoint, check_same_space, load_checkpoint
from hetero.data import load_dataset
from hetero.embed import cloud_targets
from hetero.errors import HeteroError


@dataclass(frozen=True)
class ExportResult:
    """A written export directory and its manifest (artifacts with their fidelity, skipped formats)."""
    path: Path
    manifest: dict[str, Any]

    @property
    def artifacts(self) -> list[dict[str, Any]]:
        return list(self.manifest["artifacts"])

    @property
    def skipped(self) -> list[dict[str, str]]:
        return list(self.manifest.get("skipped", []))


def default_calibration_images(size: int) -> int:
    """INT8 calibration images by default: 512 up to 112 px, fewer above (128 at 224 px). onnxruntime's
    calibration holds every intermediate activation of every image in memory: EfficientNet-B0 at 224 px
    with 256 images was killed at 22.8 GB (2-core AMD EPYC VM, 2026-12-03); --calib N sets it."""
    return int(max(128, min(512, 512 * (112 / size) ** 2)))


def _calibration(edge: Checkpoint, train, n: int | None) -> np.ndarray:
    """A seeded sample of the training split (never test images), preprocessed for ``edge``."""
    tr = train.conform(edge.preprocess)
    n = n or default_calibration_images(edge.preprocess.size)
    pick = np.sort(np.random.default_rng(0).choice(len(tr), min(n, len(tr)), replace=False))
    return edge.preprocess.apply(tr.images[pick])


def export(edge: str | Path, out: str | Path, *, cloud: str | Path | None = None, data: str | None = None,
           formats: Sequence[str] | None = None, name: str = "edge", check_real: bool = False,
           check_samples: int = 1000, calib: int | None = None, int8_mode: str = "static",
           batch_sizes: Sequence[int] | None = None, coreml_image_input: bool = False, ort_optimization: str = "fixed",
           overwrite: bool = False, progress: bool = True) -> ExportResult:
    """Export the checkpoint ``edge`` to ``out``: one file per format (default: every format this host
    can produce) and ``manifest.json``, each artifact checked against torch. ``cloud``: refuse an edge
    of another space, and measure top-10 agreement on the real cloud gallery (its training split).
    ``data``: the model's dataset; its test images check fidelity (``check_samples`` of them; Fashion-
    MNIST's with ``check_real``) and ``calib`` training images calibrate static INT8."""
    edge_ckpt = load_checkpoint(edge, role=("edge", "control", "cloud"))
    cloud_ckpt = None
    if cloud:
        cloud_ckpt = load_checkpoint(cloud, role="cloud")
        check_same_space(edge_ckpt, cloud_ckpt)
    check_export_dest(Path(out), overwrite)
    formats = list(formats) if formats is not None else None
    for f in formats or ():
        EXPORTERS.get(f)  # an unknown name fails here, listing the known ones
    if calib is not None and calib < 1:
        raise HeteroError(f"--calib must be >= 1, got {calib}")
    if check_samples < 1:
        raise HeteroError(f"--check-samples must be >= 1, got {check_samples}")
    options: dict[str, Any] = {"int8_mode": int8_mode, "ort.optimization": ort_optimization,
                               "coreml.image_input": coreml_image_input}
    if batch_sizes:
        options["batch_sizes"] = tuple(sorted({int(b) for b in batch_sizes}))
    trained_on = str(edge_ckpt.info.get("dataset", ""))
    own_data = data is not None or trained_on.startswith("fashion-mnist")
    inputs, desc, calib_inputs, gallery, gallery_desc = None, None, None, None, ""
    if data or check_real or cloud_ckpt is not None:
        ds = load_dataset(data, "test", progress=progress).conform(edge_ckpt.preprocess)
        ds = ds.subset(min(check_samples, len(ds)))
        inputs, desc = edge_ckpt.preprocess.apply(ds.images), f"{ds.name} ({len(ds)} images)"
    asked_int8 = formats is not None and "onnx-int8" in formats
    wants_calib = int8_mode == "static" and (asked_int8 or (formats is None and exporter("onnx-int8").unavailable() is None))
    if wants_calib and not own_data:
        # calibrating on Fashion-MNIST would quantise a model of other images with the wrong ranges
        if asked_int8:
            raise HeteroError(f"onnx-int8 calibrates on the model's training images, but {edge} was trained on "
                              f"{trained_on or 'unknown data'}; pass --data DIR with that dataset (or --int8-mode dynamic)")
        wants_calib = False
    train = load_dataset(data, "train", progress=progress) if wants_calib or cloud_ckpt is not None else None
    if wants_calib:
        calib_inputs = _calibration(edge_ckpt, train, calib)
    if cloud_ckpt is not None:  # top-10 agreement searches the real cloud gallery (cached cloud embeddings)
        gallery = np.asarray(cloud_targets(cloud_ckpt, train.conform(cloud_ckpt.preprocess), progress=progress))
        gallery_desc = f"{train.name} ({len(train)} images) embedded by the cloud model {cloud}"
    manifest = export_checkpoint(edge_ckpt, out, formats=formats, name=name, check_inputs=inputs, check_desc=desc,
                                 calib_inputs=calib_inputs, gallery=gallery, gallery_desc=gallery_desc, options=options,
                                 overwrite=overwrite, progress=progress)
    return ExportResult(Path(out), manifest)


@dataclass(frozen=True)
class Remote:
    """Where to bench over SSH: ``user@host`` and how to reach it."""
    host: str
    port: int | None = None
    identity: str | None = None
    python: str = "python3"
    ssh_options: tuple[str, ...] = ()
    timeout: float = 600


@dataclass(frozen=True)
class LatencyResult:
    """A latency measurement (schema ``hetero-latency/1``): per batch size p50/p90/p99/mean/std ms,
    throughput, peak RSS and threads, with the host, runtime and a measured/emulated label."""
    data: dict[str, Any] = field(repr=False)

    @property
    def results(self) -> list[dict[str, Any]]:
        return list(self.data["results"])

    def p50_ms(self, batch: int = 1) -> float:
        """The median latency of one call at ``batch`` images."""
        for r in self.data["results"]:
            if r["batch"] == batch:
                return float(r["p50_ms"])
        raise HeteroError(f"no batch {batch} was timed; timed: {[r['batch'] for r in self.data['results']]}")


def bench(path: str | Path, *, runtime: str | None = None, precision: str | None = None, fmt: str | None = None,
          profile: str | None = None, batch_sizes: Sequence[int] = (1, 8, 32), iters: int | None = None,
          budget_s: float | None = None, warmup: int = 10, threads: int | None = None, remote: Remote | None = None,
          progress: bool = True) -> LatencyResult:
    """Latency of an export directory (one artifact of it: ``fmt``/``precision``/``profile``), a
    checkpoint (the torch runner), or a latency JSON read back; here, or on ``remote`` over SSH."""
    if iters is not None and budget_s is not None:
        raise HeteroError("give --iters N or --budget SECONDS, not both")
    p = Path(path)
    if p.is_file() and p.suffix == ".json" and p.name != "manifest.json":
        try:
            return LatencyResult(check_result(json.loads(p.read_text(encoding="utf-8")), str(p)))
        except (ValueError, RecursionError):
            raise HeteroError(f"{p} is not valid JSON; pass a latency JSON from `hetero bench --json`, an export "
                              "directory or a checkpoint") from None
    if p.is_file() and p.name == "manifest.json":
        p = p.parent
    if not p.is_dir():
        raise HeteroError(f"{path} is neither an export directory, a checkpoint directory nor a latency JSON")
    if runtime is None and not profile and (p / CHECKPOINT_FILE).is_file():
        runtime = "torch"  # a checkpoint: the reference runner
    common = dict(runtime=runtime, precision=precision, fmt=fmt, profile=profile, batch_sizes=tuple(sorted(set(batch_sizes))),
                  iters=iters, budget_s=budget_s, warmup=warmup)
    if remote is not None:  # the profile is resolved there, against the remote host's runtimes
        return LatencyResult(remote_bench(p, remote.host, **common, threads=threads, port=remote.port,
                                          identity=remote.identity, python=remote.python,
                                          ssh_options=tuple(remote.ssh_options), timeout=remote.timeout))
    settings = {"threads": threads} if threads is not None else {}
    return LatencyResult(bench_export(p, **common, progress=progress, **settings))


def save_latency(result: LatencyResult | tuple[LatencyResult, LatencyResult], path: str | Path,
                 overwrite: bool = False) -> Path:
    """Write a latency result (or a pair compared, schema ``hetero-latency-compare/1``) to ``path``: a
    new path, or an earlier latency JSON of the same schema with ``overwrite``."""
    compare = isinstance(result, tuple)
    check_output_file(path, "latency comparison" if compare else "latency JSON", overwrite)
    doc = {"schema": COMPARE_SCHEMA, "a": result[0].data, "b": result[1].data} if compare else result.data
    write_json_atomic(path, doc)
    return Path(path)


def pack_runner(out: str | Path, overwrite: bool = False) -> Path:
    """The torch-free standalone runner, packed into one zip to copy to a device: a new path, or an
    earlier runner zip of hetero's with ``overwrite``."""
    check_output_file(Path(out), "runner zip", overwrite)
    return _pack_runner(Path(out))

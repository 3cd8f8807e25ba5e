"""Runners: ``with create_runner(export_dir, "onnx") as r: emb = r.embed(batch)``; numpy in, numpy out.

The input batch is preprocessed float32 [N, C, H, W] as the manifest's input spec says; the output is
float32 [N, dim]. numpy only: runtimes are imported lazily by each runner.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from devices.artifact import Artifact, open_artifact
from devices.errors import DeviceError

RUNNERS: dict[str, Callable[..., "Runner"]] = {}


def register_runner(name: str):
    def deco(cls):
        if name in RUNNERS:
            raise ValueError(f"runner {name!r} is already registered")
        RUNNERS[name] = cls
        return cls

    return deco


class Runner:
    """Base class: validates batches, splits them into ``batch_size`` chunks, checks outputs."""

    name = "base"

    def __init__(self, artifact: Artifact, batch_size: int = 256):
        self.artifact = artifact
        self.batch_size = batch_size

    def __enter__(self) -> "Runner":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:
        pass

    def _run(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def runtime(self) -> str:
        return self.name

    def embed(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        want = self.artifact.input_shape
        if batch.ndim != 1 + len(want) or tuple(batch.shape[1:]) != want:
            raise DeviceError(f"input batch has shape {tuple(batch.shape)}, the model takes [N, {', '.join(map(str, want))}]; preprocess images as the manifest says")
        if batch.dtype != np.float32:
            batch = batch.astype(np.float32)
        if not np.isfinite(batch).all():
            raise DeviceError("input batch contains NaN or Inf; check the preprocessing")
        batch = np.ascontiguousarray(batch)
        if len(batch) == 0:
            return np.zeros((0, self.artifact.dim), np.float32)
        out = np.concatenate([self._run(batch[i:i + self.batch_size]) for i in range(0, len(batch), self.batch_size)])
        return out.astype(np.float32, copy=False)


def create_runner(export_dir: str | Path, runtime: str = "onnxruntime", **kwargs) -> Runner:
    """A runner for the artifact in ``export_dir`` that ``runtime`` executes."""
    if runtime not in RUNNERS:
        raise DeviceError(f"unknown runtime {runtime!r}; choose one of: {', '.join(sorted(RUNNERS))}")
    cls = RUNNERS[runtime]
    return cls(open_artifact(export_dir, cls.artifact_format), **kwargs)

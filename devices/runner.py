"""Runners: ``with create_runner(export_dir, "onnxruntime") as r: emb = r.embed(batch)``; numpy in,
numpy out.

The input batch is preprocessed float32 [N, C, H, W] as the manifest's input spec says; the output is
float32 [N, dim]. numpy and the standard library only: each runner imports its runtime lazily, in
``open()``, so this core can be copied to a device that has only numpy and that runtime.

A runner class declares:

- ``name``: the ``--runtime`` name; ``formats``: the manifest formats it runs (e.g. ``("onnx", "ort")``);
- ``label``: ``"measured"`` (the real runtime) or ``"emulated"`` (e.g. the Core ML reference
  interpreter on Linux);
- ``extra``: the pip extra that installs its runtime;
- ``unavailable()``: why it cannot run on this host (``None`` when it can);
- ``settings``: keyword options (threads, provider, ...), given to the constructor and recorded
  with every result.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

import numpy as np

from devices.artifact import Artifact, NoSuchArtifact, open_artifact
from devices.errors import DeviceError

RUNNERS: dict[str, Callable[..., "Runner"]] = {}


def register_runner(name: str):
    def deco(cls):
        if name in RUNNERS:
            raise ValueError(f"runner {name!r} is already registered")
        cls.name = name
        RUNNERS[name] = cls
        return cls

    return deco


def module_missing(*modules: str, extra: str) -> str | None:
    """A reason naming the pip extra when one of ``modules`` cannot be imported here, else None."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} is not installed (pip install {' '.join(missing)}; with hetero: pip install 'hetero[{extra}]')"
    return None


class Runner:
    """Base class: validates batches, splits them into ``batch_size`` chunks, checks outputs."""

    name = "base"
    formats: tuple[str, ...] = ()
    label = "measured"
    extra = ""

    def __init__(self, artifact: Artifact, batch_size: int = 256, **settings: Any):
        if batch_size < 1:
            raise DeviceError(f"batch size must be >= 1, got {batch_size}")
        self.artifact = artifact
        self.batch_size = batch_size
        unknown = sorted(set(settings) - set(self.setting_names()))
        if unknown:
            raise DeviceError(f"runtime {self.name} has no setting {', '.join(unknown)}; "
                              f"it takes: {', '.join(self.setting_names()) or 'none'}")
        self.settings = settings

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        return ()

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this runner cannot run on this host, or None if it can."""
        return None

    @classmethod
    def unavailable_with(cls, settings: dict[str, Any]) -> str | None:
        """Why this runner cannot run here with ``settings`` (e.g. ``device=cuda`` without a GPU), or None."""
        return cls.unavailable()

    def __enter__(self) -> "Runner":
        why = self.unavailable()
        if why:
            raise DeviceError(f"runtime {self.name} cannot run here: {why}")
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:
        pass

    def _run(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - overridden
        """One forward pass of a valid, contiguous float32 batch (no checks: the latency harness times this)."""
        raise NotImplementedError

    @property
    def runtime(self) -> str:
        """The runtime and its version, e.g. ``onnxruntime 1.32.0 CPUExecutionProvider``."""
        return self.name

    def versions(self) -> dict[str, str]:
        """Library versions of the runtime, for results."""
        return {}

    def check_batch(self, batch: Any) -> np.ndarray:
        """The batch as contiguous float32 [N, C, H, W], or a one-line error."""
        batch = np.asarray(batch)
        want = self.artifact.input_shape
        if batch.ndim != 1 + len(want) or tuple(batch.shape[1:]) != want:
            raise DeviceError(f"input batch has shape {tuple(batch.shape)}, the model takes [N, {', '.join(map(str, want))}]; "
                              "preprocess images as the manifest says")
        if not (np.issubdtype(batch.dtype, np.floating) or np.issubdtype(batch.dtype, np.integer)):
            raise DeviceError(f"input batch has dtype {batch.dtype}; pass float32 preprocessed images")
        if batch.dtype != np.float32:
            batch = batch.astype(np.float32)
        if not np.isfinite(batch).all():
            raise DeviceError("input batch contains NaN or Inf; check the preprocessing")
        return np.ascontiguousarray(batch)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """The runtime's bare pass over one batch, unchecked and whatever its output shape: for timing
        loops, on a batch checked once beforehand (:meth:`check_batch`). Use :meth:`embed` otherwise."""
        return self._run(batch)

    def embed(self, batch: Any) -> np.ndarray:
        batch = self.check_batch(batch)
        if len(batch) == 0:
            return np.zeros((0, self.artifact.dim), np.float32)
        out = np.concatenate([self._run(batch[i:i + self.batch_size]) for i in range(0, len(batch), self.batch_size)])
        out = np.asarray(out, dtype=np.float32)
        if out.shape != (len(batch), self.artifact.dim):
            raise DeviceError(f"{self.runtime} returned shape {out.shape}, expected ({len(batch)}, {self.artifact.dim}); "
                              "the artifact does not match its manifest, re-run `hetero export`")
        return out


def runner_class(runtime: str):
    if runtime not in RUNNERS:
        raise DeviceError(f"unknown runtime {runtime!r}; choose one of: {', '.join(sorted(RUNNERS))}")
    return RUNNERS[runtime]


def create_runner(export_dir: str | Path, runtime: str = "onnxruntime", *, precision: str | None = None,
                  fmt: str | None = None, entry: dict[str, Any] | None = None, **kwargs) -> Runner:
    """A runner for the artifact in ``export_dir`` that ``runtime`` executes: the first artifact of
    one of its formats (or ``fmt``), of ``precision`` if given. Its sha256 is checked.

    With ``entry`` (a manifest artifact entry), ``export_dir`` is instead one artifact file that no
    manifest lists yet: an export checking what it has just written (see :func:`file_artifact`)."""
    cls = runner_class(runtime)
    if entry is not None:
        art = file_artifact(export_dir, entry)
        if art.format not in cls.formats:
            raise DeviceError(f"runtime {runtime} runs {', '.join(cls.formats)} artifacts, not {art.format}")
        return cls(art, **kwargs)
    if hasattr(cls, "open_path"):  # runners of something other than an export dir (torch: a checkpoint)
        return cls(cls.open_path(export_dir), **kwargs)
    formats = (fmt,) if fmt else cls.formats
    if fmt and fmt not in cls.formats:
        raise DeviceError(f"runtime {runtime} runs {', '.join(cls.formats)} artifacts, not {fmt}")
    first: DeviceError | None = None
    for f in formats:
        try:
            return cls(open_artifact(export_dir, f, precision), **kwargs)
        except NoSuchArtifact as e:
            first = first or e
    assert first is not None
    raise first  # names the runtime's main format and what the export has


def file_artifact(path: str | Path, entry: dict[str, Any]) -> Artifact:
    """An artifact file described by ``entry`` alone, before any manifest lists it. Nothing is checked
    against a manifest (no sha256: whoever calls this has just made the file); the entry gives the
    ``format``, the ``input`` (name, shape ``[batch, C, H, W]``) and the ``output`` (name, shape
    ``[batch, dim]``), plus whatever the runner reads (TensorRT: ``profile``)."""
    path = Path(path)
    if not path.exists():
        raise DeviceError(f"{path} does not exist; nothing to run")
    try:
        dim = entry["output"]["shape"][-1]
        shape = entry["input"]["shape"]
        ok = isinstance(entry["format"], str) and isinstance(entry["output"]["name"], str) and \
            isinstance(dim, int) and dim >= 1 and len(shape) >= 2 and all(isinstance(n, int) and n >= 1 for n in shape[1:])
    except (KeyError, IndexError, TypeError):
        ok = False
    if not ok:
        raise DeviceError(f"the entry given for {path.name} lacks a format, an input shape [batch, sizes...] or an "
                          "output name and shape [batch, dim]; describe the file as a manifest entry does")
    return Artifact(path, entry, {"dim": dim})

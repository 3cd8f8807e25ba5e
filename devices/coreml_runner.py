"""Core ML runners for ``.mlpackage`` artifacts (manifest format ``coreml``):

* ``coreml-interp``: hetero's Core ML reference interpreter (:mod:`devices.coreml_interp`, numpy),
  anywhere coremltools installs. Its results are labelled ``emulated``: the package's program run
  op by op on this CPU, FP16 programs in emulated FP16, not Core ML on a device.
* ``coreml``: Core ML itself through ``coremltools.models.MLModel.predict``, macOS only, labelled
  ``measured``.

Both take the preprocessed float32 [N, C, H, W] batch like every runner and split it into the
package's enumerated batch sizes (the largest that fits first; a remainder smaller than every size
is padded with zero rows, which are dropped). A package with an image input (``coreml.image_input``)
takes 8-bit pixels and does the preprocessing inside: the runners map the preprocessed batch back
to pixel values with the manifest's ``scale`` and ``bias`` (``pixel = (x - bias) / scale``, per channel), exact
for batches made from 8-bit images. The interpreter gets those values unrounded; Core ML gets
8-bit images (rounded and clipped to 0..255).

The module imports neither torch nor hetero; coremltools is imported in ``open()``.
"""
from __future__ import annotations

import platform
import sys

import numpy as np

from devices.artifact import Artifact
from devices.coreml_interp import Interpreter, batch_chunks, coremltools_module, input_specs, pixels_from_preprocessed
from devices.errors import DeviceError
from devices.runner import Runner, module_missing, register_runner

COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")


def _image_params(artifact: Artifact) -> tuple[float | list[float], list[float]] | None:
    """(scale, bias) of an image-input artifact from its manifest entry (scale: one number, or one per
    channel where the package multiplies per channel after its ImageType), None for a tensor input."""
    entry = artifact.entry
    if entry.get("input_kind", "tensor") != "image":
        return None
    inp = entry.get("input") or {}
    if inp.get("scale") is None or inp.get("bias") is None:
        raise DeviceError(f"the manifest entry of {artifact.path.name} has an image input without its scale and bias; "
                          "re-run `hetero export`")
    scale = inp["scale"]
    return ([float(v) for v in scale] if isinstance(scale, (list, tuple)) else float(scale)), [float(b) for b in inp["bias"]]


@register_runner("coreml-interp")
class CoreMLInterpRunner(Runner):
    """hetero's numpy Core ML interpreter (emulated). Setting ``threads``: numpy's BLAS threads while
    it runs (default 1, see :class:`devices.coreml_interp.Interpreter`)."""

    formats = ("coreml",)
    label = "emulated"
    extra = "coreml"

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        return ("threads",)

    @classmethod
    def unavailable(cls) -> str | None:
        return module_missing("coremltools", extra="coreml")

    def open(self) -> None:
        threads = self.settings.get("threads")
        if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
            raise DeviceError(f"threads must be a whole number >= 1, got {threads!r}")
        self._interp = Interpreter.from_package(self.artifact.path, blas_threads=int(threads) if threads else 1)
        self._version = str(coremltools_module().__version__)
        self._image = _image_params(self.artifact)
        names_in, names_out = self._interp.input_names, self._interp.output_names
        want_in, want_out = self.artifact.entry["input"]["name"], self.artifact.entry["output"]["name"]
        if names_in != [want_in] or want_out not in names_out:
            raise DeviceError(f"{self.artifact.path.name} takes {names_in} and gives {names_out}, its manifest entry says "
                              f"{want_in} -> {want_out}; re-run `hetero export`")
        self._input, self._output = want_in, want_out

    def close(self) -> None:
        self._interp = None

    @property
    def runtime(self) -> str:
        return f"hetero Core ML interpreter (numpy, emulated) on coremltools {getattr(self, '_version', '?')}"

    def versions(self) -> dict[str, str]:
        return {"coremltools": getattr(self, "_version", "?"), "numpy": np.__version__}

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if getattr(self, "_interp", None) is None:
            raise DeviceError("runner is not open; use it as a context manager: `with create_runner(...) as r:`")
        if self._image is not None:
            batch = pixels_from_preprocessed(batch, *self._image)
        return self._interp.run_batched(batch, self._input, self._output)


@register_runner("coreml")
class CoreMLRunner(Runner):
    """Core ML on macOS (``MLModel(path, compute_units=...).predict``), labelled measured. Setting
    ``compute_units``: ALL (default), CPU_ONLY, CPU_AND_GPU or CPU_AND_NE.

    Untested: Core ML exists only on macOS and hetero is developed and tested on Linux, where this
    runner reports itself unavailable (its test skips there). The code follows coremltools 9's
    documented ``MLModel`` API; check it on a Mac before relying on it."""

    formats = ("coreml",)
    label = "measured"
    extra = "coreml"

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        return ("compute_units",)

    @classmethod
    def unavailable(cls) -> str | None:
        if sys.platform != "darwin":
            return f"Core ML runs only on macOS (this is {platform.system() or sys.platform})"
        return module_missing("coremltools", extra="coreml")

    def open(self) -> None:  # pragma: no cover - macOS only
        ct = coremltools_module()
        units = str(self.settings.get("compute_units", "ALL")).upper()
        if units not in COMPUTE_UNITS:
            raise DeviceError(f"unknown compute_units {units!r}; choose one of: {', '.join(COMPUTE_UNITS)}")
        try:
            self._model = ct.models.MLModel(str(self.artifact.path), compute_units=getattr(ct.ComputeUnit, units))
        except Exception as e:
            first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
            raise DeviceError(f"Core ML cannot load {self.artifact.path} ({first}); re-run `hetero export`") from None
        spec = input_specs(self._model.get_spec())
        self._input, self._output = self.artifact.entry["input"]["name"], self.artifact.entry["output"]["name"]
        if list(spec) != [self._input]:
            raise DeviceError(f"{self.artifact.path.name} takes {list(spec)}, its manifest entry says {self._input}; "
                              "re-run `hetero export`")
        self._spec = spec[self._input]
        self._image = _image_params(self.artifact)
        if self._image is not None:
            try:
                from PIL import Image  # optional on a device: only for an image-input package
            except ImportError:
                raise DeviceError("an image-input Core ML package needs Pillow (pip install pillow)") from None
            self._pil = Image
        self._units, self._version = units, str(ct.__version__)

    def close(self) -> None:
        self._model = None

    @property
    def runtime(self) -> str:
        mac = platform.mac_ver()[0] or "?"
        return (f"Core ML (macOS {mac}, coremltools {getattr(self, '_version', '?')}, compute units "
                f"{getattr(self, '_units', self.settings.get('compute_units', 'ALL'))})")

    def versions(self) -> dict[str, str]:
        return {"coremltools": getattr(self, "_version", "?"), "macos": platform.mac_ver()[0] or "?"}

    def _run(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - macOS only
        if getattr(self, "_model", None) is None:
            raise DeviceError("runner is not open; use it as a context manager: `with create_runner(...) as r:`")
        if self._image is not None:  # batch 1 images: 8-bit pixels, one predict per image
            pixels = np.clip(np.rint(pixels_from_preprocessed(batch, *self._image)), 0, 255).astype(np.uint8)
            mode = "L" if pixels.shape[1] == 1 else "RGB"
            outs = []
            for p in pixels:
                img = self._pil.fromarray(p[0] if mode == "L" else p.transpose(1, 2, 0), mode=mode)
                outs.append(np.asarray(self._model.predict({self._input: img})[self._output], np.float32).reshape(1, -1))
            return np.concatenate(outs)
        sizes = self._spec.batch_sizes if self._spec.shapes is not None else None
        parts = []
        for start, rows, size in batch_chunks(len(batch), sizes):
            xb = batch[start:start + rows]
            if size > rows:
                xb = np.concatenate([xb, np.zeros((size - rows, *batch.shape[1:]), batch.dtype)])
            out = self._model.predict({self._input: xb})[self._output]
            parts.append(np.asarray(out, np.float32)[:rows])
        return np.concatenate(parts)

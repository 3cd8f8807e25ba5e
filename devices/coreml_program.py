"""A saved Core ML ``.mlpackage`` read for the reference interpreter (:mod:`devices.coreml_interp`):
its protobuf spec, its MIL ``Program`` with the weights from the package's weight file, what its
inputs accept, the few facts about MIL ops and vars that the interpreter asks at load, and
:class:`Node`, one op as the interpreter runs it, with :func:`arg` and :func:`ints` to read the
arguments a kernel gets.

coremltools reads the package (``ct.utils.load_spec``, ``milproto.load``; no Core ML framework,
so it works on Linux). It is optional and slow to import, so it is imported lazily and quietly
(no warnings or log lines), and a missing one is a one-line :class:`DeviceError` naming the pip
extra. numpy only otherwise, like the rest of the device core.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from devices.errors import DeviceError

WEIGHTS_DIR = Path("Data") / "com.apple.CoreML" / "weights"
FIX = "run it with the coreml runtime on macOS, or export another format"


def first_line(e: BaseException) -> str:
    """An exception's first line (at most 300 characters), for one-line errors."""
    return ((str(e).strip().splitlines() or [e.__class__.__name__])[0])[:300]


# ----------------------------------------------------------------------------------------------
# coremltools


@contextlib.contextmanager
def _quiet():
    """No warnings or log lines from coremltools (it logs about untested torch/sklearn versions and
    the macOS-only runtime on import)."""
    log = logging.getLogger("coremltools")
    keep = log.handlers[:], log.propagate, log.level
    log.handlers[:] = [logging.NullHandler()]
    log.propagate = False
    out = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.handlers[:], log.propagate = keep[0], keep[1]
        log.setLevel(keep[2])


def coremltools_module():
    """coremltools, imported quietly, or a DeviceError naming the pip extra."""
    try:
        with _quiet():
            import coremltools  # optional and slow to import: only when a package is read
    except ImportError:
        raise DeviceError("coremltools is not installed (pip install 'hetero[coreml]'); the Core ML interpreter "
                          "reads packages with it") from None
    return coremltools


def coremltools_version() -> str:
    return str(coremltools_module().__version__)


# ----------------------------------------------------------------------------------------------
# the package: spec and program


def _package(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise DeviceError(f"{p} does not exist; pass a .mlpackage written by `hetero export`")
    if p.is_dir() and not (p / "Manifest.json").is_file():
        raise DeviceError(f"{p} is not a Core ML package (no Manifest.json in it); pass a .mlpackage")
    return p


def load_spec(path: str | Path):
    """The package's protobuf spec (``Model_pb2.Model``)."""
    p = _package(path)
    ct = coremltools_module()
    try:
        with _quiet():
            return ct.utils.load_spec(str(p))
    except Exception as e:
        raise DeviceError(f"coremltools cannot read {p} ({first_line(e)}); re-run `hetero export`") from None


def load_program(path: str | Path, spec=None):
    """The package's MIL ``Program`` (weights read from the package's weight file)."""
    p = _package(path)
    spec = load_spec(p) if spec is None else spec
    if spec.WhichOneof("Type") != "mlProgram":
        raise DeviceError(f"{p} is a {spec.WhichOneof('Type')} model, not an ML Program; the Core ML interpreter runs "
                          "ML Programs only (convert with convert_to='mlprogram')")
    coremltools_module()
    from coremltools.converters.mil.frontend import milproto  # optional coremltools, checked just above

    try:
        with _quiet():
            return milproto.load.load(spec, spec.specificationVersion, str(p / WEIGHTS_DIR))
    except Exception as e:
        raise DeviceError(f"coremltools cannot load the program of {p} ({first_line(e)}); re-run `hetero export`") from None


# ----------------------------------------------------------------------------------------------
# the package's inputs


@dataclass(frozen=True)
class InputSpec:
    """What a package's input accepts, from its spec: allowed shapes (None: any) and its kind."""

    name: str
    shapes: tuple[tuple[int, ...], ...] | None
    kind: str = "tensor"  # "tensor" or "image"
    color_layout: str | None = None  # image: "G" (grayscale), "RGB", "BGR"

    @property
    def batch_sizes(self) -> tuple[int, ...] | None:
        """The allowed batch sizes when the shapes differ in their first dimension only."""
        if not self.shapes or len({s[1:] for s in self.shapes}) != 1:
            return None
        return tuple(sorted({s[0] for s in self.shapes}))


def input_specs(spec) -> dict[str, InputSpec]:
    """The inputs of a spec with their allowed shapes: enumerated shapes, the fixed shape, or
    None (a shape range: anything the program accepts)."""
    out: dict[str, InputSpec] = {}
    for d in spec.description.input:
        kind = d.type.WhichOneof("Type")
        if kind == "imageType":
            it = d.type.imageType
            # optional coremltools, already imported: the spec came from it
            from coremltools.proto.FeatureTypes_pb2 import ImageFeatureType

            layout = {ImageFeatureType.GRAYSCALE: "G", ImageFeatureType.RGB: "RGB",
                      ImageFeatureType.BGR: "BGR"}.get(it.colorSpace, str(it.colorSpace))
            c = 1 if layout == "G" else 3
            sizes = [(int(s.height), int(s.width)) for s in it.enumeratedSizes.sizes] or [(int(it.height), int(it.width))]
            ranged = it.WhichOneof("SizeFlexibility") == "imageSizeRange"
            out[d.name] = InputSpec(d.name, None if ranged else tuple((1, c, h, w) for h, w in sizes), "image", layout)
        elif kind == "multiArrayType":
            arr = d.type.multiArrayType
            if arr.WhichOneof("ShapeFlexibility") == "shapeRange":
                shapes = None
            else:
                shapes = tuple(tuple(int(v) for v in s.shape) for s in arr.enumeratedShapes.shapes) or (
                    tuple(int(v) for v in arr.shape),)
            out[d.name] = InputSpec(d.name, shapes)
        else:
            raise DeviceError(f"the Core ML interpreter takes multi-array and image inputs, not {kind} (input "
                              f"'{d.name}'); {FIX}")
    return out


def pixels_from_preprocessed(x: np.ndarray, scale: float | list[float] | tuple[float, ...],
                             bias: list[float] | tuple[float, ...]) -> np.ndarray:
    """Pixel values (float, 0..255 for images that came from 8-bit pixels) from a preprocessed batch
    ``x = pixel * scale + bias``: the inverse of an image input's preprocessing. ``scale`` is one
    number (a Core ML ImageType's) or one per channel (an ImageType followed by a per-channel
    multiply, as hetero exports per-channel stds). Not rounded or clipped: a batch made from 8-bit
    images maps back to its pixels (up to float error)."""
    b = np.asarray(bias, np.float64).reshape(1, -1, 1, 1)
    s = np.asarray(scale, np.float64).reshape(1, -1, 1, 1)
    return ((np.asarray(x, np.float64) - b) / s).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# MIL ops and vars


def all_ops(block) -> Iterator[Any]:
    """Every op of a MIL block (a function), nested blocks included."""
    for op in block.operations:
        yield op
        for b in op.blocks:
            yield from all_ops(b)


def np_dtype(var):
    """The numpy dtype of a MIL var's elements (None for strings and other non-numeric types)."""
    # optional coremltools, already imported: the program came from it
    from coremltools.converters.mil.mil import types

    try:
        t = types.nptype_from_builtin(var.dtype)
    except Exception:
        return None
    t = np.dtype(t)
    return None if t.kind in "USO" else t


def var_rank(var) -> int | None:
    """A MIL var's rank (None if it has none, e.g. a list)."""
    try:
        return int(var.rank)
    except Exception:
        return None


def const_input(op, key: str) -> Any:
    """The constant value of an op's input ``key`` (None: absent, a list, or not a constant)."""
    v = op.inputs.get(key)
    return None if v is None or isinstance(v, (list, tuple)) else v.val


@dataclass
class Node:
    """One op of the program, as the interpreter runs it: what a kernel gets besides its arguments."""

    name: str
    op_type: str
    out_dtypes: tuple[Any, ...]
    cache: dict[str, Any] = field(default_factory=dict)  # e.g. a conv's transposed weights, buffers
    shared: dict[str, Any] = field(default_factory=dict)  # one dict for all nodes of an interpreter


def arg(a: dict, key: str, default: Any = None) -> Any:
    """A kernel's argument ``key``, or ``default`` (MIL's) when the op does not give it."""
    v = a.get(key)
    return default if v is None else v


def ints(v) -> list[int]:
    """An argument's values as Python ints (axes, shapes, strides)."""
    return [int(i) for i in np.asarray(v).reshape(-1)]

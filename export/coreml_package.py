"""A saved Core ML package, as :mod:`export.coreml` writes and records it: the model metadata it
carries, its spec read back and checked (input, batch sizes, iOS 16, metadata), its ops and weights
summarised, its fidelity emulated by hetero's Core ML interpreter, and its manifest entry.

``MLModel.predict`` needs macOS, so fidelity is measured with hetero's Core ML reference interpreter
(:mod:`devices.coreml_interp`, numpy: the saved package's program run op by op, FP16 programs in
emulated FP16) and labelled ``emulated``, never ``measured``. An image-input package is fed the check
inputs mapped back to pixel values (``(x - bias) / scale``, per channel, unrounded). A package whose program
has an op the interpreter lacks keeps ``pending`` fidelity, with the reason.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from devices.errors import DeviceError
from export.formats import (
    INPUT_NAME,
    OUTPUT_NAME,
    ExportJob,
    FormatBreaksModel,
    artifact_entry,
    artifact_metadata,
    check_not_broken,
    io_spec,
    measured_fidelity,
    pending_fidelity,
    runner_embeddings,
)
from hetero.errors import HeteroError, require
from hetero.version import __version__

DEPLOYMENT_TARGET = "iOS16"
MIN_SPEC_VERSION = 7  # the Core ML specification version of iOS 16 / macOS 13
WEIGHT_FILE = Path("Data") / "com.apple.CoreML" / "weights" / "weight.bin"
PENDING = "Core ML runs only on macOS and hetero's Core ML interpreter cannot run this package"
OUTPUT_DESC = "L2-normalised embedding"
DEFAULT_LICENSE = "Apache-2.0"


class _Records(logging.Handler):
    """Keeps the messages of the "coremltools" logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def quiet_coremltools():
    """No warnings, progress bars or log lines from coremltools (which logs to the "coremltools"
    logger); its messages are kept, to name the op that failed to convert."""
    log = logging.getLogger("coremltools")
    keep = log.handlers[:], log.propagate, log.level
    rec = _Records()
    log.handlers[:] = [rec]
    log.propagate = False
    log.setLevel(logging.WARNING)
    out = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            warnings.simplefilter("ignore")
            yield rec
    finally:
        log.handlers[:] = keep[0]
        log.propagate = keep[1]
        log.setLevel(keep[2])


def import_coremltools():
    """coremltools, imported quietly (it logs about untested torch/sklearn versions and the
    macOS-only runtime on import)."""
    with quiet_coremltools():
        return require("coremltools", "coreml")


def write_metadata(ml, job: ExportJob, sizes: tuple[int, ...], image: dict[str, Any] | None) -> None:
    """Model metadata: who made it, what it is, which cloud space its embeddings live in."""
    ckpt = job.ckpt
    c, h, w = ckpt.input_shape
    lic = (getattr(ckpt, "info", None) or {}).get("license") or (getattr(ckpt, "config", None) or {}).get("license")
    ml.author = "hetero"
    ml.version = __version__
    ml.license = str(lic or DEFAULT_LICENSE)
    ml.short_description = (f"hetero {ckpt.role} embedding model ({ckpt.spec.dim}-d), compatible with cloud space "
                            f"{ckpt.space[:12]}")
    if image:
        layout = (f"image {image['color_layout']} {w}x{h}, 8-bit pixels, preprocessing inside the model, batch 1 "
                  f"({image['normalisation']})")
    else:
        layout = f"NCHW float32 [batch, {c}, {h}, {w}], preprocessed (see preprocessing)"
    common = {k: v for k, v in artifact_metadata(job, "").items() if k != "hetero.precision"}  # compressed later
    meta = {
        **common,
        "hetero.input_layout": layout,
        "hetero.batch_sizes": json.dumps(list(sizes)),
        "hetero.output": OUTPUT_DESC,
    }
    for k, v in meta.items():
        ml.user_defined_metadata[k] = v
    ml.input_description[INPUT_NAME] = layout
    ml.output_description[OUTPUT_NAME] = f"{OUTPUT_DESC}, float32 [batch, {ckpt.spec.dim}]"


def read_spec(path: Path):
    """The saved package's protobuf spec (the model is not loaded: no Core ML needed)."""
    ct = import_coremltools()
    with quiet_coremltools():
        return ct.models.MLModel(str(path), skip_model_load=True).get_spec()


def _walk(spec):
    """Every MIL operation of the saved program, nested blocks included."""
    def block_ops(block):
        for op in block.operations:
            yield op
            for b in op.blocks:
                yield from block_ops(b)

    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            yield from block_ops(block)


def program_ops(spec) -> list[str]:
    return sorted({op.type for op in _walk(spec)})


def _numel(t) -> int:
    n = 1
    for d in t.dimensions:
        n *= int(d.constant.size) if d.WhichOneof("dimension") == "constant" else 1
    return n


def weight_summary(spec) -> dict[str, Any]:
    """Float tensors stored in the program: compressed (``constexpr_*`` ops) and left as plain
    ``const``, with their element counts and storage types."""
    import_coremltools()
    from coremltools.proto import MIL_pb2  # optional coremltools, imported just above

    name = MIL_pb2.DataType.Name
    out: dict[str, Any] = {"compressed": {"tensors": 0, "params": 0, "ops": []},
                           "uncompressed": {"tensors": 0, "params": 0, "dtypes": {}}}
    for op in _walk(spec):
        if not op.outputs:
            continue
        t = op.outputs[0].type.tensorType
        if op.type.startswith("constexpr_"):
            out["compressed"]["tensors"] += 1
            out["compressed"]["params"] += _numel(t)
            if op.type not in out["compressed"]["ops"]:
                out["compressed"]["ops"].append(op.type)
        elif op.type == "const" and t.rank >= 1 and name(t.dataType) in ("FLOAT32", "FLOAT16"):
            out["uncompressed"]["tensors"] += 1
            out["uncompressed"]["params"] += _numel(t)
            d = name(t.dataType).lower()
            out["uncompressed"]["dtypes"][d] = out["uncompressed"]["dtypes"].get(d, 0) + 1
    return out


def verify_package(path: Path, job: ExportJob, fmt: str, sizes: list[int], kind: str):
    """Reload the saved spec: input name and shapes, output name, spec version, metadata."""
    spec = read_spec(path)
    from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType  # optional coremltools, imported by read_spec

    FLOAT32 = ArrayFeatureType.FLOAT32
    c, h, w = job.ckpt.input_shape
    d = spec.description
    why = None
    if spec.specificationVersion < MIN_SPEC_VERSION:
        why = f"specification version {spec.specificationVersion} < {MIN_SPEC_VERSION} ({DEPLOYMENT_TARGET})"
    elif spec.WhichOneof("Type") != "mlProgram":
        why = f"it is a {spec.WhichOneof('Type')}, not an ML Program"
    elif [i.name for i in d.input] != [INPUT_NAME] or [o.name for o in d.output] != [OUTPUT_NAME]:
        why = f"its inputs/outputs are {[i.name for i in d.input]}/{[o.name for o in d.output]}"
    elif d.output[0].type.multiArrayType.dataType != FLOAT32 or (
            kind == "tensor" and d.input[0].type.multiArrayType.dataType != FLOAT32):
        why = "its input or output is not float32"
    elif kind == "image":
        it = d.input[0].type.imageType
        if d.input[0].type.WhichOneof("Type") != "imageType" or (it.width, it.height) != (w, h):
            why = "its input is not the expected image"
    else:
        arr = d.input[0].type.multiArrayType
        got = [list(s.shape) for s in arr.enumeratedShapes.shapes] or [list(arr.shape)]
        if d.input[0].type.WhichOneof("Type") != "multiArrayType" or got != [[b, c, h, w] for b in sizes]:
            why = f"its input shapes are {got}, expected batch sizes {sizes}"
    meta = d.metadata
    if why is None and (meta.author != "hetero" or not meta.versionString or not meta.shortDescription
                        or meta.userDefined.get("hetero.space_fingerprint") != job.ckpt.space):
        why = "its metadata is missing"
    if why:
        raise HeteroError(f"the saved {fmt} package {path.name} fails its check: {why}; report the model")
    return spec


def _weight_bytes(path: Path) -> int | None:
    f = path / WEIGHT_FILE
    return f.stat().st_size if f.is_file() else None


def emulated_fidelity(job: ExportJob, path: Path, kind: str, image: dict[str, Any] | None) -> dict[str, Any]:
    """Fidelity of the saved package vs torch on ``job.check_inputs``, run by the ``coreml-interp``
    runner, hetero's Core ML interpreter (label ``emulated``): the runner verify uses. ``pending``
    with the reason if the interpreter cannot run it. An artifact that breaks the model (NaN/Inf
    outputs, mean cosine < 0.9) raises FormatBreaksModel."""
    fmt = job.current_format or "coreml"
    inp, _ = io_spec(job)
    entry: dict[str, Any] = {"format": "coreml", "input_kind": kind}
    if kind == "image":  # the runner maps the preprocessed check inputs back to pixel values
        entry["input"] = {**inp, "scale": image["pixel_scale"], "bias": image["pixel_bias"]}
    try:
        got, runtime = runner_embeddings(job, path, "coreml-interp", entry)
    except DeviceError as e:
        return pending_fidelity(f"{PENDING}: {e}")
    bad = int((~np.isfinite(got)).any(axis=1).sum())
    if bad:
        raise FormatBreaksModel(f"{fmt} breaks this model: {bad} of {len(got)} check inputs give NaN or Inf embeddings "
                                "in the Core ML interpreter (emulated; in FP16 an activation above 65504 overflows); "
                                "do not ship it, use another format")
    fid = measured_fidelity(job, got, runtime=runtime, label="emulated")
    if kind == "image":
        fid["input_note"] = "check inputs mapped back to pixel values (x - bias) / scale, not rounded to 8 bits"
    check_not_broken(fmt, fid)
    return fid


def package_entry(job: ExportJob, path: Path, *, fmt: str, precision: str, made_from: str, compute_precision: str,
                  sizes: list[int], kind: str, image: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    """The manifest entry of the saved package at ``path``, once it passes its check, with its
    emulated fidelity; ``extra``: more fields for the entry."""
    ct = import_coremltools()
    spec = verify_package(path, job, fmt, sizes, kind)
    e = artifact_entry(job, path, fmt="coreml", precision=precision, made_from=made_from, runtime="coreml",
                       libraries={"coremltools": ct.__version__, "torch": torch.__version__},
                       fidelity=emulated_fidelity(job, path, kind, image), weight_bytes=_weight_bytes(path),
                       deployment_target=DEPLOYMENT_TARGET, batch_sizes=sizes,
                       spec_version=int(spec.specificationVersion), ops=program_ops(spec),
                       compute_precision=compute_precision, input_kind=kind, **extra)
    if kind == "image":
        c, h, w = job.ckpt.input_shape
        e["input"] = {"name": INPUT_NAME, "shape": [1, c, h, w], "dtype": "uint8 image",
                      "layout": f"image ({'Grayscale' if c == 1 else 'RGB'}), preprocessing inside the model",
                      "scale": image["pixel_scale"], "bias": image["pixel_bias"],
                      "normalisation": image["normalisation"]}
        e["image_type"] = {"scale": image["scale"], "bias": image["bias"], "channel_scale": image["channel_scale"]}
        e["output"] = io_spec(job, batch=1)[1]
    else:
        batch = f"batch in {tuple(sizes)}" if len(sizes) > 1 else sizes[0]
        e["input"], e["output"] = io_spec(job, batch=batch)
    return e

"""Core ML: ML Program packages (``.mlpackage``, iOS 16 / macOS 13 and later) converted by
coremltools from the traced torch model, and weight-compressed variants made from the FP32 package.

* ``coreml``: FP32 compute. ``coreml-fp16``: FP16 weights and compute, except the final L2
  normalisation, kept in FP32 as in ``onnx-fp16`` (in FP16 its eps of 1e-12 underflows to 0, so an
  all-zero projection gives 0/0 = NaN, and a sum of squares above 65504 overflows).
* ``coreml-int8w`` (8-bit linear symmetric per-channel weights), ``coreml-palette6`` and
  ``coreml-palette4`` (k-means palettisation, one 2^n-entry table per tensor: per-channel tables
  need iOS 18): made from the ``coreml`` package by ``coremltools.optimize.coreml``, which reads and
  writes packages without Core ML itself, so all three work on Linux. coremltools clusters FP32
  weights with scikit-learn's KMeans, so the palettised two also need scikit-learn. Tensors under
  the compressor's ``weight_threshold`` (coremltools' default 2048 elements; option
  ``coreml.weight_threshold``) stay FP32: the entry's ``compression`` says what was compressed.

The input is a float tensor with enumerated batch sizes (``job.batch_sizes``), never a RangeDim: a
flexible range keeps the model off the Neural Engine, enumerated shapes do not. With the option
``coreml.image_input`` the input is an image (batch 1) and the checkpoint's preprocessing is done
inside the model: by the ImageType's scale and bias, plus a per-channel multiply as the program's
first op where the stds differ per channel (ImageNet's), since an ImageType has one scale. Tracing
is ``torch.jit.trace``: ``torch.export`` programs are specialised to the example's batch and
coremltools 9 rejects enumerated batch sizes for them.

``MLModel.predict`` needs macOS, so fidelity is emulated by hetero's Core ML reference interpreter
and labelled ``emulated``, never ``measured`` (see :mod:`export.coreml_package`, which also writes
the metadata, checks the saved spec and makes the manifest entry).
"""
from __future__ import annotations

import contextlib
import importlib.util
import numbers
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.coreml_package import (
    DEFAULT_LICENSE,
    DEPLOYMENT_TARGET,
    MIN_SPEC_VERSION,
    OUTPUT_DESC,
    PENDING,
    WEIGHT_FILE,
    emulated_fidelity,
    import_coremltools,
    package_entry,
    program_ops,
    quiet_coremltools,
    read_spec,
    weight_summary,
    write_metadata,
)
from export.formats import INPUT_NAME, OUTPUT_NAME, ExportJob, FormatCannotExpress, register_exporter
from hetero.errors import HeteroError, require

# public names, those of export.coreml_package included: importable from export.coreml as before the split
__all__ = ["COMPRESSIONS", "DEFAULT_LICENSE", "DEPLOYMENT_TARGET", "FP32_TAIL_FROM", "MIN_SPEC_VERSION", "OUTPUT_DESC",
           "PENDING", "WEIGHT_FILE", "compress_coreml", "coreml_from_torch", "emulated_fidelity", "program_ops",
           "weight_summary"]

FP32_TAIL_FROM = "reduce_l2_norm"  # in coreml-fp16 this op and everything after it stay FP32


_PATCHED: list[bool] = []


def _patch_scalar_casts() -> None:
    """coremltools 9's converter of ``aten::Int`` folds a constant with ``int(x.val)``, which NumPy 2
    refuses for a one-element 1-D array ("only 0-dimensional arrays can be converted to Python
    scalars"): timm's MobileViT and EfficientViT trace such casts (their patch and head counts).
    Overridden (once) by the same conversion on the array's single element."""
    if _PATCHED:
        return
    from coremltools.converters.mil import Builder as mb  # optional coremltools, imported by the caller already
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs  # optional coremltools, as above
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op  # optional, as above

    @register_torch_op(torch_alias=["int"], override=True)
    def _int(context, node):
        (x,) = _get_inputs(context, node, expected=1)
        if x.shape and not all(d == 1 for d in x.shape):
            raise ValueError("input to cast must be either a scalar or a length 1 tensor")
        if x.can_be_folded_to_const():
            res = mb.const(val=int(np.asarray(x.val).reshape(-1)[0]), name=node.name)
        elif x.shape:
            res = mb.cast(x=mb.squeeze(x=x, name=node.name + "_item"), dtype="int32", name=node.name)
        else:
            res = mb.cast(x=x, dtype="int32", name=node.name)
        context.add(res, node.name)

    _PATCHED.append(True)


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [e.__class__.__name__])[0])[:300]


def _check() -> str | None:
    """Saving an ML Program needs coremltools' native weight-storage library (absent from some wheels)."""
    spec = importlib.util.find_spec("coremltools")
    dirs = list(spec.submodule_search_locations or []) if spec else []
    if any(next(Path(d).glob("libmilstoragepython*"), None) for d in dirs):
        return None
    return "coremltools has no native libmilstoragepython on this platform (it cannot write ML Programs)"


def _batch_sizes(job: ExportJob) -> tuple[int, ...]:
    sizes = job.batch_sizes
    ok = all(isinstance(b, numbers.Integral) and not isinstance(b, bool) and b >= 1 for b in sizes)
    if not sizes or not ok or len(set(sizes)) != len(sizes):
        raise HeteroError(f"option batch_sizes must be distinct positive integers, got {sizes!r}; e.g. (1, 8, 32)")
    return tuple(int(b) for b in sizes)


def _image_spec(job: ExportJob) -> dict[str, Any]:
    """The image input that reproduces the checkpoint's preprocessing ``x_c = (pixel / 255 - mean_c) / std_c``.

    A Core ML ImageType computes ``pixel * scale + bias_c``: one scale for all channels. With one std
    (grayscale, or equal stds) that is exact: scale = 1 / (255 std), bias_c = -mean_c / std. With
    per-channel stds (ImageNet's 0.229, 0.224, 0.225) the ImageType gives ``pixel / 255 - mean_c``
    (scale 1/255, bias -mean_c) and the program's first op multiplies channel c by ``1 / std_c``
    (``channel_scale``), so the package is exact too. ``pixel_scale``/``pixel_bias``: the whole map
    from pixels to the model's input (per channel), what a runner inverts to feed pixels."""
    prep = job.ckpt.preprocess
    layout = "G" if prep.channels == 1 else "RGB"
    pixel_scale = [1.0 / (255.0 * s) for s in prep.std]
    pixel_bias = [-m / s for m, s in zip(prep.mean, prep.std)]
    if len(set(prep.std)) == 1:
        return {"color_layout": layout, "scale": pixel_scale[0], "bias": pixel_bias, "channel_scale": None,
                "pixel_scale": pixel_scale[0], "pixel_bias": pixel_bias,
                "normalisation": "ImageType scale and bias (one std for every channel: exact)"}
    return {"color_layout": layout, "scale": 1.0 / 255.0, "bias": [-m for m in prep.mean],
            "channel_scale": [1.0 / s for s in prep.std], "pixel_scale": pixel_scale, "pixel_bias": pixel_bias,
            "normalisation": "per-channel std: the ImageType gives pixel / 255 - mean (its scale is one scalar for "
                             "all channels), then the program's first op multiplies channel c by 1 / std_c (exact)"}


class _ChannelScale(torch.nn.Module):
    """``model(x * channel_scale)``: the per-channel part of an image input's preprocessing, traced
    into the package as its first op (a Core ML ImageType has one scale for all channels)."""

    def __init__(self, model: torch.nn.Module, channel_scale: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("channel_scale", torch.tensor(channel_scale, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.channel_scale)


def _input_type(ct, job: ExportJob, sizes: tuple[int, ...], image: dict[str, Any] | None):
    c, h, w = job.ckpt.input_shape
    if image is not None:
        layout = ct.colorlayout.GRAYSCALE if image["color_layout"] == "G" else ct.colorlayout.RGB
        bias = image["bias"][0] if len(image["bias"]) == 1 else list(image["bias"])
        return ct.ImageType(name=INPUT_NAME, shape=(1, c, h, w), scale=image["scale"], bias=bias, color_layout=layout)
    # float32 I/O, also in coreml-fp16 (coremltools 9 makes FP16 models' I/O float16 unless told)
    if len(sizes) == 1:
        return ct.TensorType(name=INPUT_NAME, shape=(sizes[0], c, h, w), dtype=np.float32)
    # Enumerated batch sizes, not ct.RangeDim: a flexible range keeps the model off the Neural Engine
    return ct.TensorType(name=INPUT_NAME, shape=ct.EnumeratedShapes(shapes=[(b, c, h, w) for b in sizes],
                                                                     default=(sizes[0], c, h, w)), dtype=np.float32)


def _fp32_tail_selector():
    """FP16 op selector (True: FP16): False, keeping FP32, for the L2 normalisation and every op after it."""
    tail: dict[int, bool] = {}  # id(op) -> is it reduce_l2_norm or downstream of one

    def producers(op):
        for v in op.inputs.values():
            for var in (v if isinstance(v, (list, tuple)) else (v,)):
                p = getattr(var, "op", None)
                if p is not None:
                    yield p

    def in_tail(op) -> bool:
        stack = [op]
        while stack:  # iterative post-order: deep graphs exceed Python's recursion limit
            o = stack[-1]
            if id(o) in tail:
                stack.pop()
                continue
            todo = [p for p in producers(o) if id(p) not in tail]
            if todo and o.op_type != FP32_TAIL_FROM:
                stack.extend(todo)
                continue
            tail[id(o)] = o.op_type == FP32_TAIL_FROM or any(tail[id(p)] for p in producers(o))
            stack.pop()
        return tail[id(op)]

    return lambda op: not in_tail(op)


def _failed_op(messages: list[str]) -> tuple[str | None, str | None]:
    """The op coremltools was converting when it failed, and where, from its error log line."""
    kind = where = None
    for m in messages:  # "ERROR - converting 'fft_rfft2' op (located at: 'backbone/head'):"
        hit = re.search(r"converting '([^']+)' op \(located at: '([^']*)'\)", m)
        if hit:
            kind, where = hit.group(1), hit.group(2)
    return kind, where


def _unsupported(e: BaseException, messages: list[str], traced, fmt: str) -> FormatCannotExpress | None:
    """A FormatCannotExpress naming the torch op (and where it is) if ``e`` is coremltools refusing an op."""
    text = str(e)
    if not isinstance(e, NotImplementedError) and "not implemented" not in text and "Unsupported fx node" not in text:
        return None
    kind, where = _failed_op(messages)
    if kind is None:
        hit = re.search(r"op '([^']+)'|`([^`]+)` op|Unsupported fx node (\S+)", text)
        kind = next((g for g in hit.groups() if g), None) if hit else None
    if kind is None:
        return None
    full = kind
    with contextlib.suppress(Exception):  # the TorchScript name, e.g. aten::fft_rfft2
        full = next(n.kind() for n in traced.inlined_graph.nodes() if n.kind().split("::")[-1] == kind)
    node = f" (node {where or kind})"  # coremltools' location: module path / TorchScript value
    return FormatCannotExpress(f"{fmt} cannot express op '{full}'{node}: {_first_line(e).rstrip('.')}; "
                               "export another format or replace the op")


def coreml_from_torch(job: ExportJob, path: Path, *, fp16: bool, fmt: str) -> dict[str, Any]:
    """Trace ``job.ckpt.model`` and convert it to an ML Program saved at ``path``; returns what the
    manifest entry records about the input."""
    ct = import_coremltools()
    _patch_scalar_casts()
    ckpt = job.ckpt
    c, h, w = ckpt.input_shape
    sizes = _batch_sizes(job)
    image = _image_spec(job) if job.options.get("coreml.image_input") else None
    if image is not None:
        sizes = (1,)
    model = ckpt.model.eval()
    if image is not None and image["channel_scale"] is not None:
        model = _ChannelScale(model, image["channel_scale"]).eval()
    try:
        with quiet_coremltools(), warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always", torch.jit.TracerWarning)
            # batch 2, not 1: a batch-1 trace may bake the batch into reshapes and squeezes. No
            # check_trace: it re-runs the model only to warn; tracer warnings are recorded instead
            traced = torch.jit.trace(model, torch.zeros((2, c, h, w)), check_trace=False)
    except Exception as e:
        raise HeteroError(f"{fmt}: torch.jit.trace failed on the model: {_first_line(e)}; export another format") from None
    # e.g. data-dependent Python control flow, frozen into the trace: kept in the manifest entry
    trace_warnings = sorted({_first_line(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)})
    precision = (ct.transform.FP16ComputePrecision(op_selector=_fp32_tail_selector()) if fp16 else ct.precision.FLOAT32)
    with quiet_coremltools() as rec:
        try:
            ml = ct.convert(traced, inputs=[_input_type(ct, job, sizes, image)],
                            outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)],
                            convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                            compute_precision=precision, compute_units=ct.ComputeUnit.ALL)
        except Exception as e:
            cannot = _unsupported(e, rec.messages, traced, fmt)
            if cannot is not None:
                raise cannot from None
            kind, where = _failed_op(rec.messages)
            at = f" at op '{kind}' (node {where or kind})" if kind else ""
            raise HeteroError(f"{fmt}: coremltools could not convert the model{at}: {_first_line(e).rstrip('.')}; "
                              "export another format, or report the model") from None
        write_metadata(ml, job, sizes, image)
        try:
            ml.save(str(path))
        except Exception as e:
            raise HeteroError(f"{fmt}: coremltools could not save {path.name}: {_first_line(e)}") from None
    return {"input_kind": "image" if image else "tensor", "batch_sizes": list(sizes), "image": image,
            "trace_warnings": trace_warnings}


def _from_torch(job: ExportJob, fmt: str, fp16: bool) -> dict[str, Any]:
    suffix = ".fp16" if fp16 else ""
    path = job.out_dir / f"{job.name}{suffix}.mlpackage"
    info = coreml_from_torch(job, path, fp16=fp16, fmt=fmt)
    extra: dict[str, Any] = {"fp32_ops": f"{FP32_TAIL_FROM} and every op after it (the L2 normalisation)"} if fp16 else {}
    if info["trace_warnings"]:
        extra["trace_warnings"] = info["trace_warnings"]
    return package_entry(job, path, fmt=fmt, precision="fp16" if fp16 else "fp32",
                         made_from="torch (torch.jit.trace)", compute_precision="fp16" if fp16 else "fp32",
                         sizes=info["batch_sizes"], kind=info["input_kind"], image=info["image"],
                         converter="coremltools.convert (mlprogram)", **extra)


@register_exporter("coreml", "Core ML ML Program (.mlpackage) FP32, iOS 16+, enumerated batch sizes", None,
                   ("coremltools",), "coreml", check=_check)
def _export_coreml(job: ExportJob, source: Path | None) -> dict[str, Any]:
    return _from_torch(job, "coreml", fp16=False)


@register_exporter("coreml-fp16", "Core ML ML Program (.mlpackage) FP16 weights and compute, FP32 L2 normalisation",
                   None, ("coremltools",), "coreml", check=_check)
def _export_coreml_fp16(job: ExportJob, source: Path | None) -> dict[str, Any]:
    return _from_torch(job, "coreml-fp16", fp16=True)


# name -> (file suffix, manifest precision, coremltools.optimize.coreml call, its op config)
COMPRESSIONS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "coreml-int8w": ("int8w", "int8-weights", "linear_quantize_weights",
                     {"config": "OpLinearQuantizerConfig", "mode": "linear_symmetric", "dtype": "int8",
                      "granularity": "per_channel"}),
    "coreml-palette6": ("palette6", "palette6", "palettize_weights",
                        {"config": "OpPalettizerConfig", "mode": "kmeans", "nbits": 6, "granularity": "per_tensor"}),
    "coreml-palette4": ("palette4", "palette4", "palettize_weights",
                        {"config": "OpPalettizerConfig", "mode": "kmeans", "nbits": 4, "granularity": "per_tensor"}),
}


def compress_coreml(src: Path, dst: Path, fmt: str, weight_threshold: int | None = None) -> dict[str, Any]:
    """Compress the weights of the package ``src`` into ``dst`` with ``coremltools.optimize.coreml``."""
    ct = import_coremltools()
    cto = require("coremltools.optimize.coreml", "coreml")
    _, _, fn, cfg = COMPRESSIONS[fmt]
    kw = {k: v for k, v in cfg.items() if k != "config"}
    if weight_threshold is not None:
        if isinstance(weight_threshold, bool) or not isinstance(weight_threshold, int) or weight_threshold < 0:
            raise HeteroError(f"option coreml.weight_threshold must be a non-negative integer, got {weight_threshold!r}")
        kw["weight_threshold"] = weight_threshold
    with quiet_coremltools():
        try:
            op_config = getattr(cto, cfg["config"])(**kw)
            model = ct.models.MLModel(str(src), skip_model_load=True)
            out = getattr(cto, fn)(model, config=cto.OptimizationConfig(global_config=op_config))
            out.save(str(dst))
        except HeteroError:
            raise
        except Exception as e:
            raise HeteroError(f"{fmt}: coremltools.optimize.coreml.{fn} failed: {_first_line(e)}; "
                              "export coreml or coreml-fp16 instead, or report the model") from None
    return {"method": f"coremltools.optimize.coreml.{fn}", **cfg,
            "weight_threshold": kw.get("weight_threshold", op_config.weight_threshold)}


def _compressed(job: ExportJob, source: Path | None, fmt: str) -> dict[str, Any]:
    if source is None:
        raise FormatCannotExpress(f"{fmt} is made from the coreml package, which was not built (see coreml's reason)")
    suffix, precision, _, _ = COMPRESSIONS[fmt]
    path = job.out_dir / f"{job.name}.{suffix}.mlpackage"
    compression = compress_coreml(source, path, fmt, job.options.get("coreml.weight_threshold"))
    spec = read_spec(source)
    d = spec.description.input[0].type
    kind = "image" if d.WhichOneof("Type") == "imageType" else "tensor"
    sizes = [1]
    if kind == "tensor":
        arr = d.multiArrayType
        sizes = [int(s.shape[0]) for s in arr.enumeratedShapes.shapes] or [int(arr.shape[0])]
    summary = weight_summary(read_spec(path))
    compression.update(compressed=summary["compressed"], uncompressed=summary["uncompressed"])
    if summary["compressed"]["tensors"] == 0:
        compression["note"] = "no weight tensor reached the weight_threshold: nothing was compressed"
    image = _image_spec(job) if kind == "image" else None
    return package_entry(job, path, fmt=fmt, precision=precision, made_from=source.name, compute_precision="fp32",
                         sizes=sizes, kind=kind, image=image, compression=compression)


@register_exporter("coreml-int8w", "Core ML FP32 package with 8-bit linear (symmetric, per-channel) weights", "coreml",
                   ("coremltools",), "coreml", check=_check)
def _export_coreml_int8w(job: ExportJob, source: Path | None) -> dict[str, Any]:
    return _compressed(job, source, "coreml-int8w")


@register_exporter("coreml-palette6", "Core ML FP32 package with 6-bit k-means palettised weights", "coreml",
                   ("coremltools", "sklearn"), "coreml", check=_check)
def _export_coreml_palette6(job: ExportJob, source: Path | None) -> dict[str, Any]:
    return _compressed(job, source, "coreml-palette6")


@register_exporter("coreml-palette4", "Core ML FP32 package with 4-bit k-means palettised weights", "coreml",
                   ("coremltools", "sklearn"), "coreml", check=_check)
def _export_coreml_palette4(job: ExportJob, source: Path | None) -> dict[str, Any]:
    return _compressed(job, source, "coreml-palette4")

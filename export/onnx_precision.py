"""Reduced-precision ONNX made from the FP32 ONNX: FP16 (onnxruntime's converter) and INT8 (ONNX
Runtime static quantisation, QDQ, per-channel weights). Neither is a hand-written graph pass."""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from export.formats import INPUT_NAME, ExportJob, register_exporter
from export.onnx import onnx_entry
from hetero.errors import HeteroError, require

# Kept in FP32 in the FP16 model: the L2 normalisation and the reductions around it. In FP16 the
# normaliser's eps (1e-12) underflows to 0, so an all-zero embedding gives 0/0 = NaN.
FP16_BLOCK_LIST = ("ReduceL2", "ReduceSumSquare", "ReduceMean", "ReduceSum", "Sqrt", "Clip", "Max", "Div", "Expand",
                   "LpNormalization", "GlobalAveragePool")


def onnx_fp16_from_onnx(src: str | Path, dst: str | Path) -> Path:
    """FP16 weights and activations, FP32 inputs and outputs (``keep_io_types``); normalisation in
    FP32. Converted by onnxruntime's float16 converter (``onnxruntime.transformers.float16``).
    onnxconverter-common 1.16's converter was tried first: on simplified graphs whose input also
    feeds a ``Shape`` node it emits a dangling cast and fails."""
    onnx = require("onnx", "onnx")
    float16 = require("onnxruntime.transformers.float16", "onnx")
    model = onnx.load(str(src))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # "values truncated to fp16" for tiny weights: measured in fidelity instead
            half = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=list(FP16_BLOCK_LIST))
            from onnxruntime.transformers.onnx_model import OnnxModel  # optional (hetero[onnx]), imported on use

            _drop_duplicate_nodes(half)
            OnnxModel(half).topological_sort()  # the converter appends its input casts at the end
    except Exception as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        raise HeteroError(f"FP16 conversion by onnxruntime failed: {first[:300]}; report the model") from None
    for v in list(half.graph.input) + list(half.graph.output):
        if v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise HeteroError(f"the FP16 model's {v.name!r} is not FP32 despite keep_io_types; report the model")
    dst = Path(dst)
    onnx.save(half, str(dst))
    try:
        onnx.checker.check_model(str(dst))
    except Exception as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        raise HeteroError(f"the FP16 ONNX model fails onnx's checker: {first[:300]}; report the model") from None
    return dst


def _drop_duplicate_nodes(model) -> None:
    """onnxruntime 1.30's converter inserts the same FP32 cast twice when a tensor feeds two blocked
    nodes (e.g. the projection into ReduceL2 and Div): identical nodes writing the same output. Keep
    the first; two *different* nodes writing one name is a real error."""
    seen: dict[str, bytes] = {}
    keep = []
    for node in model.graph.node:
        key = node.SerializeToString(deterministic=True) if hasattr(node, "SerializeToString") else None
        clash = [o for o in node.output if o in seen]
        if clash:
            if all(seen[o] == key for o in clash) and len(clash) == len(node.output):
                continue
            raise HeteroError(f"the FP16 converter wrote {clash[0]!r} twice from different nodes; report the model")
        for o in node.output:
            seen[o] = key
        keep.append(node)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)


DYNAMIC_OPS = ("MatMul", "Gemm")  # what dynamic INT8 quantises


class _Calibration:
    """ORT's CalibrationDataReader protocol over preprocessed float32 images, one per run: the
    histogram calibrators stack per-run outputs and fail on a short last batch."""

    def __init__(self, input_name: str, images: np.ndarray):
        self._batches = iter([{input_name: images[i:i + 1]} for i in range(len(images))])

    def get_next(self):
        return next(self._batches, None)


def onnx_int8_from_onnx(src: str | Path, dst: str | Path, calib_inputs: np.ndarray, *, input_name: str,
                        dynamic: bool = False, report: dict[str, Any] | None = None) -> Path:
    """INT8 by ONNX Runtime: static QDQ with per-channel weights, calibrated on ``calib_inputs``
    (training images, never test images) with ORT's percentile method (99.999th): on the demo's edge
    it gave min cosine 0.9933 against 0.9892 for MinMax and entropy (10k test queries). ``dynamic=True``
    quantises the MatMul/Gemm weights only (activations at run time), without calibration: for
    transformer-like models; on a CNN it keeps the convolutions in FP32.

    Percentile calibration builds a 2048-bin histogram per tensor, which numpy refuses for a tensor
    whose range is too narrow for that many distinct bin edges (MobileNetV3's hard-sigmoid gates, all
    near 1 on some images): then the model is calibrated by MinMax instead, and ``report["calibration"]``
    says which method was used."""
    onnx = require("onnx", "onnx")
    quant = require("onnxruntime.quantization", "onnx")
    from onnxruntime.quantization.shape_inference import quant_pre_process  # optional (hetero[onnx]), imported on use

    dst = Path(dst)
    if not dynamic and (calib_inputs is None or len(calib_inputs) == 0):
        raise HeteroError("INT8 static quantisation needs calibration images; pass --calib N (training images)")
    log = io.StringIO()
    quiet = logging.getLogger("onnxruntime")
    level = quiet.level
    try:
        quiet.setLevel(logging.ERROR)
        with tempfile.TemporaryDirectory(dir=dst.parent) as tmp, warnings.catch_warnings(), \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            warnings.simplefilter("ignore")
            pre = Path(tmp) / "pre.onnx"
            # symbolic shape inference fails on dynamo-exported graphs; ONNX's own inference suffices here
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            if dynamic:
                # MatMul/Gemm only: ORT's dynamic Conv (ConvInteger) has per-tensor weights, which gave
                # mean cosine 0.52 on the demo edge (its depthwise kernels' ranges differ per channel)
                quant.quantize_dynamic(str(pre), str(dst), weight_type=quant.QuantType.QInt8, per_channel=True,
                                       op_types_to_quantize=list(DYNAMIC_OPS))
            else:
                method = "percentile"
                for method in ("percentile", "minmax"):
                    try:
                        quant.quantize_static(str(pre), str(dst), _Calibration(input_name, calib_inputs),
                                              quant_format=quant.QuantFormat.QDQ, per_channel=True,
                                              activation_type=quant.QuantType.QInt8, weight_type=quant.QuantType.QInt8,
                                              calibrate_method=quant.CalibrationMethod.Percentile if method == "percentile"
                                              else quant.CalibrationMethod.MinMax)
                        break
                    except ValueError as e:
                        if method != "percentile" or "Too many bins" not in str(e):
                            raise
                if report is not None:
                    report["calibration"] = method
    except HeteroError:
        raise
    except Exception as e:  # ORT raises many types; one line for the user
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        raise HeteroError(f"INT8 quantisation by onnxruntime failed: {first[:300]}; export onnx-fp16 instead, "
                          "or report the model") from None
    finally:
        quiet.setLevel(level)
    onnx.checker.check_model(str(dst))
    return dst


@register_exporter("onnx-fp16", "ONNX FP16 weights and activations, FP32 I/O and normalisation", "onnx",
                   ("onnx", "onnxruntime"), "onnx")
def _export_onnx_fp16(job: ExportJob, source: Path | None) -> dict[str, Any]:
    path = onnx_fp16_from_onnx(source, job.out_dir / f"{job.name}.fp16.onnx")
    return onnx_entry(job, path, "fp16", source.name, converter="onnxruntime.transformers.float16 (keep_io_types)",
                      fp32_ops=list(FP16_BLOCK_LIST))


@register_exporter("onnx-int8", "ONNX INT8 by onnxruntime: static QDQ, per-channel weights, calibrated on training "
                   "images (or dynamic, weights only)", "onnx", ("onnx", "onnxruntime"), "onnx")
def _export_onnx_int8(job: ExportJob, source: Path | None) -> dict[str, Any]:
    mode = job.options.get("int8_mode", "static")
    report: dict[str, Any] = {}
    path = onnx_int8_from_onnx(source, job.out_dir / f"{job.name}.int8.onnx", job.calib_inputs, input_name=INPUT_NAME,
                               dynamic=mode == "dynamic", report=report)
    if mode == "dynamic":
        return onnx_entry(job, path, "int8", source.name, quantization="dynamic",
                          quantized_ops=list(DYNAMIC_OPS),
                          converter="onnxruntime quantize_dynamic (MatMul/Gemm weights int8 per-channel, activations "
                                    "at run time)")
    return onnx_entry(job, path, "int8", source.name, quantization="static",
                      converter=f"onnxruntime quantize_static (QDQ, per-channel, {report['calibration']} calibration)",
                      calibration={"images": int(len(job.calib_inputs)), "source": "training split",
                                   "method": report["calibration"]})

"""Reduced-precision ONNX made from the FP32 ONNX: FP16 (onnxconverter-common) and INT8 (ONNX
Runtime static quantisation, QDQ, per-channel weights). Neither is a hand-written graph pass."""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np

from hetero.errors import HeteroError, require

# Kept in FP32 in the FP16 model: the L2 normalisation and the reductions around it. In FP16 the
# normaliser's eps (1e-12) underflows to 0, so an all-zero embedding gives 0/0 = NaN.
FP16_BLOCK_LIST = ("ReduceL2", "ReduceSumSquare", "ReduceMean", "ReduceSum", "Sqrt", "Clip", "Max", "Div", "Expand",
                   "LpNormalization", "GlobalAveragePool")


def onnx_fp16_from_onnx(src: str | Path, dst: str | Path) -> Path:
    """FP16 weights and activations, FP32 inputs and outputs (``keep_io_types``); normalisation in FP32."""
    onnx = require("onnx", "onnx")
    float16 = require("onnxconverter_common.float16", "onnx")
    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "values truncated to fp16" for tiny weights: measured in fidelity instead
        half = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=list(FP16_BLOCK_LIST))
    _restore_fp32_outputs(model, half)
    dst = Path(dst)
    onnx.save(half, str(dst))
    onnx.checker.check_model(str(dst))
    return dst


def _restore_fp32_outputs(src, half) -> None:
    """onnxconverter-common 1.16 casts a *blocked* output node's FP32 result back to FP16 and declares
    the graph output FP16, despite ``keep_io_types``: turn that last cast into FP32 (a no-op, as the
    blocked node already computes in FP32), or add one."""
    from onnx import TensorProto, helper

    was = {o.name: o.type.tensor_type.elem_type for o in src.graph.output}
    for out in half.graph.output:
        if was.get(out.name) != TensorProto.FLOAT or out.type.tensor_type.elem_type != TensorProto.FLOAT16:
            continue
        out.type.tensor_type.elem_type = TensorProto.FLOAT
        producer = next((n for n in half.graph.node if out.name in n.output), None)
        if producer is not None and producer.op_type == "Cast":
            for attr in producer.attribute:
                if attr.name == "to":
                    attr.i = TensorProto.FLOAT
        else:
            inner = f"{out.name}_fp16"
            for n in half.graph.node:
                n.output[:] = [inner if o == out.name else o for o in n.output]
            half.graph.node.append(helper.make_node("Cast", [inner], [out.name], to=TensorProto.FLOAT,
                                                    name=f"{out.name}_to_fp32"))


class _Calibration:
    """ORT's CalibrationDataReader protocol over preprocessed float32 images, one per run: the
    histogram calibrators stack per-run outputs and fail on a short last batch."""

    def __init__(self, input_name: str, images: np.ndarray):
        self._batches = iter([{input_name: images[i:i + 1]} for i in range(len(images))])

    def get_next(self):
        return next(self._batches, None)


def onnx_int8_from_onnx(src: str | Path, dst: str | Path, calib_inputs: np.ndarray, *, input_name: str,
                        dynamic: bool = False) -> Path:
    """INT8 by ONNX Runtime: static QDQ with per-channel weights, calibrated on ``calib_inputs``
    (training images, never test images) with ORT's percentile method (99.999th): on the demo's edge
    it gave min cosine 0.9933 against 0.9892 for MinMax and entropy (10k test queries). ``dynamic=True`` quantises
    weights only, without calibration."""
    onnx = require("onnx", "onnx")
    quant = require("onnxruntime.quantization", "onnx")
    from onnxruntime.quantization.shape_inference import quant_pre_process

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
                quant.quantize_dynamic(str(pre), str(dst), weight_type=quant.QuantType.QInt8, per_channel=True)
            else:
                quant.quantize_static(str(pre), str(dst), _Calibration(input_name, calib_inputs),
                                      quant_format=quant.QuantFormat.QDQ, per_channel=True,
                                      activation_type=quant.QuantType.QInt8, weight_type=quant.QuantType.QInt8,
                                      calibrate_method=quant.CalibrationMethod.Percentile)
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


def weight_bytes(path: str | Path) -> int:
    """Bytes of the graph's initializers (the weights), the fair size measure for small models whose
    files are dominated by graph overhead."""
    onnx = require("onnx", "onnx")
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return int(sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer))

"""Convert: a torch edge model -> runtime artifacts (ONNX FP32/FP16/INT8, ORT Mobile, Core ML,
TensorRT) listed in a manifest bound to the cloud space."""
from export.manifest import FILENAME as MANIFEST_FILENAME
from export.onnx import onnx_from_torch
from export.onnx_precision import onnx_fp16_from_onnx, onnx_int8_from_onnx
from export.run import EXPORTERS, Exporter, ExportJob, default_formats, export_checkpoint, exporter, fidelity

__all__ = ["EXPORTERS", "MANIFEST_FILENAME", "ExportJob", "Exporter", "default_formats", "export_checkpoint", "exporter",
           "fidelity", "onnx_fp16_from_onnx", "onnx_from_torch", "onnx_int8_from_onnx"]

"""Convert: a torch edge model -> runtime artifacts (ONNX today) listed in a manifest."""
from export.api import EXPORTERS, export_checkpoint, fidelity
from export.manifest import FILENAME as MANIFEST_FILENAME
from export.onnx import onnx_from_torch

__all__ = ["EXPORTERS", "MANIFEST_FILENAME", "export_checkpoint", "fidelity", "onnx_from_torch"]

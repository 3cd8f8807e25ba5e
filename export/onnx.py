"""onnx_from_torch: a torch embedding model -> a single-file ONNX FP32 model with a dynamic batch axis."""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch

from hetero.errors import HeteroError, require

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
OPSET = 18


def onnx_from_torch(model: torch.nn.Module, input_shape: tuple[int, int, int], path: str | Path,
                    *, opset: int = OPSET) -> Path:
    """Export with torch's dynamo exporter. ``external_data=False`` keeps weights inside the one file
    (torch 2.14 writes a separate ``.data`` file otherwise)."""
    require("onnx", "onnx")
    require("onnxscript", "onnx")
    path = Path(path)
    model = model.eval()
    example = torch.zeros((2, *input_shape))
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), str(path), dynamo=True, external_data=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
                verbose=False,
            )
    except Exception as e:  # the exporter raises many types; surface one line
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        raise HeteroError(f"ONNX export failed: {first[:300]}; the model uses an op the exporter cannot handle") from None
    import onnx

    onnx.checker.check_model(str(path))
    return path

"""ONNX FP32: torch's dynamo exporter, then onnxslim, ONNX's checker and shape inference. One file,
dynamic batch axis. Also the ONNX manifest entry (fidelity measured through onnxruntime) that the
other ONNX-based exporters share."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.formats import (
    INPUT_NAME,
    OUTPUT_NAME,
    ExportJob,
    artifact_entry,
    artifact_metadata,
    check_not_broken,
    measured_fidelity,
    register_exporter,
    runner_embeddings,
)
from hetero.errors import HeteroError, require

OPSET = 18


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [e.__class__.__name__])[0])[:300]


def onnx_from_torch(model: torch.nn.Module, input_shape: tuple[int, int, int], path: str | Path,
                    *, opset: int = OPSET, simplify: bool = True) -> Path:
    """Export with torch's dynamo exporter. ``external_data=False`` keeps weights inside the one file
    (torch 2.14 writes a separate ``.data`` file otherwise). Then, with ``simplify``, onnxslim folds
    constants and fuses patterns; the result must pass ``onnx.checker`` (full check) and strict shape
    inference, and keep its dynamic batch axis."""
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
        raise HeteroError(f"ONNX export failed: {_first_line(e)}; the model uses an op the exporter cannot handle") from None
    import onnx  # optional (hetero[onnx]), imported on use

    proto = onnx.load(str(path))
    if simplify:
        proto = simplify_onnx(proto)
    proto = check_onnx(proto)
    onnx.save(proto, str(path))
    return path


def simplify_onnx(proto):
    """onnxslim (a maintained simplifier): constant folding, dead-node removal, pattern fusion."""
    onnxslim = require("onnxslim", "onnx")
    quiet = logging.getLogger("onnxslim")
    level = quiet.level
    out = io.StringIO()
    try:
        quiet.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            warnings.simplefilter("ignore")
            slim = onnxslim.slim(proto)
    except Exception as e:
        raise HeteroError(f"onnxslim could not simplify the ONNX graph: {_first_line(e)}; "
                          "report the model (export without simplification is not offered)") from None
    finally:
        quiet.setLevel(level)
    if slim is None:
        raise HeteroError("onnxslim returned no model; report the model")
    return slim


def check_onnx(proto):
    """``onnx.checker`` (full check) and strict shape inference; the batch axis must stay dynamic."""
    import onnx  # optional (hetero[onnx]), imported on use

    try:
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise HeteroError(f"the exported ONNX graph fails onnx's checks: {_first_line(e)}; report the model") from None
    for v in list(proto.graph.input) + list(proto.graph.output):
        dims = v.type.tensor_type.shape.dim
        if not dims or dims[0].dim_param == "" or dims[0].HasField("dim_value"):
            raise HeteroError(f"the ONNX graph's {v.name!r} lost its dynamic batch axis; report the model")
    return proto


def weight_bytes(path: str | Path) -> int:
    """Bytes of the graph's initializers (the weights), the fair size measure for small models whose
    files are dominated by graph overhead."""
    onnx = require("onnx", "onnx")
    from onnx import numpy_helper  # optional (hetero[onnx]), imported on use

    model = onnx.load(str(path))
    return int(sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer))


def write_onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Set the ONNX file's ``metadata_props`` (replacing hetero's earlier keys), rewriting it in place."""
    import onnx  # optional (hetero[onnx]), imported on use

    proto = onnx.load(str(path))
    keep = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def onnx_entry(job: ExportJob, path: Path, precision: str, made_from: str, *, fmt: str = "onnx",
               **extra: Any) -> dict[str, Any]:
    """Manifest entry of an ONNX-family file, with its fidelity measured through the devices onnxruntime
    runner (CPU provider). An ONNX file first gets hetero's metadata (:func:`export.formats.artifact_metadata`)."""
    import onnx  # optional (hetero[onnx]): for the versions the entry records
    import onnxruntime  # optional (hetero[onnx]), likewise

    if fmt == "onnx":
        write_onnx_metadata(path, artifact_metadata(job, precision))
    got, runtime = runner_embeddings(job, path, "onnxruntime", {"format": fmt, "precision": precision}, batch_size=1024)
    if not np.isfinite(got).all():
        raise HeteroError(f"the {precision} {fmt} model gives NaN/Inf embeddings on the check inputs; "
                          "do not ship it, and report the model")
    fid = measured_fidelity(job, got, runtime)
    check_not_broken(job.current_format or fmt, fid)
    return artifact_entry(job, path, fmt=fmt, precision=precision, made_from=made_from, runtime="onnxruntime",
                          libraries={"torch": torch.__version__, "onnx": onnx.__version__,
                                     "onnxruntime": onnxruntime.__version__, **extra.pop("libraries", {})},
                          fidelity=fid,
                          weight_bytes=weight_bytes(path) if fmt == "onnx" else extra.pop("weight_bytes", None),
                          opset=OPSET, **extra)


@register_exporter("onnx", "ONNX FP32, one file, dynamic batch, simplified (onnxslim) and checked", None,
                   ("onnx", "onnxscript", "onnxruntime", "onnxslim"), "onnx")
def _export_onnx(job: ExportJob, source: Path | None) -> dict[str, Any]:
    import onnxslim  # optional (hetero[onnx]), imported on use

    path = onnx_from_torch(job.ckpt.model, job.ckpt.input_shape, job.out_dir / f"{job.name}.onnx")
    return onnx_entry(job, path, "fp32", "torch (dynamo exporter)", converter=f"onnxslim {onnxslim.__version__}",
                      libraries={"onnxslim": onnxslim.__version__})

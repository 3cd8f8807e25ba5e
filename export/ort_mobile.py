"""ORT Mobile: the ``.ort`` flatbuffer format, made from the FP32 ONNX by ONNX Runtime's own
converter (``onnxruntime.tools.convert_onnx_models_to_ort``), plus the required-operators config
that a reduced Android/iOS build of ONNX Runtime is compiled with (``--include_ops_by_config``)."""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from devices.artifact import sha256_path
from export.formats import ExportJob, register_exporter
from export.onnx import onnx_entry
from hetero.errors import HeteroError, require

# "fixed": optimisations are applied now, for the CPU execution provider (smallest, fastest to load;
# may contain ORT-internal fused ops such as com.microsoft FusedConv). "runtime": kept portable, for
# the NNAPI / Core ML / XNNPACK execution providers, which choose their own fusions at load time.
OPTIMIZATIONS = ("fixed", "runtime")


def ort_from_onnx(src: str | Path, out_dir: str | Path, name: str, *, optimization: str = "fixed") -> tuple[Path, Path]:
    """Write ``<name>.ort`` and ``<name>.required_operators.config`` into ``out_dir``."""
    require("onnxruntime", "onnx")
    from onnxruntime.tools.convert_onnx_models_to_ort import (  # optional (hetero[onnx]), imported on use
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    if optimization not in OPTIMIZATIONS:
        raise HeteroError(f"unknown ORT optimisation style {optimization!r}; choose one of: {', '.join(OPTIMIZATIONS)}")
    style = OptimizationStyle.Fixed if optimization == "fixed" else OptimizationStyle.Runtime
    out_dir = Path(out_dir)
    previous = logging.root.manager.disable
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        work = Path(tmp)
        shutil.copyfile(src, work / f"{name}.onnx")
        try:
            logging.disable(logging.INFO)  # the converter logs its temporary paths at INFO
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                convert_onnx_models_to_ort(work / f"{name}.onnx", work / "out", [style], enable_type_reduction=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
            raise HeteroError(f"ONNX Runtime could not convert the model to the .ort format: {first[:300]}; "
                              "ship the ONNX file instead, or report the model") from None
        finally:
            logging.disable(previous)
        made = sorted((work / "out").glob("*.ort"))
        configs = sorted((work / "out").glob("*.config"))
        if len(made) != 1 or len(configs) != 1:
            raise HeteroError("ONNX Runtime's .ort converter wrote no model; ship the ONNX file instead, or report the model")
        ort_path, config_path = out_dir / f"{name}.ort", out_dir / f"{name}.required_operators.config"
        shutil.move(made[0], ort_path)
        # the converter names its temporary paths in the config's comment: name the shipped file instead
        text = configs[0].read_text(encoding="utf-8").replace(str(made[0]), ort_path.name)
        config_path.write_text(text, encoding="utf-8")
    return ort_path, config_path


@register_exporter("ort", "ORT Mobile .ort (FP32) with the required-operators config for a reduced ORT build", "onnx",
                   ("onnx", "onnxruntime"), "onnx")
def _export_ort(job: ExportJob, source: Path | None) -> dict[str, Any]:
    optimization = job.options.get("ort.optimization", "fixed")
    path, config = ort_from_onnx(source, job.out_dir, job.name, optimization=optimization)
    ops = [line for line in config.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    return onnx_entry(job, path, "fp32", source.name, fmt="ort", optimization=optimization,
                      required_operators_config=config.name, required_operators_config_sha256=sha256_path(config),
                      operator_sets=ops,
                      converter="onnxruntime.tools.convert_onnx_models_to_ort (type reduction on)",
                      build_hint=f"build ORT with --minimal_build --include_ops_by_config {config.name} "
                                 "--enable_reduced_operator_type_support")

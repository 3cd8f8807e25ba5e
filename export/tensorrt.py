"""TensorRT: a serialised engine (``<name>.plan``) made from the ONNX, with a pre-flight check. The
exporter; its parts live beside it:

* :mod:`export.tensorrt_preflight` (pure ``onnx``, runs anywhere): every node of the graph against
  onnx-tensorrt's operator table and its mechanically checkable restrictions. A graph that fails it
  cannot be expressed in TensorRT: the exporter raises :class:`FormatCannotExpress`.
* :mod:`export.tensorrt_trtexec`: where ``tensorrt`` is not importable or no CUDA GPU is present (a
  CPU-only export host), the manifest entry is ``status: "build-on-target"``: no file, plus the exact
  ``trtexec`` command that builds the engine on the target and the pre-flight report.
* :mod:`export.tensorrt_build`: where ``tensorrt`` imports and a GPU is present, the plan is built
  here; its fidelity is then measured on the GPU through the devices TensorRT runner, the one that
  verify uses. Both are written against the TensorRT 10/11 documented Python API and are UNVERIFIED
  on CPU-only machines (the tests marked ``tensorrt`` exercise them where it is installed).
"""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from devices.errors import DeviceError
from export.formats import (
    INPUT_NAME,
    ExportJob,
    FormatCannotExpress,
    artifact_entry,
    io_spec,
    measured_fidelity,
    pending_fidelity,
    register_exporter,
    runner_embeddings,
)
from export.tensorrt_build import build_engine
from export.tensorrt_preflight import FORMAT, preflight, preflight_message, preflight_summary
from export.tensorrt_trtexec import profile_shapes, trtexec_command
from hetero.errors import HeteroError


def _tensorrt_here() -> tuple[Any | None, str | None]:
    """(the tensorrt module, None) where an engine can be built here, else (None, why not)."""
    try:
        import tensorrt as trt  # optional heavy runtime (hetero[tensorrt]); absent on most export hosts
        version = str(trt.__version__)
    except Exception as e:  # not installed, or PyPI's placeholder package that fails on import
        return None, f"tensorrt is not installed here: {e.__class__.__name__}: {str(e).strip()[:120] or 'import failed'}"
    if not torch.cuda.is_available():
        return None, f"no CUDA GPU here (tensorrt {version} is installed)"
    return trt, None


def _libraries(trt=None) -> dict[str, str | None]:
    import onnx  # optional (hetero[onnx]); this exporter is only run where it is installed

    return {"torch": torch.__version__, "onnx": onnx.__version__, "tensorrt": str(trt.__version__) if trt else None}


@register_exporter("tensorrt", "TensorRT engine (.plan), FP16, batch profile; pre-flight against onnx-tensorrt's "
                   "operator table; built on the target where this host has no tensorrt or GPU", "onnx-fp16",
                   ("onnx",), "tensorrt")
def _export_tensorrt(job: ExportJob, source: Path | None) -> dict[str, Any]:
    fp16_onnx = Path(source)
    fp32_onnx = job.built.get("onnx") or job.out_dir / f"{job.name}.onnx"
    report = preflight(fp16_onnx)
    if fp32_onnx.exists():  # TensorRT 10 builds from it: same ops but the casts, checked as well
        report["fp32_onnx"] = {k: v for k, v in preflight(fp32_onnx).items() if k in ("file", "ok", "problems", "op_counts")}
    pre_file = job.out_dir / f"{job.name}.tensorrt-preflight.json"
    pre_file.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if not report["ok"] or not report.get("fp32_onnx", {"ok": True})["ok"]:
        bad = report if not report["ok"] else {**report, **report["fp32_onnx"]}
        raise FormatCannotExpress(preflight_message(bad))

    profile = profile_shapes(job.batch_sizes, tuple(job.ckpt.input_shape))
    plan, cache = f"{job.name}.plan", f"{job.name}.timing.cache"
    common = {
        "build_command": trtexec_command(fp16_onnx.name, input_name=INPUT_NAME, profile=profile, plan_file=plan,
                                         timing_cache_file=cache),
        "build_command_tensorrt10_fp32_onnx": trtexec_command(fp32_onnx.name, input_name=INPUT_NAME, profile=profile,
                                                              plan_file=plan, timing_cache_file=cache,
                                                              strongly_typed=False, fp16=True),
        "profile": profile,
        "preflight_file": pre_file.name,
        "preflight": preflight_summary(report),
    }
    trt, why = _tensorrt_here()
    if trt is None:
        inp, out = io_spec(job)
        return {
            "format": FORMAT,
            "precision": "fp16",
            "status": "build-on-target",
            "file": None,
            "made_from": fp16_onnx.name,
            "sha256": None,
            "bytes": None,
            "weight_bytes": None,
            "input": inp,
            "output": out,
            "runtime": "tensorrt (on the target)",
            "libraries": {"python": platform.python_version(), **_libraries()},
            "note": f"engine not built here: build on target ({why}; a TensorRT plan is specific to the GPU "
                    "and the TensorRT version that built it)",
            **common,
            "fidelity": pending_fidelity("engine not built here; build it on the target, then run hetero verify there"),
        }

    # GPU host with tensorrt: build, then measure through the devices runner (UNVERIFIED on CPU-only machines)
    plan_path, cache_path = job.out_dir / plan, job.out_dir / cache
    try:
        how = build_engine(trt, fp16_onnx, fp32_onnx, plan_path, cache_path, profile)
        got, runtime = runner_embeddings(job, plan_path, "tensorrt",
                                         {"format": FORMAT, "precision": "fp16", "profile": profile},
                                         batch_size=profile["max"][0])
    except (HeteroError, DeviceError):
        raise
    except Exception as e:  # TensorRT raises RuntimeError/TypeError with multi-line text: one line for the user
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:300]
        raise HeteroError(f"TensorRT {trt.__version__} failed to build or run the engine: {first}") from None
    if not np.isfinite(got).all():
        raise HeteroError("the TensorRT engine gives NaN/Inf embeddings on the check inputs; do not ship it, "
                          "and report the model")
    return artifact_entry(job, plan_path, fmt=FORMAT, precision="fp16", made_from=how["built_from"], runtime=runtime,
                          libraries=_libraries(trt), fidelity=measured_fidelity(job, got, runtime), weight_bytes=None,
                          timing_cache=cache, network=how["network"], gpu=torch.cuda.get_device_name(), **common)

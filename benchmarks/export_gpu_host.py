"""Export on a GPU host: the demo's edge model exported with that host's torch/onnxruntime, and its
artifacts run on the GPU where a runtime there can (torch CUDA; onnxruntime's CUDA provider if the
installed onnxruntime has it). Prints what ran where and the fidelity against torch on the CPU.

    python benchmarks/export_gpu_host.py [--edge runs/demo/edge] [--json F]

Written for the lent GPU machine (no internet: the packages hetero needs there travel as wheels).
INT8 is left out: it calibrates on training images, and only the test split travels.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from export import export_checkpoint
from export.formats import fidelity
from hetero.app.report import host_info
from hetero.checkpoint import load_checkpoint
from hetero.data import load_dataset


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edge", default="runs/demo/edge")
    ap.add_argument("--json")
    args = ap.parse_args()
    import onnxruntime as ort

    edge = load_checkpoint(args.edge, role="edge")
    test = load_dataset(None, "test", progress=False)
    x = edge.preprocess.apply(test.conform(edge.preprocess).images)
    model = edge.model.eval()
    with torch.no_grad():
        ref = torch.cat([model(torch.from_numpy(x[i:i + 1000])) for i in range(0, len(x), 1000)]).numpy()
    result: dict = {"label": "measured", "host": host_info(), "python": platform.python_version(), "onnxruntime": ort.__version__,
                    "providers": ort.get_available_providers(), "cuda": torch.cuda.is_available(), "rows": []}
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name(0)
        m = model.to("cuda")
        with torch.no_grad():
            got = torch.cat([m(torch.from_numpy(x[i:i + 1000]).cuda()) for i in range(0, len(x), 1000)]).cpu().numpy()
        model.to("cpu")
        result["rows"].append({"what": "torch CUDA fp32 vs torch CPU", **fidelity(ref, got)})
    out = Path(tempfile.mkdtemp()) / "export"
    t0 = time.perf_counter()
    formats = [f for f in ("onnx", "onnx-fp16", "ort", "coreml", "coreml-fp16", "tensorrt")]
    manifest = export_checkpoint(edge, out, formats=formats, check_inputs=x, check_desc=f"{test.name} ({len(test)})")
    result["export_seconds"] = time.perf_counter() - t0
    for a in manifest["artifacts"]:
        f = a["fidelity"]
        result["rows"].append({"what": f"{a['export_format']} at export ({f.get('label')}, {f.get('runtime', '-')})",
                               **{k: f[k] for k in ("min_cosine", "mean_cosine", "max_abs_diff") if k in f},
                               "top10_agreement": f.get("top10_agreement"), "status": a.get("status")})
    if "CUDAExecutionProvider" in ort.get_available_providers():
        for name in ("edge.onnx", "edge.fp16.onnx"):
            sess = ort.InferenceSession(str(out / name), providers=["CUDAExecutionProvider"])
            got = np.concatenate([sess.run(None, {"input": x[i:i + 1000]})[0] for i in range(0, len(x), 1000)])
            result["rows"].append({"what": f"{name} on onnxruntime CUDAExecutionProvider", **fidelity(ref, got)})
    else:
        result["rows"].append({"what": "onnxruntime CUDAExecutionProvider", "status": "not in this onnxruntime build"})
    for r in result["rows"]:
        print(json.dumps(r))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Edge vs cloud latency: p50 at batch 1 on onnxruntime's CPU provider with one thread, for the cloud
and every edge size in the README, next to the FLOPs ratio (and the torch runner's p50 beside).

Latency does not depend on training, so untrained models of each architecture are exported (ONNX
FP32, the `hetero export` path) and timed with the latency harness (`hetero bench`'s code). With
`--cuda`, the torch runner is also timed on the GPU (the accelerator machine's rows).

    python benchmarks/edge_cloud_latency.py [--iters 500] [--cuda] [--json F --md F]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from devices import bench, create_runner
from devices.bench import host
from export import export_checkpoint
from hetero.checkpoint import Checkpoint, save_checkpoint
from hetero.models.complexity import count_flops, count_params
from hetero.data import FASHION_MNIST_PREPROCESS as PREP
from hetero.models.embedding import ModelSpec, create_embedding_model
from _results import emit  # benchmarks/_results.py, next to this script

# (name in the README, backbone, kwargs, role)
MODELS = [
    ("cloud resnet20", "resnet20", {}, "cloud"),
    ("cloud resnet32", "resnet32", {}, "cloud"),
    ("edge mobilenet w1.0", "mobilenet", {"width": 1.0}, "edge"),
    ("edge w050 (demo)", "mobilenet_w050", {}, "edge"),
    ("edge w035d050", "mobilenet", {"width": 0.35, "depth": 0.5}, "edge"),
    ("edge w025", "mobilenet_w025", {}, "edge"),
]


def checkpoint(backbone: str, kwargs: dict, role: str, dim: int = 128) -> Checkpoint:
    spec = ModelSpec(backbone=backbone, dim=dim, backbone_kwargs=kwargs)
    torch.manual_seed(0)
    model = create_embedding_model(spec, 1).eval()
    return Checkpoint(role=role, spec=spec, model=model, classifier=None, preprocess=PREP,
                      classes=tuple(str(i) for i in range(10)), space="0" * 64)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--cuda", action="store_true", help="also time the torch runner on the CUDA GPU")
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="latency-"))
    rows = []
    for i, (name, backbone, kwargs, role) in enumerate(MODELS):
        ck = checkpoint(backbone, kwargs, role)
        d = work / str(i)
        save_checkpoint(ck, d / "ckpt")
        export_checkpoint(ck, d / "export", formats=("onnx",), name=backbone)
        row = {"model": name, "backbone": backbone, "kwargs": kwargs, "role": role,
               "flops": count_flops(ck.model, (1, 28, 28)), "params": count_params(ck.model)}
        with create_runner(d / "export", "onnxruntime", threads=1) as r:
            res = bench(r, (1, 32), warmup=50, iters=args.iters)
            row["ort"] = res
        with create_runner(d / "ckpt", "torch", threads=1) as r:
            row["torch_cpu"] = bench(r, (1,), warmup=20, iters=max(50, args.iters // 5))
        if args.cuda and torch.cuda.is_available():
            with create_runner(d / "ckpt", "torch", device="cuda") as r:
                row["torch_cuda"] = bench(r, (1, 32), warmup=50, iters=args.iters)
        rows.append(row)
        print(f"{name:22s} {row['flops'] / 1e6:8.3f} MFLOPs  ORT 1-thread b1 p50 "
              f"{row['ort']['results'][0]['p50_ms']:.4f} ms", flush=True)
    result = {"benchmark": "edge_cloud_latency", "host": host(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "label": "measured", "rows": rows}
    emit(result, render(result), args.json, args.md)
    return 0


def render(r: dict) -> str:
    clouds = {x["model"]: x for x in r["rows"] if x["role"] == "cloud"}
    base = clouds["cloud resnet20"]
    b1 = lambda x, k="ort": x[k]["results"][0]["p50_ms"]  # noqa: E731
    h = r["host"]
    cuda = any("torch_cuda" in x for x in r["rows"])
    lines = ["# Edge vs cloud latency", "",
             f"onnxruntime {r['rows'][0]['ort']['versions'].get('onnxruntime')} CPU provider, 1 thread, batch 1, p50 of "
             f"{r['rows'][0]['ort']['results'][0]['iterations']} runs after 50 warm-up (measured); torch {r['torch']} CPU, 1 "
             f"thread, beside. {h['cpu']}, {h['usable_cores']} usable cores, {r['date']}. Ratios against the ResNet-20 "
             "cloud (the demo's).", "",
             "| model | MFLOPs | params | ORT p50 ms (b1) | ORT p50 ms (b32) | torch CPU p50 ms (b1) | FLOPs ratio cloud/model "
             "| latency ratio cloud/model (ORT b1) |" + (" torch CUDA p50 ms (b1) | torch CUDA p50 ms (b32) |" if cuda else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if cuda else "")]
    for x in r["rows"]:
        line = (f"| {x['model']} | {x['flops'] / 1e6:.3f} | {x['params']:,} | {b1(x):.4f} | "
                f"{x['ort']['results'][1]['p50_ms']:.4f} | {b1(x, 'torch_cpu'):.4f} | {base['flops'] / x['flops']:.1f}x | "
                f"{b1(base) / b1(x):.1f}x |")
        if cuda:
            c = x.get("torch_cuda")
            line += f" {c['results'][0]['p50_ms']:.4f} | {c['results'][1]['p50_ms']:.4f} |" if c else " - | - |"
        lines.append(line)
    if cuda:
        gpu = next(x["torch_cuda"]["runtime"] for x in r["rows"] if "torch_cuda" in x)
        lines += ["", f"CUDA rows: {gpu}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

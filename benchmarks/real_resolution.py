"""Real resolution (issue 23): 224-px RGB edges against a ResNet-50 cloud, and a slice that runs here.

**Models.** For a ResNet-50 cloud and each edge (torchvision MobileNetV3-Small/-Large, EfficientNet-B0,
a timm MobileNetV4, a subnet of the 224-px search space) at 224 px, untrained (latency and conversion
fidelity do not depend on training; batch norm set from a batch of smooth synthetic images): params
and MFLOPs, export time, weight bytes and fidelity per format (``export_real_resolution.measure``,
the ``hetero export`` driver), onnxruntime p50/p90 at 1 and 2 threads, batch 1 and 8 (the
``hetero bench`` harness), and the edge/cloud latency ratio.

**Slice.** A 224-px RGB ImageFolder made from Fashion-MNIST (each image upscaled, tinted with a
seeded colour, written as JPEG, so it runs offline), then the commands a user runs: ``train-cloud``
(``tv:resnet18``), ``train-edge`` for ``tv:mobilenet_v3_small`` and a ``timm:`` edge (default
compatibility loss), ``export`` (every format this host produces), ``verify`` (default gates) and
``evaluate`` (the compatibility criterion), with the wall time of each stage. This proves the
mechanics at 224 px, not accuracy on a real 224-px data set. Stages whose output exists in ``--work``
are not rerun, so a slow CPU can finish the slice over several runs.

    python benchmarks/real_resolution.py [--part models|slice|both] [--work DIR] [--json F --md F]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from devices import bench, create_runner
from devices.bench import host
from export.formats import FormatBreaksModel
from export_real_resolution import measure  # benchmarks/, next to this script
from hetero.data import load_fashion_mnist
from hetero.data.fashion_mnist import find_fashion_mnist
from hetero.models import ModelSpec, create_embedding_model
from hetero.models.complexity import count_flops, count_params
from hetero.nas.space import SearchSpace, preset, sample
from hetero.nas.supernet import arch_flops
from _results import emit  # benchmarks/_results.py, next to this script

SIZE = 224
CLOUD = "tv:resnet50"
EDGES = ["tv:mobilenet_v3_small", "tv:mobilenet_v3_large", "tv:efficientnet_b0", "timm:mobilenetv4_conv_small"]
SLICE_CLOUD = "tv:resnet18"
SLICE_EDGES = ["tv:mobilenet_v3_small", "timm:mobilenetv4_conv_small"]
FORMATS = ("onnx", "onnx-fp16", "onnx-int8", "ort", "coreml", "coreml-fp16", "tensorrt")


def latency(export_dir: Path, iters: int) -> dict[str, Any]:
    out = {}
    for threads in (1, 2):
        with create_runner(export_dir, "onnxruntime", threads=threads) as r:
            res = bench(r, (1, 8), warmup=10, iters=iters)
        for row in res["results"]:
            out[f"t{threads}_b{row['batch']}"] = {"p50_ms": row["p50_ms"], "p90_ms": row["p90_ms"],
                                                  "iterations": row["iterations"]}
        out["runtime"] = res.get("runtime")
    return out


def subnet_kwargs(budget_mflops: float = 150.0, draws: int = 400) -> tuple[str, dict[str, Any]]:
    """An architecture of the 224-px search space (``mbv3-224``) at 224 px: of ``draws`` seeded random
    subnets, the one with the most FLOPs under the budget. Untrained like every row here: it stands
    for what a search picks (hard-swish, hard-sigmoid squeeze-excite, kernels up to 7), not for one."""
    space = SearchSpace.from_dict(preset("mbv3-224"))
    rng = random.Random(0)
    best = None
    for _ in range(draws):
        a = replace(sample(space, rng), resolution=224)
        f = arch_flops(a, space, 128)
        if f <= budget_mflops * 1e6 and (best is None or f > best[0]):
            best = (f, a)
    return "nas_mbv3", {"arch": best[1].to_dict(), "space": space.to_dict()}


def models_part(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    rows = []
    plan: list[tuple[str, str, dict[str, Any], str]] = [(CLOUD, CLOUD, {}, "cloud")]
    plan += [(e, e, {}, "edge") for e in EDGES]
    if args.subnet:
        plan.append(("mbv3-224 subnet (<= 150 MFLOPs)", *subnet_kwargs(), "edge"))
    for i, (name, backbone, kwargs, role) in enumerate(plan):
        t0 = time.perf_counter()
        model = create_embedding_model(ModelSpec(backbone, 128, kwargs), 3).eval()
        size = kwargs["arch"].get("resolution", SIZE) if "arch" in kwargs else SIZE
        row: dict[str, Any] = {"model": name, "backbone": backbone, "role": role, "size": size,
                               "params": count_params(model), "flops": count_flops(model, (3, size, size))}
        d = work / f"model{i}"
        done = d / "export.json"  # an earlier run's export of this model: reused (measure latency again with it)
        if done.exists() and json.loads(done.read_text()).get("backbone") == backbone:
            row["export"] = json.loads(done.read_text())
        else:
            formats = args.formats.split(",")
            try:
                row["export"] = measure(backbone, size, kwargs=kwargs, formats=formats, out=d, n_calib=args.calib)
            except FormatBreaksModel as e:  # static INT8 of an untrained deep net: refused as the exporter refuses it
                row["export"] = measure(backbone, size, kwargs=kwargs, formats=[f for f in formats if f != "onnx-int8"],
                                        out=d, n_calib=args.calib)
                row["export"]["rows"].append({"format": "onnx-int8", "precision": "int8", "status": "refused",
                                              "label": f"refused: {str(e).split(';')[0]}"})
            done.write_text(json.dumps(row["export"]))
        if args.latency:
            row["latency"] = latency(d / "x", args.iters)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        p50 = row["latency"]["t1_b1"]["p50_ms"] if "latency" in row else float("nan")
        print(f"{name:32s} {row['flops'] / 1e6:8.1f} MFLOPs  ORT t1 b1 p50 {p50:.2f} ms ({row['seconds']} s)", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- slice
def make_folder(root: Path, per_class_train: int, per_class_test: int, seed: int = 0) -> dict[str, Any]:
    """Fashion-MNIST images upscaled (bicubic) to 256 px, tinted with a seeded colour, JPEG: a
    224-px RGB ImageFolder after the centre crop; the first N per class of each split."""
    if (root / "DONE").exists():
        return json.loads((root / "DONE").read_text())
    t0 = time.perf_counter()
    src = find_fashion_mnist(None, download=False)
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        ds = load_fashion_mnist(src, split)
        for c, cname in enumerate(ds.classes):
            d = root / split / cname.replace("/", "-")
            d.mkdir(parents=True, exist_ok=True)
            for k, i in enumerate(np.flatnonzero(ds.labels == c)[:n]):
                grey = Image.fromarray(ds.images[i, :, :, 0]).resize((256, 256), Image.BICUBIC)
                tint = rng.uniform(0.6, 1.0, 3)
                rgb = np.clip(np.asarray(grey, np.float32)[..., None] * tint + rng.uniform(0, 40, 3), 0, 255)
                Image.fromarray(rgb.astype(np.uint8)).save(d / f"{k:05d}.jpg", quality=90)
    info = {"train_per_class": per_class_train, "test_per_class": per_class_test,
            "seconds": round(time.perf_counter() - t0, 1)}
    (root / "DONE").write_text(json.dumps(info))
    return info


def hetero(*argv: Any) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "hetero", *map(str, argv)], capture_output=True, text=True)
    out = (p.stdout + p.stderr).strip()
    print(f"$ hetero {' '.join(map(str, argv))}\n{out[-2000:]}", flush=True)
    return p.returncode, round(time.perf_counter() - t0, 1), out


def stage(stages: list[dict[str, Any]], name: str, done: Path, *argv: Any) -> int:
    """Run a hetero command unless ``done`` exists (an earlier run of the slice wrote it)."""
    if done.exists():
        prev = json.loads((done.parent / f".{done.name}.stage.json").read_text()) \
            if (done.parent / f".{done.name}.stage.json").exists() else {"seconds": None, "rc": 0}
        stages.append({"stage": name, **prev, "reused": True})
        return int(prev.get("rc", 0))
    rc, seconds, out = hetero(*argv)
    rec = {"rc": rc, "seconds": seconds, "tail": out[-600:]}
    stages.append({"stage": name, **rec})
    if rc == 0 or done.exists():
        (done.parent / f".{done.name}.stage.json").write_text(json.dumps(rec))
    return rc


def slice_part(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    data = work / "fmnist224"
    info = make_folder(data, args.train_per_class, args.test_per_class)
    stages: list[dict[str, Any]] = [{"stage": "make the 224-px folder", "seconds": info["seconds"], "rc": 0}]
    common = ["--data", data, "--quiet", "--batch-size", args.batch_size]
    cloud = work / "cloud"
    stage(stages, f"train-cloud {SLICE_CLOUD}", cloud, "train-cloud", "--model", SLICE_CLOUD, "--out", cloud,
          "--epochs", args.cloud_epochs, "--lr", args.lr, *common)
    edges = {}
    for e in args.edges.split(","):
        tag = e.replace(":", "-")
        ed, x, v, ev = work / tag, work / f"{tag}.export", work / f"{tag}.verify", work / f"{tag}.evaluate"
        stage(stages, f"train-edge {e}", ed, "train-edge", "--cloud", cloud, "--model", e, "--out", ed,
              "--epochs", args.edge_epochs, "--lr", args.lr, *common)
        stage(stages, f"export {e}", x, "export", "--edge", ed, "--cloud", cloud, "--data", data, "--out", x, "--quiet")
        rc = stage(stages, f"verify {e}", v / "report.json", "verify", "--cloud", cloud, "--manifest", x,
                   "--data", data, "--out", v, "--quiet")
        stage(stages, f"evaluate {e}", ev / "report.json", "evaluate", "--cloud", cloud, "--edge", ed,
              "--data", data, "--out", ev, "--quiet")
        verdict = json.loads((v / "report.json").read_text())["verdict"] if (v / "report.json").exists() else None
        results = json.loads((ev / "report.json").read_text()) if (ev / "report.json").exists() else None
        edges[e] = {"verify_rc": rc, "verdict": verdict,
                    "compatibility": (results or {}).get("compatibility"), "retrieval": (results or {}).get("retrieval")}
    return {"data": info, "stages": stages, "edges": edges, "cloud": SLICE_CLOUD, "size": SIZE}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("models", "slice", "both"), default="both")
    ap.add_argument("--work", help="working directory (kept; the slice reuses what it finds there)")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--iters", type=int, default=50, help="timed runs per thread count and batch size")
    ap.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True,
                    help="time the exports (--no-latency: export only, e.g. while the machine is busy; a later run "
                         "with the same --work reuses the exports and times them)")
    ap.add_argument("--calib", type=int, default=64, help="INT8 calibration images per model (onnxruntime holds "
                                                          "their activations in memory: 256 at 224 px killed a 24 GB VM)")
    ap.add_argument("--subnet", action=argparse.BooleanOptionalAction, default=True,
                    help="include a subnet of the 224-px search space")
    ap.add_argument("--edges", default=",".join(SLICE_EDGES), help="the slice's edges (comma-separated)")
    ap.add_argument("--train-per-class", type=int, default=60)
    ap.add_argument("--test-per-class", type=int, default=20)
    ap.add_argument("--cloud-epochs", type=int, default=4)
    ap.add_argument("--edge-epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="hetero-real-resolution-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"benchmark": "real_resolution", "host": host(), "torch": torch.__version__,
                              "date": time.strftime("%Y-%m-%d"), "work": str(work), "args": vars(args)}
    if os.environ.get("HETERO_TRAIN_DEVICE"):
        result["train_device"] = os.environ["HETERO_TRAIN_DEVICE"]
    if args.part in ("models", "both"):
        result["models"] = models_part(args, work)
    if args.part in ("slice", "both"):
        result["slice"] = slice_part(args, work)
    emit(result, render(result), args.json, args.md)
    return 0


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def render(r: dict[str, Any]) -> str:
    h = r["host"]
    lines = ["# Real resolution: 224-px RGB edges, a ResNet-50 cloud, and a slice that runs here", "",
             f"{h['cpu']}, {h['usable_cores']} usable cores, torch {r['torch']}, {r['date']}. Untrained weights "
             "(latency and conversion fidelity do not depend on training); fidelity on 32 synthetic images.", ""]
    models = r.get("models")
    if models and all("latency" in m for m in models):
        cloud = next(m for m in models if m["role"] == "cloud")
        c1 = cloud["latency"]["t1_b1"]["p50_ms"]
        lines += ["## Models (onnxruntime CPU provider, p50/p90 ms, measured)", "",
                  "| model | px | params | MFLOPs | t1 b1 | t1 b8 | t2 b1 | t2 b8 | cloud/model (t1 b1) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m in models:
            lat = m["latency"]
            cell = lambda k: f"{lat[k]['p50_ms']:.2f} / {lat[k]['p90_ms']:.2f}"  # noqa: E731
            lines.append(f"| {m['model']} | {m['size']} | {m['params'] / 1e6:.2f} M | {m['flops'] / 1e6:.0f} | "
                         f"{cell('t1_b1')} | {cell('t1_b8')} | {cell('t2_b1')} | {cell('t2_b8')} | "
                         f"{c1 / lat['t1_b1']['p50_ms']:.1f}x |")
        best = max((m for m in models if m["role"] == "edge"), key=lambda m: c1 / m["latency"]["t1_b1"]["p50_ms"])
        ratio = c1 / best["latency"]["t1_b1"]["p50_ms"]
        lines += ["", f"Fastest edge: {best['model']}, {ratio:.1f}x faster than the ResNet-50 cloud (1 thread, batch 1): "
                  f"the goal of >= 30x is {'met' if ratio >= 30 else 'NOT met'}.", "",
                  "## Export per format (fidelity vs torch; weight bytes; seconds)", "",
                  "| model | format | label | min cosine | weight bytes | x FP32 | export s |", "|---|---|---|---|---|---|---|"]
        for m in models:
            rows = [x for x in m["export"]["rows"] if "precision" in x]
            fp32 = next((x.get("weight_bytes") for x in rows if x["format"] == "onnx"), None)
            for x in rows:
                wb = x.get("weight_bytes")
                rel = f"{wb / fp32:.2f}x" if wb and fp32 else "-"
                status = x.get("status") or ""
                label = x.get("label") or status
                lines.append(f"| {m['model']} | {x['format']} | {label} | {_fmt(x.get('min_cosine'), '.6f')} | "
                             f"{_fmt(wb, ',')} | {rel} | {_fmt(x.get('seconds'), '.1f')} |")
    sl = r.get("slice")
    if sl:
        d = sl["data"]
        lines += ["", "## Slice (Fashion-MNIST upscaled to 224-px RGB JPEG; mechanics, not accuracy)", "",
                  f"{d['train_per_class']} training and {d['test_per_class']} test images per class; cloud "
                  f"{sl['cloud']}; edges trained with the default compatibility loss; wall time per stage on this CPU.", "",
                  "| stage | seconds | exit |", "|---|---|---|"]
        for s in sl["stages"]:
            lines.append(f"| {s['stage']} | {_fmt(s.get('seconds'), '.1f')}{' (earlier run)' if s.get('reused') else ''} "
                         f"| {s.get('rc')} |")
        lines += ["", "| edge | verify | edge→cloud mAP@R | edge→edge mAP@R | paragon mAP@R | NFR | criterion |",
                  "|---|---|---|---|---|---|---|"]
        for e, x in sl["edges"].items():
            v = x.get("verdict") or {}
            gates = sorted({f.split(": ", 1)[1].split(" ")[0] for f in v.get("failed", []) if ": " in f})
            verdict = ("PASS" if v.get("passed") else f"FAIL ({', '.join(gates)})") if v else \
                f"not run (exit {x.get('verify_rc')})"
            c = (x.get("compatibility") or [{}])[0]
            par = next((row["map_at_r"] for row in x.get("retrieval") or [] if row["query_model"] == "cloud"), None)
            lines.append(f"| {e} | {verdict} | {_fmt(c.get('edge_to_cloud_map_at_r'), '.4f')} | "
                         f"{_fmt(c.get('edge_to_edge_map_at_r'), '.4f')} | {_fmt(par, '.4f')} | "
                         f"{_fmt(c.get('negative_flip_rate'), '.2%')} | "
                         f"{'-' if not c else ('met' if c.get('criterion_met') else 'not met')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

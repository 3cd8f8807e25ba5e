"""Core ML reference interpreter: fidelity vs torch and speed on Linux, every Core ML format.

The edge model of ``make demo`` (``runs/demo/edge``, mobilenet_w050) is exported to every Core ML
format (``hetero export``'s code path, the 10k Fashion-MNIST test queries as check inputs, so the
export's own emulated fidelity check runs at full size and its time is reported); then hetero's
numpy interpreter (``devices.coreml_interp``) embeds the 10k queries with each package, timed, and
is compared with torch. Also: the cloud model (``runs/demo/cloud``, ResNet-20) at FP32 and FP16,
the edge with an image input (raw pixels in), and every registered backbone (untrained, batch-norm
statistics set from a random batch) at FP32 and FP16 on 512 synthetic inputs.

Targets: min cosine vs torch >= 0.99999 (FP32), >= 0.999 (FP16); >= 200 images/s for the demo
edge on 2 cores. Results are *emulated* (the package's program run op by op with numpy on this
CPU), not Core ML measured on a device. torch runs with 2 threads; numpy's BLAS pool is left at
its default (one thread per core); the interpreter limits it to one thread while it runs (its
default) and the edge rows are also timed with the pool as it is.

    python benchmarks/coreml_interp.py [--edge runs/demo/edge --cloud runs/demo/cloud] [--json F --md F]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from devices.bench import cpu_model
from devices.coreml_interp import Interpreter, coremltools_version, supported_ops
from export import export_checkpoint
from hetero.checkpoint import load_checkpoint
from hetero.data import load_dataset
from hetero.compare import fidelity
from hetero.models import ModelSpec, create_embedding_model, list_backbones
from _results import emit  # benchmarks/_results.py, next to this script

ALL = ("coreml", "coreml-fp16", "coreml-int8w", "coreml-palette6", "coreml-palette4")
MIN_COS = {"fp32": 0.99999, "fp16": 0.999}
IMG_S = 200.0
REPEATS = 3  # timed passes over the queries; the median is reported


def torch_embed(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(torch.from_numpy(x[i:i + 1024])) for i in range(0, len(x), 1024)]).numpy()


def timed(interp: Interpreter, x: np.ndarray, repeats: int = REPEATS) -> tuple[np.ndarray, float]:
    """The interpreter's output and its median images/s over ``repeats`` passes (after a warm-up)."""
    interp.run_batched(x[:64])
    rates, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = interp.run_batched(x)
        rates.append(len(x) / (time.perf_counter() - t0))
    return out, float(np.median(rates))


def row(name: str, fmt: str, precision: str, ref: np.ndarray, got: np.ndarray, img_s: float, **extra) -> dict:
    r = {"model": name, "format": fmt, "precision": precision, "n": int(len(ref)), **fidelity(ref, got),
         "img_s": img_s, **extra}
    want = MIN_COS.get(precision)
    r["cosine_target"] = want
    r["meets"] = None if want is None else bool(r["min_cosine"] >= want)
    return r


def bn_calibrated(backbone: str, dim: int = 128) -> torch.nn.Module:
    """An untrained model whose batch-norm statistics come from a random batch (so folded BN is not
    the identity and deep ResNets' activations stay in FP16 range)."""
    torch.manual_seed(0)
    model = create_embedding_model(ModelSpec(backbone, dim), 1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    model.train()
    with torch.no_grad():
        model(torch.randn(128, 1, 28, 28))
    return model.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edge", default="runs/demo/edge")
    ap.add_argument("--cloud", default="runs/demo/cloud")
    ap.add_argument("--data")
    ap.add_argument("--image-queries", type=int, default=1000, help="queries for the image-input package (batch 1)")
    ap.add_argument("--backbone-inputs", type=int, default=512)
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args()
    if not Path(args.edge).is_dir():
        print(f"error: no edge checkpoint at {args.edge}; run `make demo` first or pass --edge/--cloud", file=sys.stderr)
        return 2
    torch.set_num_threads(2)  # the targets are stated for 2 cores
    load_start = os.getloadavg()
    edge = load_checkpoint(args.edge, role="edge")
    test = load_dataset(args.data, "test", progress=False)
    pixels = test.conform(edge.preprocess).images  # uint8 [N, H, W, C]
    queries = edge.preprocess.apply(pixels)
    desc = f"{test.name} ({len(test)} query images)"
    ref = torch_embed(edge.model.eval(), queries)
    tmp = Path(tempfile.mkdtemp(prefix="coreml-interp-"))
    rows, exports, ops = [], [], {}
    try:
        # the edge, every format, the export's emulated check on the 10k queries
        t0 = time.perf_counter()
        m = export_checkpoint(edge, tmp / "edge", formats=ALL, name="edge", check_inputs=queries, check_desc=desc)
        export_s = time.perf_counter() - t0
        for a in m["artifacts"]:
            f = a["fidelity"]
            exports.append({"format": a["export_format"], "seconds": a["seconds"], "label": f["label"],
                            "min_cosine": f.get("min_cosine"), "top10_agreement": f.get("top10_agreement"),
                            "weight_bytes": a["weight_bytes"]})
            ops[a["export_format"]] = a["ops"]
            interp = Interpreter.from_package(tmp / "edge" / a["file"])
            got, rate = timed(interp, queries)
            extra = {"top10_agreement": f.get("top10_agreement")}
            if a["export_format"] in ("coreml", "coreml-fp16"):  # the same with numpy's BLAS pool as it is
                _, extra["img_s_blas_pool_default"] = timed(Interpreter.from_package(tmp / "edge" / a["file"],
                                                                                    blas_threads=None), queries)
            rows.append(row("edge (demo, mobilenet_w050)", a["export_format"], a["precision"], ref, got, rate, **extra))
            print(rows[-1], flush=True)
        # the edge with an image input: 8-bit pixels in, preprocessing inside the package (batch 1)
        n_img = min(args.image_queries, len(queries))
        mi = export_checkpoint(edge, tmp / "edge-image", formats=("coreml",), name="edge", check_inputs=queries[:n_img],
                               check_desc=f"{test.name} ({n_img} query images)", options={"coreml.image_input": True})
        ops["coreml (image input)"] = mi["artifacts"][0]["ops"]
        interp = Interpreter.from_package(tmp / "edge-image" / mi["artifacts"][0]["file"])
        got, rate = timed(interp, pixels[:n_img].transpose(0, 3, 1, 2).astype(np.float32), repeats=1)
        rows.append(row("edge (demo, mobilenet_w050)", "coreml, image input (pixels)", "fp32", ref[:n_img], got, rate))
        print(rows[-1], flush=True)
        # the cloud
        if Path(args.cloud).is_dir():
            cloud = load_checkpoint(args.cloud, role="cloud")
            cq = cloud.preprocess.apply(test.conform(cloud.preprocess).images)
            cref = torch_embed(cloud.model.eval(), cq)
            mc = export_checkpoint(cloud, tmp / "cloud", formats=ALL[:2], name="cloud", check_inputs=cq[:256])
            for a in mc["artifacts"]:
                ops[f"cloud {a['export_format']}"] = a["ops"]
                got, rate = timed(Interpreter.from_package(tmp / "cloud" / a["file"]), cq, repeats=1)
                rows.append(row(f"cloud (demo, {cloud.spec.backbone})", a["export_format"], a["precision"], cref, got, rate))
                print(rows[-1], flush=True)
        # every registered backbone, untrained
        x = np.random.default_rng(0).standard_normal((args.backbone_inputs, 1, 28, 28)).astype(np.float32)
        for name in list_backbones():
            model = bn_calibrated(name)
            ck = dataclasses.replace(edge, spec=ModelSpec(name, 128), model=model)
            bref = torch_embed(model, x)
            mb = export_checkpoint(ck, tmp / "bb" / name, formats=ALL[:2], name="m", check_inputs=x[:64])
            for a in mb["artifacts"]:
                ops[f"{name} {a['export_format']}"] = a["ops"]
                got, rate = timed(Interpreter.from_package(tmp / "bb" / name / a["file"]), x, repeats=1)
                rows.append(row(f"{name} (untrained)", a["export_format"], a["precision"], bref, got, rate,
                                inputs="synthetic standard normal"))
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seen = sorted({o for v in ops.values() for o in v})
    result = {
        "benchmark": "coreml_interp", "label": "emulated",
        "edge": args.edge, "cloud": args.cloud, "queries": desc,
        "targets": {"min_cosine": MIN_COS, "edge_img_s": IMG_S},
        "edge_export_seconds": export_s, "exports": exports, "rows": rows,
        "ops_seen": seen, "ops_missing": [o for o in seen if o not in supported_ops()],
        "ops_per_package": ops, "interpreter_ops": supported_ops(),
        "threads": {"torch": torch.get_num_threads(),
                    "numpy": "default BLAS pool (OpenBLAS, one thread per core); the interpreter runs it with 1 "
                             "thread (img_s) and as it is (img_s_blas_pool_default)"},
        "host": {"cpu": cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(),
                 "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                     "coremltools": coremltools_version()},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    emit(result, render(result), args.json, args.md)
    return 0


def render(r: dict) -> str:
    h = r["host"]
    lines = [
        "# Core ML reference interpreter (emulated)",
        "",
        f"hetero's numpy interpreter runs each saved `.mlpackage` op by op on Linux (label **emulated**, not measured "
        f"on a device); FP16 programs store FP16 tensors as float16 and round every op's result to FP16 (FP32 inside "
        f"an op). Queries: {r['queries']}. Machine: {h['cpu']}, {h['cores']} cores, load average "
        f"{h['loadavg_start'][0]:.2f} at start and {h['loadavg_end'][0]:.2f} at the end; {r['date'][:10]}; "
        f"numpy {r['versions']['numpy']}, coremltools {r['versions']['coremltools']}, torch {r['versions']['torch']} "
        f"({r['threads']['torch']} threads). numpy: {r['threads']['numpy']}.",
        "",
        "| model | format | precision | inputs | min cosine | mean cosine | max abs diff | top-10 agreement | img/s "
        "| img/s, BLAS pool default | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        t10 = "-" if x.get("top10_agreement") is None else f"{x['top10_agreement']:.2%}"
        pool = "-" if x.get("img_s_blas_pool_default") is None else f"{x['img_s_blas_pool_default']:.0f}"
        if x["meets"] is None:
            verdict = "- (weights compressed)" if x["precision"] not in MIN_COS else "-"
        else:
            verdict = f"cos >= {x['cosine_target']}: {'ok' if x['meets'] else 'MISS'}"
        if x["model"].startswith("edge") and x["format"] in ("coreml", "coreml-fp16"):
            verdict += f"; >= {r['targets']['edge_img_s']:.0f} img/s: {'ok' if x['img_s'] >= r['targets']['edge_img_s'] else 'MISS'}"
        lines.append(f"| {x['model']} | {x['format']} | {x['precision']} | {x['n']} | {x['min_cosine']:.7f} | "
                     f"{x['mean_cosine']:.7f} | {x['max_abs_diff']:.2e} | {t10} | {x['img_s']:.0f} | {pool} | {verdict} |")
    per_format = ", ".join(f"{e['format']} {e['seconds']:.1f} s" for e in r["exports"])
    lines += ["", f"Export of the edge to all {len(r['exports'])} Core ML formats with the emulated check on the "
                  f"{r['queries']}: {r['edge_export_seconds']:.1f} s ({per_format}).",
              f"Ops in the packages ({len(r['ops_seen'])}): {', '.join(r['ops_seen'])}; not in the interpreter: "
              f"{', '.join(r['ops_missing']) or 'none'}.",
              "Untrained backbones: random weights, batch-norm statistics from a random batch, 128-d; "
              "the image-input row feeds raw 8-bit pixel values (batch 1, one run per image)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

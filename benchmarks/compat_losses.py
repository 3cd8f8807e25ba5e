"""Compatibility losses on the embedded protocol: Fashion-MNIST, queries = test (10k), gallery =
train (60k) embedded by the cloud. One row per loss recipe and edge size, plus the control and
plain logit distillation. Rows are appended to ``--out`` (JSON) as they finish, so an interrupted
run resumes where it stopped; the markdown table next to it is rewritten after every row.

    python benchmarks/compat_losses.py                       # full: ResNet-20 cloud 10 epochs (margin 0.2), edges 8 epochs
    python benchmarks/compat_losses.py --edge-epochs 1 --limit 5000 --out /tmp/smoke.json   # smoke run

Every number is measured on the machine that runs it; the JSON records host and date per row.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hetero._atomic import write_json_atomic, write_text_atomic
from hetero.checkpoint import load_checkpoint, save_checkpoint
from hetero.models.complexity import count_flops
from hetero.data import FASHION_MNIST_PREPROCESS as PREP
from hetero.data import load_dataset
from hetero.embed import cloud_targets, embed_images
from hetero.flips import flip_rates, top1_correct
from hetero.metrics import retrieval_metrics
from hetero.app.report import host_info
from hetero.train import TrainConfig, train_cloud, train_edge

SIZES = {  # name -> (backbone, kwargs); FLOPs cut is measured against the cloud
    "w050": ("mobilenet_w050", {}),
    "w035d050": ("mobilenet", {"width": 0.35, "depth": 0.5}),
}
RECIPES = {  # in priority order: the yardstick and the best candidates first
    "control": None,
    "influence+alignment (BCT)": {"influence": 1.0, "alignment": 1.0},
    "influence+alignment+contrastive": {"influence": 1.0, "alignment": 1.0, "contrastive": 0.5},
    "influence+alignment+relational": {"influence": 1.0, "alignment": 1.0, "relational": 1.0},
    "alignment": {"alignment": 1.0},
    "influence": {"influence": 1.0},
    "contrastive": {"contrastive": 1.0},
    "relational": {"relational": 1.0},
    "logit_distill": {"logit_distill": 1.0},
}


def markdown(rows: list[dict], paragon: dict, cloud_flops: int) -> str:
    host = rows[0]["host"] if rows else host_info()
    out = ["# Compatibility losses on Fashion-MNIST (queries: test 10k; gallery: train 60k, cloud-embedded)", "",
           f"Measured on {host['processor']} ({host['cpu_count']} CPUs), torch {host['torch']}, {host['date']}. "
           f"Paragon (cloud->cloud) mAP@R {paragon['map_at_r']:.4f}, R@1 {paragon['recall_at_1']:.4f}; "
           f"cloud {cloud_flops / 1e6:.2f} MFLOPs.", "",
           "| edge | recipe | epochs | edge->cloud mAP@R | R@1 | edge->edge mAP@R | criterion | gap to paragon | "
           "neg. flip rate | edge MFLOPs | cost ratio cloud/edge | train s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['size']} | {r['recipe']} | {r['epochs']} | {r['edge_to_cloud']['map_at_r']:.4f} | "
                   f"{r['edge_to_cloud']['recall_at_1']:.4f} | {r['edge_to_edge']['map_at_r']:.4f} | "
                   f"{'yes' if r['criterion_met'] else 'no'} | {100 * r['gap_to_paragon']:.2f} pts | "
                   f"{100 * r['negative_flip_rate']:.2f}% | {r['edge_flops'] / 1e6:.3f} | {r['cost_ratio']:.1f}x | "
                   f"{r['train_seconds']:.0f} |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cloud", default="runs/bench/cloud", help="cloud checkpoint; trained there if missing")
    ap.add_argument("--cloud-epochs", type=int, default=10)
    ap.add_argument("--cloud-margin", type=float, default=0.2, help="CosFace margin of the cloud's classifier")
    ap.add_argument("--edge-epochs", type=int, default=8)
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names from: " + ", ".join(RECIPES))
    ap.add_argument("--limit", type=int, help="train on the first N images (smoke runs)")
    ap.add_argument("--out", default="benchmarks/results/compat_losses.json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    train, test = load_dataset(None, "train"), load_dataset(None, "test")
    if Path(args.cloud, "hetero.json").is_file():
        cloud = load_checkpoint(args.cloud, role="cloud")
    else:
        print(f"training the cloud (resnet20, {args.cloud_epochs} epochs, augmented, margin {args.cloud_margin}) -> {args.cloud}",
              flush=True)
        cloud = train_cloud(TrainConfig(model="resnet20", epochs=args.cloud_epochs, augment=True, margin=args.cloud_margin,
                                        limit=args.limit), train, PREP)
        save_checkpoint(cloud, args.cloud)
    g_cloud = np.asarray(cloud_targets(cloud, train))
    q_cloud = embed_images(cloud.model, test, PREP, desc="cloud queries")
    paragon = retrieval_metrics(q_cloud, test.labels, g_cloud, train.labels)
    paragon_ok = top1_correct(q_cloud, test.labels, g_cloud, train.labels)
    cloud_flops = count_flops(cloud.model, (1, 28, 28))
    print(f"paragon mAP@R {paragon['map_at_r']:.4f} (cloud {cloud.space[:12]})", flush=True)

    out = Path(args.out)
    state = json.loads(out.read_text()) if out.is_file() else {}
    if state.get("cloud_space") != cloud.space:
        state = {"cloud_space": cloud.space, "rows": []}
    state.update({"paragon": paragon, "cloud_flops": cloud_flops, "cloud_config": cloud.config, "label": "measured",
                  "protocol": "queries: Fashion-MNIST test (10k); gallery: train (60k) embedded by the cloud"})
    done = {(r["size"], r["recipe"], r["epochs"], r.get("limit")) for r in state["rows"]}
    for size in args.sizes.split(","):
        backbone, kwargs = SIZES[size]
        for recipe in args.recipes.split(","):
            if (size, recipe, args.edge_epochs, args.limit) in done:
                continue
            losses = RECIPES[recipe]
            cfg = TrainConfig(model=backbone, model_kwargs=kwargs, epochs=args.edge_epochs, limit=args.limit,
                              compat=losses is not None, losses=losses or {"influence": 1.0, "alignment": 1.0})
            print(f"[{size}] {recipe}", flush=True)
            t0 = time.perf_counter()
            edge = train_edge(cfg, cloud, train)
            train_s = time.perf_counter() - t0
            q = embed_images(edge.model, test, PREP, desc="edge queries")
            g = embed_images(edge.model, train, PREP, desc="edge gallery")
            het = retrieval_metrics(q, test.labels, g_cloud, train.labels)
            hom = retrieval_metrics(q, test.labels, g, train.labels)
            flops = count_flops(edge.model, (1, 28, 28))
            row = {"size": size, "recipe": recipe, "backbone": backbone, "backbone_kwargs": kwargs, "losses": losses,
                   "epochs": args.edge_epochs, "limit": args.limit, "edge_to_cloud": het, "edge_to_edge": hom,
                   "criterion_met": het["map_at_r"] > hom["map_at_r"], "gap_to_paragon": paragon["map_at_r"] - het["map_at_r"],
                   **flip_rates(paragon_ok, top1_correct(q, test.labels, g_cloud, train.labels)),
                   "edge_flops": flops, "cost_ratio": cloud_flops / flops, "train_seconds": train_s,
                   "history": edge.info["history"], "host": host_info(), "label": "measured"}
            state["rows"].append(row)
            write_json_atomic(out, state)
            write_text_atomic(out.with_suffix(".md"), markdown(state["rows"], paragon, cloud_flops))
            print(f"  edge->cloud {het['map_at_r']:.4f}  edge->edge {hom['map_at_r']:.4f}  gap {row['gap_to_paragon']:.4f}  "
                  f"NFR {row['negative_flip_rate']:.4f}  ({train_s:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

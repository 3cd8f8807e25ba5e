"""Backward-compatible cloud update on the embedded protocol: Fashion-MNIST, queries = test (10k),
gallery = train (60k). The old cloud (the one `compat_losses.py` uses) has indexed the gallery; a
new, bigger cloud model is trained into the old space with `train_edge` (BCT: its own classifier +
influence through the old, frozen classifier) and compared with the same model trained
independently (what you would get by re-indexing the gallery with it).

Rows: old->old (the indexed baseline), new->old (the update without backfill), new->new (after a
backfill). The update criterion is new->old > old->old. Flip rates are against old->old top-1.

    python benchmarks/compat_update.py                                  # full: ResNet-32, 10 epochs each
    python benchmarks/compat_update.py --epochs 1 --limit 3000 --out /tmp/upd.json --runs /tmp/upd   # smoke

Trained models are kept under ``--runs`` and results rows appended to ``--out`` as they finish, so an
interrupted run resumes. Every number is measured on the machine that runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from hetero._atomic import write_json_atomic, write_text_atomic
from hetero.checkpoint import load_checkpoint, save_checkpoint
from hetero.models.complexity import count_flops
from hetero.data import FASHION_MNIST_PREPROCESS as PREP
from hetero.data import load_dataset
from hetero.errors import HeteroError
from hetero.app.evaluate import score_models
from hetero.app.report import host_info
from hetero.train import TrainConfig, train_cloud, train_edge

FLIPS = ("negative_flip_rate", "positive_flip_rate")


def markdown(state: dict) -> str:
    host = state["rows"][0]["host"] if state["rows"] else host_info()
    old = state["old"]
    out = ["# Backward-compatible cloud update on Fashion-MNIST (queries: test 10k; gallery: train 60k)", "",
           f"Measured on {host['processor']} ({host['cpu_count']} CPUs), torch {host['torch']}, {host['date']}. "
           f"Old cloud: {old['model']} ({old['flops'] / 1e6:.2f} MFLOPs), old->old mAP@R {old['old_to_old']['map_at_r']:.4f}, "
           f"R@1 {old['old_to_old']['recall_at_1']:.4f}. Flip rates are top-1 against old->old.", "",
           "| new model | training | epochs | new->old mAP@R | R@1 | update criterion (new->old > old->old) | "
           "new->new mAP@R | R@1 | neg. flips new->old | neg. flips new->new | new MFLOPs | train s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in state["rows"]:
        out.append(f"| {r['model']} | {r['training']} | {r['epochs']} | {r['new_to_old']['map_at_r']:.4f} | "
                   f"{r['new_to_old']['recall_at_1']:.4f} | {'yes' if r['criterion_met'] else 'no'} | "
                   f"{r['new_to_new']['map_at_r']:.4f} | {r['new_to_new']['recall_at_1']:.4f} | "
                   f"{100 * r['flips_new_to_old']['negative_flip_rate']:.2f}% | "
                   f"{100 * r['flips_new_to_new']['negative_flip_rate']:.2f}% | {r['flops'] / 1e6:.2f} | "
                   f"{r['train_seconds']:.0f} |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default="runs/bench/cloud", help="the old cloud checkpoint (from compat_losses.py)")
    ap.add_argument("--model", default="resnet32", help="backbone of the new cloud model")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--margin", type=float, default=0.2, help="CosFace margin of the new model's own classifier")
    ap.add_argument("--trainings", default="compatible,independent")
    ap.add_argument("--limit", type=int, help="train on the first N images (smoke runs)")
    ap.add_argument("--runs", default="runs/bench/update", help="where the new models are kept")
    ap.add_argument("--out", default="benchmarks/results/compat_update.json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    if not Path(args.old, "hetero.json").is_file():
        raise HeteroError(f"no old cloud at {args.old}; run benchmarks/compat_losses.py first (it trains one) or pass --old")
    old = load_checkpoint(args.old, role="cloud")
    train, test = load_dataset(None, "train"), load_dataset(None, "test")

    out = Path(args.out)
    state = json.loads(out.read_text()) if out.is_file() else {}
    if state.get("old_space") != old.space:
        state = {"old_space": old.space, "rows": []}
    state.update({"old": {"model": old.spec.backbone, "config": old.config, "flops": count_flops(old.model, (1, 28, 28))},
                  "label": "measured", "protocol": "queries: Fashion-MNIST test (10k); gallery: train (60k)"})
    done = {(r["model"], r["training"], r["epochs"], r.get("limit")) for r in state["rows"]}
    for training in args.trainings.split(","):
        if (args.model, training, args.epochs, args.limit) in done:
            continue
        cfg = TrainConfig(model=args.model, epochs=args.epochs, augment=True, margin=args.margin, limit=args.limit,
                          losses={"ce": 1.0, "influence": 1.0}, loss_options={"ce": {"margin": args.margin}})
        path = Path(args.runs, f"{args.model}-{training}-e{args.epochs}" + (f"-n{args.limit}" if args.limit else ""))
        t0 = time.perf_counter()
        if Path(path, "hetero.json").is_file():
            new = load_checkpoint(path)
            train_s = new.info.get("train_seconds", float("nan"))
        else:
            print(f"training {args.model} ({training}, {args.epochs} epochs) -> {path}", flush=True)
            if training == "compatible":
                new = train_edge(cfg, old, train)
            elif training == "independent":
                new = train_cloud(cfg, train, PREP)
            else:
                raise HeteroError(f"unknown training {training!r}; use compatible or independent")
            train_s = time.perf_counter() - t0
            new.info["train_seconds"] = train_s
            save_checkpoint(new, path)
        # the rows `hetero evaluate --update` reports; flips are against old->old's top-1
        scored = {(r["query_model"], r["gallery_model"]): r for r in
                  score_models(old, {"new": new}, test, train, reference="old")["retrieval"]}
        old_old, new_old, new_new = scored[("old", "old")], scored[("new", "old")], scored[("new", "new")]
        state["old"]["old_to_old"] = old_old
        row = {"model": args.model, "training": training, "epochs": args.epochs, "limit": args.limit,
               "config": new.config, "new_to_old": new_old, "new_to_new": new_new,
               "criterion_met": new_old["map_at_r"] > old_old["map_at_r"],
               "flips_new_to_old": {k: new_old[k] for k in FLIPS}, "flips_new_to_new": {k: new_new[k] for k in FLIPS},
               "flops": count_flops(new.model, (1, 28, 28)), "train_seconds": train_s,
               "history": new.info.get("history"), "host": host_info(), "label": "measured"}
        state["rows"].append(row)
        write_json_atomic(out, state)
        write_text_atomic(out.with_suffix(".md"), markdown(state))
        print(f"  {training}: new->old {new_old['map_at_r']:.4f}  new->new {new_new['map_at_r']:.4f}  "
              f"old->old {old_old['map_at_r']:.4f}  ({train_s:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HeteroError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

"""Compatibility-aware architecture search against hand-designed edges, on the embedded protocol:
Fashion-MNIST, queries = test (10k), gallery = train (60k) embedded by the cloud.

Steps, each resumable (state in ``--out``, a JSON rewritten after every step; the supernet resumes
per epoch):
1. the cloud: the shipped pretrained ResNet-20 (paragon 0.8524 mAP@R), ``--cloud CKPT``, or one
   trained here with ``--cloud-model`` (e.g. ``resnet20 --cloud-kwargs width=32``: 4x the FLOPs,
   so every cost ratio is 4x larger; its training time and paragon are reported);
2. the supernet: ``hetero train-supernet`` (``--supernet-epochs``);
3. the search: one budget per hand-designed edge's FLOPs plus the 80x budget (cloud FLOPs / 80);
4. every searched subnet fine-tuned from the supernet, and every hand-designed edge trained from
   scratch, with the same recipe and the same number of epochs (``--edge-epochs``, ``--recipe``);
5. each scored on the protocol with the verify scorer: mAP@R, gap to paragon, criterion, negative
   flip rate, FLOPs, params, cost ratio, and p50 latency on host-cpu-1thread (ONNX, batch 1).

    python benchmarks/search.py                                   # full run (hours on 2 cores)
    python benchmarks/search.py --cloud-model resnet20 --cloud-kwargs width=32 --cloud-epochs 8 \
        --space benchmarks/search_space_head128.json --supernet-epochs 3 --edge-epochs 16 --population 30 \
        --generations 3 --finetune-top 3 --finetune-epochs 1   # the README's headline run (its supernet and
                                                               # hand-designed edges were trained on a GPU)
    python benchmarks/search.py --smoke --out /tmp/search.json    # minutes: small data, 1 epoch each
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

HAND = {"w050": ("mobilenet_w050", {}), "w035d050": ("mobilenet", {"width": 0.35, "depth": 0.5})}


def score(ckpt, cloud, queries, gallery, g_cloud, q_cloud) -> dict:
    from hetero.models.complexity import count_flops, count_params
    from hetero.embed import embed_images
    from hetero.app.verify.score import Scorer

    prep = cloud.preprocess
    q = embed_images(ckpt.model, queries, prep, progress=False)
    g = embed_images(ckpt.model, gallery, prep, progress=False)
    sc = Scorer(g_cloud, gallery.labels, queries.labels, q_cloud)
    sc.set_reference(q, g)
    m = sc.score(q)
    return {"map_at_r": m["map_at_r"], "recall_at_1": m["recall_at_1"], "edge_to_edge": sc.edge_to_edge["map_at_r"],
            "paragon": sc.paragon_metrics["map_at_r"], "gap_to_paragon": m["gap_to_paragon"],
            "criterion_met": m["criterion_met"], "negative_flip_rate": m["flips_vs_paragon"]["negative"],
            "flops": count_flops(ckpt.model, ckpt.input_shape), "params": count_params(ckpt.model)}


def latency(ckpt) -> float | None:
    import tempfile

    from devices.standalone import bench_export
    from export import export_checkpoint

    with tempfile.TemporaryDirectory() as d:
        export_checkpoint(ckpt, Path(d) / "x", formats=("onnx",),
                          check_inputs=np.zeros((4, *ckpt.input_shape), np.float32))
        res = bench_export(Path(d) / "x", profile="host-cpu-1thread", batch_sizes=(1,), iters=500, warmup=50)
    return float(res["results"][0]["p50_ms"])


def markdown(state: dict) -> str:
    rows = state.get("rows", [])
    h = state.get("host", {})
    out = ["# Architecture search vs hand-designed edges (queries: test 10k; gallery: train 60k, cloud-embedded)", "",
           f"Last run on {h.get('processor', '?')} ({h.get('cpu_count', '?')} CPUs), {h.get('date', '?')}; supernet trained "
           f"on {state.get('supernet_trained_on', 'this host')}, each edge where its row says. Cloud: "
           f"{state.get('cloud', '?')} (paragon mAP@R {state.get('paragon', float('nan')):.4f}, "
           f"{state.get('cloud_flops', 0) / 1e6:.2f} MFLOPs). Recipe {state.get('recipe')}, {state.get('edge_epochs')} "
           f"epochs on both sides; supernet {state.get('supernet_epochs')} epochs. Space: {state.get('space', 'default')} "
           "(changes to the defaults of hetero/nas/space.py).", "",
           "| edge | kind | budget | MFLOPs | params | cost ratio | edge->cloud mAP@R | gap (pts) | criterion | NFR | "
           "p50 ms (host-cpu-1thread) | trained on |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = f"{r['latency_ms']:.3f}" if r.get("latency_ms") else "-"
        out.append(f"| {r['name']}{' (= ' + r['same_as'] + ')' if r.get('same_as') else ''} | {r['kind']} | "
                   f"{r.get('budget') or '-'} | {r['flops'] / 1e6:.3f} | {r['params']:,} | "
                   f"{r['cost_ratio']:.1f}x | {r['map_at_r']:.4f} | {100 * r['gap_to_paragon']:.2f} | "
                   f"{'yes' if r['criterion_met'] else 'no'} | {100 * r['negative_flip_rate']:.2f}% | {lat} | "
                   f"{r.get('trained_on', 'this host')} |")
    for pts in (0.3, 1.0):
        ok = [r for r in rows if 100 * r["gap_to_paragon"] <= pts]
        best = max(ok, key=lambda r: r["cost_ratio"]) if ok else None
        out.append("")
        out.append(f"Largest cost ratio with a gap of at most {pts} points: "
                   + (f"**{best['cost_ratio']:.1f}x** ({best['name']})" if best else "none reached"))
    if state.get("search"):
        s = state["search"]
        out += ["", f"Search: {s['evaluations']} candidates in {s['search_seconds']:.0f} s "
                f"({s['search_seconds'] / max(1, s['evaluations']):.2f} s each, BN recalibration included) on "
                f"{s.get('ran_on', 'this host')}."]
        if s.get("finetune_top"):
            out += ["", f"Each budget's choice: the best of its top {s['finetune_top']} by the supernet proxy after "
                    f"{s['finetune_epochs']} fine-tuning epoch{'s' if s['finetune_epochs'] != 1 else ''} on the training split minus validation "
                    f"({len(s['finetuned'])} subnets, {s['finetune_seconds']:.0f} s)."]
    if state.get("latency_remeasured"):
        out += ["", f"Latency measured on {state.get('latency_host', h.get('processor', '?'))}, "
                f"{state['latency_remeasured']}, idle."]
    return "\n".join(out) + "\n"


def train_cloud_here(args, work: Path, train, limit):
    """Train the benchmark's own cloud into ``work/cloud-trained`` (step-level state in ``.resume``), or load it."""
    from hetero._resume import Snapshots, read_state
    from hetero.checkpoint import load_checkpoint, save_checkpoint
    from hetero.app.options import parse_kv
    from hetero.data import FASHION_MNIST_PREPROCESS
    from hetero.train import TrainConfig, train_cloud

    out = work / "cloud-trained"
    if (out / "hetero.json").is_file():
        return load_checkpoint(out, role="cloud")
    cfg = TrainConfig(model=args.cloud_model, model_kwargs=parse_kv(args.cloud_kwargs, "--cloud-kwargs") if args.cloud_kwargs
                      else {}, epochs=1 if args.smoke else args.cloud_epochs, augment=True, margin=0.2, seed=0, limit=limit)
    state_dir = work / "cloud-trained.resume"
    loaded = read_state(state_dir) if (state_dir / "state.pt").is_file() else None
    snaps = Snapshots(state_dir, run={"command": "benchmarks/search.py cloud"}, loaded=loaded)
    ckpt = train_cloud(cfg, train, FASHION_MNIST_PREPROCESS, snapshots=snaps)
    save_checkpoint(ckpt, out, overwrite=True)
    shutil.rmtree(state_dir, ignore_errors=True)
    return load_checkpoint(out, role="cloud")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cloud", help="cloud checkpoint (default: the shipped pretrained ResNet-20)")
    ap.add_argument("--cloud-model", help="train this cloud backbone here first (e.g. resnet20), as the shipped one was "
                    "trained: augmented, margin 0.2, seed 0; resumable. A larger cloud raises every cost ratio")
    ap.add_argument("--cloud-kwargs", default="", help="backbone options of --cloud-model, e.g. width=32")
    ap.add_argument("--cloud-epochs", type=int, default=10)
    ap.add_argument("--supernet-epochs", type=int, default=10)
    ap.add_argument("--edge-epochs", type=int, default=8)
    ap.add_argument("--recipe", default="influence=1", help="loss recipe for both sides (README: the best at 8 epochs)")
    ap.add_argument("--population", type=int, default=40)
    ap.add_argument("--generations", type=int, default=5)
    ap.add_argument("--finetune-top", type=int, default=0,
                    help="search: per budget, fine-tune the best N by the supernet proxy and choose by the fine-tuned reward")
    ap.add_argument("--finetune-epochs", type=int, default=1, help="epochs of that fine-tuning (recipe: --recipe)")
    ap.add_argument("--space", help="JSON file of search-space fields for the supernet (train-supernet --space)")
    ap.add_argument("--work", default="runs/bench-search", help="where the supernet, search and edges go")
    ap.add_argument("--out", default="benchmarks/results/search.json")
    ap.add_argument("--smoke", action="store_true", help="small data and 1 epoch everywhere: checks the pipeline")
    ap.add_argument("--skip-latency", action="store_true",
                    help="leave the latency column empty (e.g. on a GPU host, whose CPU is not the one to report); "
                         "fill it later with --remeasure-latency")
    ap.add_argument("--remeasure-latency", action="store_true",
                    help="time the finished rows' saved edges again (e.g. on an idle host) and rewrite the results")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    from hetero import distributed
    from hetero._atomic import write_json_atomic, write_text_atomic
    from hetero.checkpoint import load_checkpoint, save_checkpoint
    from hetero.app.options import parse_kv
    from hetero.models.complexity import count_flops
    from hetero.data import load_dataset
    from hetero.embed import cloud_targets, embed_on_training_device
    from hetero.app.search import SearchConfig, read_arch, search
    from hetero.nas.train import SupernetConfig, load_supernet, train_supernet
    from hetero.pretrained import load_pretrained
    from hetero.app.report import host_info
    from hetero.train import TrainConfig, train_edge

    work, out = Path(args.work), Path(args.out)
    state = json.loads(out.read_text()) if out.is_file() else {}
    limit = 6000 if args.smoke else None
    sn_epochs, e_epochs = (1, 1) if args.smoke else (args.supernet_epochs, args.edge_epochs)
    recipe = parse_kv(args.recipe, "--recipe")
    train, test = load_dataset(None, "train"), load_dataset(None, "test")
    if args.cloud and args.cloud_model:
        ap.error("give --cloud (a trained cloud) or --cloud-model (train one here), not both")
    if args.cloud_model:
        cloud = train_cloud_here(args, work, train, limit)
        cloud_desc = (f"{args.cloud_model} {args.cloud_kwargs or ''}".strip() + f", trained here: {args.cloud_epochs} "
                      f"epochs, augmented, margin 0.2, {cloud.info['train_seconds']:.0f} s")
    else:
        cloud = load_checkpoint(args.cloud, role="cloud") if args.cloud else load_pretrained("fmnist-resnet20")
        cloud_desc = str(args.cloud or "shipped fmnist-resnet20")
        if not cloud.path:
            save_checkpoint(cloud, work / "cloud", overwrite=True)
            cloud = load_checkpoint(work / "cloud")
    queries = test.subset(2000) if args.smoke else test
    g_cloud = np.asarray(cloud_targets(cloud, train))
    q_cloud = embed_on_training_device(cloud.model, queries, cloud.preprocess)
    dev, hi = distributed.device(), host_info()
    where = (f"{torch.cuda.get_device_name(dev)} ({hi['cpu_count']}-CPU host)" if dev.type == "cuda"
             else f"{hi['processor']} ({hi['cpu_count']} CPUs)")  # what trains and searches in this run
    state.update({"label": "measured", "host": hi, "cloud": cloud_desc, "recipe": recipe,
                  "edge_epochs": e_epochs, "supernet_epochs": sn_epochs, "smoke": args.smoke,
                  "space": json.loads(Path(args.space).read_text()) if args.space else "default",
                  "cloud_flops": count_flops(cloud.model, cloud.input_shape)})
    state.setdefault("rows", [])

    def save():
        write_json_atomic(out, state)
        write_text_atomic(out.with_suffix(".md"), markdown(state))

    sn = work / "supernet"
    meta = json.loads((sn / "supernet.json").read_text()) if (sn / "supernet.json").is_file() else {}
    if meta.get("epochs_done", 0) < sn_epochs:
        t0 = time.perf_counter()
        space = json.loads(Path(args.space).read_text()) if args.space else None
        meta = train_supernet(SupernetConfig(epochs=sn_epochs, limit=limit, val_size=1000 if args.smoke else 5000,
                                             space=space),
                              cloud, train, sn, resume=(sn / "supernet.json").is_file())
        state["supernet_seconds"] = state.get("supernet_seconds", 0) + time.perf_counter() - t0
        state["supernet_trained_on"] = where
        save()
    hand_flops = {}
    for name, (model, kw) in HAND.items():
        from hetero.models import ModelSpec, create_embedding_model

        hand_flops[name] = count_flops(create_embedding_model(ModelSpec(model, cloud.spec.dim, kw), 1), cloud.input_shape)
    budgets = [f"flops={f / 1e6:.4f}M" for f in hand_flops.values()] + [f"flops={state['cloud_flops'] / 80 / 1e6:.4f}M"]
    if not (work / "search" / "pareto.json").is_file():
        res = search(str(sn), str(cloud.path), budgets, out=str(work / "search"),
                     cfg=SearchConfig(population=8 if args.smoke else args.population,
                                      generations=1 if args.smoke else args.generations,
                                      finetune_top=args.finetune_top, finetune_epochs=args.finetune_epochs,
                                      finetune_losses=recipe))
        state["search"] = {**{k: res.pareto[k] for k in ("evaluations", "search_seconds", "best", "finetuned", "finetune_seconds")},
                           "ran_on": where, "finetune_top": args.finetune_top, "finetune_epochs": args.finetune_epochs}
        save()
    for ext in ("json", "png"):  # every candidate and the plot, next to the results
        if (work / "search" / f"pareto.{ext}").is_file():
            shutil.copyfile(work / "search" / f"pareto.{ext}", out.with_name(f"{out.stem}_pareto.{ext}"))
    if args.remeasure_latency:
        for row in state["rows"]:
            row["latency_ms"] = latency(load_checkpoint(work / row["name"].replace(" ", "-")))
            print(f"{row['name']}: p50 {row['latency_ms']:.3f} ms", flush=True)
        hi = host_info()
        state["latency_remeasured"], state["latency_host"] = hi["date"], f"{hi['processor']} ({hi['cpu_count']} CPUs)"
        save()
    done = {r["name"] for r in state["rows"]}
    jobs = [(f"hand {n}", "hand-designed", None, m, kw) for n, (m, kw) in HAND.items()]
    jobs += [(f"searched {b}", "searched", b, None, None) for b in budgets]
    for name, kind, budget, model, kw in jobs:
        if name in done:
            continue
        t0 = time.perf_counter()
        init = None
        if kind == "searched":
            slug = budget.replace("=", "-")
            arch, space = read_arch(str(work / "search" / f"arch-{slug}.json"))
            model, kw = "nas_mbv3", {"arch": arch.to_dict(), "space": space.to_dict()}
            twin = next((r for r in state["rows"] if r.get("arch") == arch.to_dict()), None)
            if twin is not None:  # the same subnet chosen for an earlier budget: the same training, so not run twice
                state["rows"].append({**twin, "name": name, "budget": budget, "same_as": twin["name"]})
                save()
                print(f"{name}: the same subnet as {twin['name']}", flush=True)
                continue
            init = load_supernet(sn)[0].extract(arch).state_dict()
        cfg = TrainConfig(model=model, model_kwargs=kw, dim=cloud.spec.dim, epochs=e_epochs, losses=recipe, limit=limit)
        ckpt = train_edge(cfg, cloud, train, init_state=init)
        save_checkpoint(ckpt, work / name.replace(" ", "-"), overwrite=True)
        row = {"name": name, "kind": kind, "budget": budget, **score(ckpt, cloud, queries, train, g_cloud, q_cloud),
               "train_seconds": time.perf_counter() - t0, "trained_on": where}
        row["cost_ratio"] = state["cloud_flops"] / row["flops"]
        if kind == "searched":
            row["arch"] = kw["arch"]
        state["paragon"] = row["paragon"]
        try:
            if not args.skip_latency:
                row["latency_ms"] = latency(ckpt)
        except Exception as e:  # noqa: BLE001 - latency is a column, not the benchmark
            row["latency_error"] = str(e).splitlines()[0]
        state["rows"].append(row)
        save()
        print(f"{name}: mAP@R {row['map_at_r']:.4f}, gap {100 * row['gap_to_paragon']:.2f} pts, {row['cost_ratio']:.1f}x",
              flush=True)
    save()  # also when every step was already done, so the markdown follows the JSON
    print(markdown(state))
    return 0


if __name__ == "__main__":
    sys.exit(main())

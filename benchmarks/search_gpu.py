"""benchmarks/search.py on a GPU host inside a fixed time budget: time a few training steps of the
supernet and of an edge on the GPU first, size the epochs to fit, then run the benchmark with them.

Written for the lent GPU machine, whose time is counted in minutes: the epochs cannot be known
beforehand. Both sides of the comparison get the same edge epochs, as benchmarks/search.py always
does. The benchmark's state is resumable, so a run cut short by the deadline can be finished
elsewhere with the same flags (``--supernet-epochs``/``--edge-epochs`` as printed).

    HETERO_TRAIN_DEVICE=cuda python benchmarks/search_gpu.py --seconds 520 --work runs/bench-search-gpu \\
        --out runs/search-gpu.json --space benchmarks/search_space_head128.json

``--work`` must already hold the cloud (``cloud-trained/``), as left by a benchmarks/search.py run
with ``--cloud-model``. The latency column is left empty (``--skip-latency``): the GPU host's CPU is
not the one to report; run ``benchmarks/search.py --remeasure-latency`` on the target host after.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _timed(fn) -> float:
    import torch

    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def calibrate(work: Path, space: dict | None, recipe: dict) -> dict:
    """Seconds per training image of the supernet (sandwich) and of the largest hand-designed edge,
    from the difference of two short runs (so start-up costs cancel), after a warm-up run."""
    from hetero.checkpoint import load_checkpoint
    from hetero.data import load_dataset
    from hetero.nas.train import SupernetConfig, train_supernet
    from hetero.train import TrainConfig, train_edge

    cloud = load_checkpoint(work / "cloud-trained", role="cloud")
    train = load_dataset(None, "train", progress=False)
    small, large, val = 2048, 6144, 256
    out: dict = {}
    with tempfile.TemporaryDirectory() as d:
        def sn(limit, name):
            return _timed(lambda: train_supernet(SupernetConfig(epochs=1, limit=limit, val_size=val, space=space), cloud,
                                                 train, Path(d) / name, progress=False))
        sn(768, "warm")
        out["supernet_s_per_img"] = (sn(large, "b") - sn(small, "a")) / (large - small)

        def edge(limit):
            return _timed(lambda: train_edge(TrainConfig(model="mobilenet_w050", dim=cloud.spec.dim, epochs=1,
                                                         losses=recipe, limit=limit), cloud, train, progress=False))
        edge(768)
        out["edge_s_per_img"] = (edge(large) - edge(small)) / (large - small)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=520, help="wall-clock budget for everything, calibration included")
    ap.add_argument("--work", default="runs/bench-search-gpu")
    ap.add_argument("--out", default="runs/search-gpu.json")
    ap.add_argument("--space", default=str(HERE / "search_space_head128.json"))
    ap.add_argument("--recipe", default="influence=1")
    ap.add_argument("--population", type=int, default=30)
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--search-seconds", type=float, default=110, help="time set aside for the search")
    ap.add_argument("--fixed-seconds", type=float, default=80,
                    help="time set aside for data, cloud targets, scoring and writing")
    ap.add_argument("--supernet-share", type=float, default=0.4, help="share of the training time for the supernet")
    ap.add_argument("--edges", type=int, default=5, help="edges the benchmark trains (hand-designed + searched)")
    ap.add_argument("--max-epochs", type=int, default=60)
    ap.add_argument("--smoke", action="store_true", help="pass --smoke to the benchmark (checks the pipeline)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    work = Path(args.work)
    if not (work / "cloud-trained" / "hetero.json").is_file():
        print(f"error: {work}/cloud-trained holds no cloud; run benchmarks/search.py --cloud-model ... there first, "
              "or copy its cloud-trained/", file=sys.stderr)
        return 2
    from hetero import distributed
    from hetero.app.options import parse_kv

    space = json.loads(Path(args.space).read_text()) if args.space else None
    cal = calibrate(work, space, parse_kv(args.recipe, "--recipe"))
    cal["calibration_seconds"] = time.perf_counter() - t0
    left = args.seconds - cal["calibration_seconds"] - args.search_seconds - args.fixed_seconds
    n_train = 60000 - 5000  # the supernet trains on train minus its validation split; the edges on all of train
    sn_epoch = cal["supernet_s_per_img"] * n_train
    edge_epoch = cal["edge_s_per_img"] * 60000
    cal["supernet_epochs"] = max(1, min(args.max_epochs, int(args.supernet_share * left / sn_epoch)))
    cal["edge_epochs"] = max(1, min(args.max_epochs, int((1 - args.supernet_share) * left / (args.edges * edge_epoch))))
    cal.update({"device": str(distributed.device()), "supernet_epoch_s_est": sn_epoch, "edge_epoch_s_est": edge_epoch,
                "seconds_for_training": left})
    print("calibration: " + json.dumps(cal), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).with_name(Path(args.out).stem + "_calibration.json").write_text(json.dumps(cal, indent=1))
    cmd = [sys.executable, str(HERE / "search.py"), "--cloud-model", "resnet20", "--cloud-kwargs", "width=32",
           "--cloud-epochs", "8", "--space", args.space, "--recipe", args.recipe, "--work", str(work), "--out", args.out,
           "--supernet-epochs", str(cal["supernet_epochs"]), "--edge-epochs", str(cal["edge_epochs"]),
           "--population", str(args.population), "--generations", str(args.generations), "--skip-latency"] + (["--smoke"] if args.smoke else [])
    print(" ".join(cmd), flush=True)
    remaining = args.seconds - (time.perf_counter() - t0)
    try:
        return subprocess.run(cmd, timeout=max(1.0, remaining), env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    except subprocess.TimeoutExpired:
        print(f"deadline: the benchmark was stopped after {args.seconds:.0f} s in all; its state in {args.out} and "
              f"{work} resumes with the command above", flush=True)
        return 3


if __name__ == "__main__":
    sys.exit(main())

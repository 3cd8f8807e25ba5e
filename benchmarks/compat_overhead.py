"""Training-step overhead of the compatibility losses over plain training (target: <= 1.3x).

Plain = the control: edge model + its own cosine classifier, cross-entropy. Compatible = the same
edge model with influence (frozen cloud classifier) + cosine alignment to *cached* cloud targets.
Both run the same data, batch size and model; the script alternates them and compares the median
images/s of the training loop. Cloud quality does not matter for speed, so a 1-epoch cloud on a
subset is trained when no ``--cloud`` is given.

    python benchmarks/compat_overhead.py [--cloud runs/bench/cloud] [--edge mobilenet_w050] [--images 6000]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


from hetero.checkpoint import load_checkpoint
from hetero.data import FASHION_MNIST_PREPROCESS as PREP
from hetero.data import load_dataset
from hetero.embed import cloud_targets
from hetero.app.report import host_info
from hetero.train import TrainConfig, train_cloud, train_edge

TARGET = 1.3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cloud")
    ap.add_argument("--edge", default="mobilenet_w050")
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--losses", default="influence=1,alignment=1")
    ap.add_argument("--json")
    args = ap.parse_args()
    train = load_dataset(None, "train")
    if args.cloud:
        cloud = load_checkpoint(args.cloud, role="cloud")
    else:
        cloud = train_cloud(TrainConfig(model="resnet20", epochs=1, limit=2000), train, PREP, progress=False)
    losses = {k: float(v) for k, v in (p.split("=") for p in args.losses.split(","))}
    cloud_targets(cloud, train.subset(args.images), progress=False)  # cache once, outside the timing
    rates: dict[str, list[float]] = {"plain": [], "compat": []}
    for _ in range(args.repeats):
        for name, compat in (("plain", False), ("compat", True)):
            cfg = TrainConfig(model=args.edge, epochs=1, limit=args.images, compat=compat, losses=losses, targets="cached")
            edge = train_edge(cfg, cloud, train, progress=False)
            rates[name].append(edge.info["history"][0]["img_per_s"])
    plain, compat = statistics.median(rates["plain"]), statistics.median(rates["compat"])
    ratio = plain / compat
    host = host_info()
    print(f"edge {args.edge}, {args.images} images/epoch, batch 128, losses {losses}, {args.repeats} repeats")
    print(f"plain training:      {plain:8.1f} img/s (median)")
    print(f"compatible training: {compat:8.1f} img/s (median, cached cloud targets)")
    print(f"overhead per step: {ratio:.3f}x (target <= {TARGET}x: {'meets' if ratio <= TARGET else 'MISSES'})")
    print(f"machine: {host['processor']}, {host['cpu_count']} CPUs, torch {host['torch']}, {host['date']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "compat_overhead", "edge": args.edge, "images": args.images,
                                               "losses": losses, "rates_img_per_s": rates, "overhead": ratio,
                                               "target": TARGET, "host": host, "label": "measured"}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

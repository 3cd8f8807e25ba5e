"""Time hetero.metrics.retrieval_metrics on the embedded benchmark's shape (10k x 60k, dim 128).

Embeddings are synthetic: unit-norm class centres plus Gaussian noise, renormalised, so mAP@R
lands strictly between 0 and 1 and the ranking work is realistic. Prints the time, the 20 s
target, the ratio target / measured (>= 1 meets it), the metrics, and where it was measured.

    python benchmarks/metrics_speed.py --queries 10000 --gallery 60000 --dim 128 --classes 10
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import numpy as np

from devices.bench import cpu_model
from hetero.metrics import retrieval_metrics

TARGET_S = 20.0


def clustered_embeddings(
    n: int, centres: np.ndarray, noise: float, rng: np.random.Generator, balanced: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm embeddings around class centres, with their labels."""
    classes = centres.shape[0]
    labels = np.arange(n) % classes if balanced else rng.integers(0, classes, n)
    x = centres[labels] + noise * rng.standard_normal((n, centres.shape[1])).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=10000)
    ap.add_argument("--gallery", type=int, default=60000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--noise", type=float, default=0.25, help="per-dimension noise std around unit centres")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=1, help="report the best of this many runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the result to this JSON file")
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.classes, args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    gallery, gallery_labels = clustered_embeddings(args.gallery, centres, args.noise, rng, balanced=True)
    query, query_labels = clustered_embeddings(args.queries, centres, args.noise, rng, balanced=False)

    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        metrics = retrieval_metrics(query, query_labels, gallery, gallery_labels, chunk_size=args.chunk_size)
        times.append(time.perf_counter() - t0)
    seconds = min(times)

    print(f"retrieval_metrics: {args.queries} queries x {args.gallery} gallery, dim {args.dim}, "
          f"{args.classes} classes, chunk_size {args.chunk_size}")
    print("metrics: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    print(f"measured: {seconds:.2f} s (best of {args.repeats})")
    print(f"target:   {TARGET_S:.0f} s")
    print(f"ratio target/measured: {TARGET_S / seconds:.2f} ({'meets' if seconds <= TARGET_S else 'MISSES'} target)")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(f"machine: {platform.platform()}, {cpu_model()}, "
          f"cpu_count={os.cpu_count()}, usable={usable}, python {platform.python_version()}, numpy {np.__version__}")
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"date: {date}")
    if args.json:
        result = {"benchmark": "metrics_speed", "args": vars(args), "seconds": seconds, "target_s": TARGET_S,
                  "ratio_target_over_measured": TARGET_S / seconds, "metrics": metrics, "label": "measured",
                  "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "usable_cpus": usable,
                              "python": platform.python_version(), "numpy": np.__version__}, "date": date}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()

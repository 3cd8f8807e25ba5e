"""Latency-harness overhead: `hetero bench`'s harness against a bare `session.run` loop on the same
ONNX model, batch sizes and thread count (target: at most 5% slower).

Both time every call with perf_counter_ns on the same pre-made input; they alternate, several
rounds, and the medians of the per-round p50s are compared. Uses the demo's export
(`runs/demo/deploy` from `make deploy`, or `runs/demo/export`).

    python benchmarks/harness_overhead.py [--export DIR] [--threads 1] [--iters 2000] [--rounds 5] [--json F]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from devices import bench, create_runner
from devices.bench import host

TARGET = 1.05


def bare_loop(path: Path, x: np.ndarray, threads: int, warmup: int, iters: int) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    out = [sess.get_outputs()[0].name]
    for _ in range(warmup):
        sess.run(out, feed)
    times = []
    clock = time.perf_counter_ns
    for _ in range(iters):
        t0 = clock()
        sess.run(out, feed)
        times.append(clock() - t0)
    return float(np.percentile(np.asarray(times) / 1e6, 50))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    d = next((Path(p) for p in (args.export, "runs/demo/deploy", "runs/demo/export") if p and Path(p).is_dir()), None)
    if d is None:
        print("error: no export found; run `make demo` (or pass --export DIR)", file=sys.stderr)
        return 2
    rows = []
    for b in (1, 32):
        bare, harness = [], []
        with create_runner(d, "onnxruntime", threads=args.threads) as r:
            x = r.check_batch(np.random.default_rng(0).standard_normal((b, *r.artifact.input_shape)).astype(np.float32))
            path = r.artifact.path
            for _ in range(args.rounds):
                bare.append(bare_loop(path, x, args.threads, 50, args.iters))
                harness.append(bench(r, (b,), warmup=50, iters=args.iters)["results"][0]["p50_ms"])
        ratio = statistics.median(harness) / statistics.median(bare)
        rows.append({"batch": b, "bare_p50_ms": statistics.median(bare), "harness_p50_ms": statistics.median(harness),
                     "ratio": ratio, "bare_rounds": bare, "harness_rounds": harness})
        print(f"batch {b:>2}: bare session.run p50 {statistics.median(bare):.4f} ms, harness p50 "
              f"{statistics.median(harness):.4f} ms, ratio {ratio:.3f} (target <= {TARGET}: "
              f"{'meets' if ratio <= TARGET else 'MISSES'})")
    h = host()
    print(f"model {d}, onnxruntime CPU, {args.threads} thread(s), {args.iters} iterations x {args.rounds} rounds; "
          f"{h['cpu']}, {h['usable_cores']} usable cores")
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "harness_overhead", "export": str(d), "threads": args.threads,
                                               "iters": args.iters, "rounds": args.rounds, "rows": rows, "target": TARGET,
                                               "host": h, "date": time.strftime("%Y-%m-%d"), "label": "measured"},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

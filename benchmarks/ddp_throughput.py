"""train-edge throughput: one process with 2 threads vs torchrun with 2 processes of 1 thread each.

One process with 1 thread runs too, as a control: on a busy host two OpenMP threads in one process
can lose far more than a core's worth (a thread waits at every parallel region for its sibling to be
scheduled), and the control separates that from what the second process adds.

Both runs train the same edge model on the same data with the same global batch (``--batch-size``;
under torchrun each rank takes half) from cached cloud targets, alternately, ``--repeats`` times.
The figure is the training loop's own images/s (rank 0's epoch time, all ranks' images), median over
the epochs after the first (warm-up) and the repeats; the whole command's wall time, start-up and
process-group rendezvous included, is reported too. The cloud's quality does not matter for speed:
the shipped pretrained Fashion-MNIST cloud is used.

    python benchmarks/ddp_throughput.py [--model mobilenet_w050] [--epochs 3] [--repeats 2]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._results import emit  # noqa: E402
from devices.bench import cpu_model  # noqa: E402


def run(kind: str, args: argparse.Namespace, work: Path, cloud: str, i: int) -> dict:
    threads = "2" if kind == "1x2" else "1"
    pre = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if kind == "2x1" else []
    out = work / f"{kind}-{i}"
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HETERO_CACHE": str(work / "cache"),
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, *pre, "-m", "hetero", "train-edge", "--cloud", cloud, "--data", args.data, "--model", args.model,
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--loss", args.loss, "--out", str(out),
           "--save-every", "0", "--quiet"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{kind} failed:\n{r.stdout}\n{r.stderr}")
    hist = json.loads((out / "hetero.json").read_text())["info"]["history"]
    return {"img_per_s": [h["img_per_s"] for h in hist], "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cloud", default=str(ROOT / "hetero" / "pretrained" / "fmnist-resnet20"))
    ap.add_argument("--data", default="synthetic", help="--data of train-edge (default: the 2000-image synthetic set)")
    ap.add_argument("--model", default="mobilenet_w050")
    ap.add_argument("--loss", default="influence=1,alignment=1")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "ddp_throughput.json"))
    args = ap.parse_args()
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"1x2": [], "2x1": [], "1x1": []}
    with tempfile.TemporaryDirectory(prefix="ddp-bench-") as tmp:
        work = Path(tmp)
        for i in range(args.repeats):
            for kind in runs:  # alternate, so a change of machine load hits both
                runs[kind].append(run(kind, args, work, args.cloud, i))
                print(f"{kind} run {i + 1}: {runs[kind][-1]}", file=sys.stderr)
    import torch

    med = {k: statistics.median(x for r in v for x in r["img_per_s"][1:] or r["img_per_s"]) for k, v in runs.items()}
    wall = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    ratio = med["2x1"] / med["1x2"]
    result = {
        "benchmark": "ddp_throughput", "label": "measured",
        "what": f"train-edge {args.model} on --data {args.data}, {args.epochs} epochs, global batch {args.batch_size}, "
                f"loss {args.loss}, cached cloud targets; 1 process x 2 threads vs torchrun 2 processes x 1 thread (gloo)",
        "img_per_s": {"1_process_2_threads": med["1x2"], "2_processes_1_thread": med["2x1"],
                      "1_process_1_thread": med["1x1"]},
        "ratio_2proc_over_1proc": ratio,
        "ratio_2proc_over_1proc_1thread": med["2x1"] / med["1x1"],
        "command_wall_s": {"1_process_2_threads": wall["1x2"], "2_processes_1_thread": wall["2x1"],
                           "1_process_1_thread": wall["1x1"]},
        "runs": runs,
        "host": {"cpu": cpu_model(), "cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
                 "load_avg_1_5_15_before": list(load_before), "load_avg_1_5_15_after": list(os.getloadavg()),
                 "python": platform.python_version(), "torch": torch.__version__},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    md = (f"train-edge throughput ({result['what']}), {result['host']['cpu']}, {result['host']['usable_cpus']} usable CPUs, "
          f"torch {torch.__version__}, {result['date']}\n"
          f"1 process x 2 threads:    {med['1x2']:8.1f} img/s (command {wall['1x2']:.1f} s)\n"
          f"2 processes x 1 thread:   {med['2x1']:8.1f} img/s (command {wall['2x1']:.1f} s)\n"
          f"1 process x 1 thread:     {med['1x1']:8.1f} img/s (command {wall['1x1']:.1f} s; control)\n"
          f"ratio 2-process / 1-process: {ratio:.2f}x (load average before {load_before[0]:.2f})\n")
    emit(result, md, args.json, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Latency harness: warm-up, then a fixed count or a time budget of timed forward passes per batch
size; p50/p90/p99/mean/std, throughput, peak RSS and thread count; one JSON schema for every runtime.

Standard library and numpy only (part of the torch-free runner core). The timed call is the
runner's bare ``forward`` on a batch validated once beforehand, so the harness adds a clock read and a
list append per iteration, nothing else.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import threading
import time
from typing import Any, Callable

import numpy as np

from devices.artifact import sha256_path
from devices.errors import DeviceError
from devices.schema import LATENCY_SCHEMA

SCHEMA = LATENCY_SCHEMA
LABELS = ("measured", "emulated", "predicted")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def host() -> dict[str, Any]:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable_cpus(), "machine": platform.machine(),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "hostname": platform.node()}


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process so far (Linux: bytes from ru_maxrss KiB; macOS: bytes)."""
    try:
        import resource  # Unix only: absent on Windows
    except ImportError:  # pragma: no cover - Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def thread_count() -> int:
    """OS threads of this process now (the runtime's pools included), not just Python's."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # pragma: no cover - not Linux

        return threading.active_count()


def _stats(times_ns: list[int], batch: int) -> dict[str, Any]:
    ms = np.asarray(times_ns, dtype=np.float64) / 1e6
    mean = float(ms.mean())
    return {"batch": batch, "iterations": int(len(ms)),
            "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": mean, "std_ms": float(ms.std()),
            "min_ms": float(ms.min()), "throughput_img_s": batch * 1000.0 / mean if mean > 0 else None}


def time_calls(fn: Callable[[], Any], *, warmup: int, iters: int | None, budget_s: float | None,
               on_iter: Callable[[], None] | None = None) -> list[int]:
    """``fn`` called ``warmup`` times untimed, then ``iters`` times (or until ``budget_s`` seconds have
    passed, at least 5 times) timed; returns the nanoseconds of each timed call."""
    for _ in range(warmup):
        fn()
    times: list[int] = []
    clock = time.perf_counter_ns
    end = clock() + int(budget_s * 1e9) if budget_s else None
    while True:
        t0 = clock()
        fn()
        t1 = clock()
        times.append(t1 - t0)
        if on_iter:
            on_iter()
        if iters is not None and len(times) >= iters:
            break
        if end is not None and t1 >= end and len(times) >= 5:
            break
    return times


def bench(runner, batch_sizes=(1, 8, 32), *, warmup: int = 10, iters: int | None = None,
          budget_s: float | None = None, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Time an **open** runner on seeded random inputs of each batch size. Default: 100 iterations
    per batch size; ``budget_s`` instead runs each batch size for that many seconds."""
    if iters is None and budget_s is None:
        iters = 100
    if (iters is not None and iters < 1) or (budget_s is not None and budget_s <= 0) or warmup < 0:
        raise DeviceError("iterations and the time budget must be positive, warm-up non-negative")
    sizes = [int(b) for b in batch_sizes]
    if not sizes or min(sizes) < 1:
        raise DeviceError(f"batch sizes must be whole numbers >= 1, got {batch_sizes}")
    rng = np.random.default_rng(seed)
    results = []
    bar = _bar(len(sizes) * (iters or 0), progress, f"bench {runner.name}") if progress else None
    for b in sizes:
        x = runner.check_batch(rng.standard_normal((b, *runner.artifact.input_shape)).astype(np.float32))
        out = runner.forward(x)  # one checked call: the right shape, finite
        if np.asarray(out).shape != (b, runner.artifact.dim) or not np.isfinite(out).all():
            raise DeviceError(f"{runner.runtime} returned {np.asarray(out).shape} (or non-finite values) for a batch of {b}; "
                              "the artifact does not match its manifest")
        times = time_calls(lambda: runner.forward(x), warmup=warmup, iters=iters, budget_s=budget_s,
                           on_iter=(lambda: bar.update(1)) if bar is not None and iters else None)
        results.append({**_stats(times, b), "peak_rss_bytes": peak_rss_bytes(), "threads": thread_count()})
    if bar is not None:
        bar.close()
    art = runner.artifact
    return {
        "schema": SCHEMA,
        "label": runner.label,
        "runtime": runner.runtime,
        "runner": runner.name,
        "settings": dict(runner.settings),
        "versions": {"python": platform.python_version(), "numpy": np.__version__, **runner.versions()},
        "artifact": {"path": str(art.path), "sha256": art.entry.get("sha256") or sha256_path(art.path),
                     "format": art.entry.get("format"), "precision": art.entry.get("precision"),
                     "input_shape": list(art.input_shape), "dim": art.dim,
                     "space": art.manifest.get("space")},
        "host": host(),
        "protocol": {"warmup": warmup, "iterations": iters, "budget_s": budget_s, "inputs": f"seeded standard normal (seed {seed})",
                     "timed": "the runner's forward pass on a pre-validated batch (perf_counter_ns)"},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "results": results,
    }


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, enabled: bool, desc: str):
    """tqdm on stderr where it is installed (not required by the core), else nothing."""
    if not enabled or total <= 0:
        return _NoBar()
    try:
        from tqdm import tqdm  # optional on a device: the runner core needs only numpy
    except ImportError:
        return _NoBar()
    interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="it", file=sys.stderr, mininterval=0.1 if interactive else 30.0)


def check_result(obj: Any, where: str = "latency JSON") -> dict[str, Any]:
    """A latency result read back from JSON, or a one-line error."""
    if not isinstance(obj, dict) or obj.get("schema") != SCHEMA or not isinstance(obj.get("results"), list):
        raise DeviceError(f"{where} is not a hetero latency result ({SCHEMA}); produce one with `hetero bench --json`")
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    rows_ok = all(isinstance(r, dict) and isinstance(r.get("batch"), int) and num(r.get("p50_ms")) for r in obj["results"])
    if not rows_ok or not isinstance(obj.get("artifact"), dict) or not isinstance(obj["artifact"].get("path"), str) \
            or not isinstance(obj.get("runtime"), str) or not isinstance(obj.get("label"), str):
        raise DeviceError(f"{where} is a damaged {SCHEMA} result (runtime, label, artifact.path, results[].batch and "
                          "p50_ms are required); re-run `hetero bench --json`")
    return obj


def compare_table(a: dict[str, Any], b: dict[str, Any], name_a: str = "A", name_b: str = "B") -> str:
    """Side by side p50 per batch size and the ratio B/A (e.g. A = edge, B = cloud: how much faster the edge is)."""
    rows = [f"| batch | {name_a} p50 ms | {name_b} p50 ms | {name_b} / {name_a} |", "|---|---|---|---|"]
    bb = {r["batch"]: r for r in b["results"]}
    for r in a["results"]:
        o = bb.get(r["batch"])
        if o is None:
            continue
        ratio = o["p50_ms"] / r["p50_ms"] if r["p50_ms"] > 0 else float("nan")
        rows.append(f"| {r['batch']} | {r['p50_ms']:.4f} | {o['p50_ms']:.4f} | {ratio:.2f}x |")
    if len(rows) == 2:
        raise DeviceError("the two results share no batch size; bench both with the same --batch")
    head = (f"{name_a}: {a['runtime']} ({a['label']}), {a['artifact']['path']}\n"
            f"{name_b}: {b['runtime']} ({b['label']}), {b['artifact']['path']}\n")
    return head + "\n".join(rows) + "\n"


def latency_table(res: dict[str, Any]) -> str:
    """A latency result (``hetero-latency/1``) as a markdown table, one row per batch size."""
    def rss(r: dict[str, Any]) -> str:
        return f"{r['peak_rss_bytes'] / 2**20:.0f} MiB" if r.get("peak_rss_bytes") else "-"

    lines = [f"{res['artifact']['path']} ({res['artifact'].get('format')} {res['artifact'].get('precision')}) on "
             f"{res['runtime']} [{res['label']}], settings {res['settings'] or 'default'}, {res['host']['cpu']}, "
             f"{res['host']['usable_cores']} usable cores",
             "| batch | iters | p50 ms | p90 ms | p99 ms | mean ms | std ms | img/s | peak RSS | threads |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        lines.append(f"| {r['batch']} | {r['iterations']} | {r['p50_ms']:.4f} | {r['p90_ms']:.4f} | {r['p99_ms']:.4f} | "
                     f"{r['mean_ms']:.4f} | {r['std_ms']:.4f} | {r['throughput_img_s']:,.0f} | {rss(r)} | {r['threads']} |")
    return "\n".join(lines)

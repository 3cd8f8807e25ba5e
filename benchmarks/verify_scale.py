"""How `hetero verify` scales: time and peak RSS of its scoring as the gallery grows (10k, 60k, 1M
synthetic vectors) and as the number of runtimes grows, plus the real command on the demo bundle.

Targets: verify on the demo bundle (10k queries x 60k gallery, >= 4 runtime/precision pairs) in
at most 60 s on 2 cores, model training excluded; a 1M-vector gallery searched exactly with peak
RSS at most 4 GB.

Each configuration runs in a fresh process, so its peak RSS (ru_maxrss) is its own. The synthetic
runs drive the same scorer verify uses (``hetero.app.verify.score.Scorer``) exactly as verify does:
paragon, torch reference with its own gallery (edge->edge), then one scoring per runtime. Classes
are chosen so that R (relevant items per query) stays realistic: 10 classes up to 60k (R = 6,000
at 60k, as Fashion-MNIST), 1,000 classes at 1M (R = 1,000).

    python benchmarks/verify_scale.py [--sizes 10000,60000,1000000] [--runtimes 1,2,4,8] [--demo DIR] [--json F]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RSS_TARGET_GB = 4.0
DEMO_TARGET_S = 60.0


def _unit(rng, n: int, dim: int, centers, labels, noise: float):
    import numpy as np

    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):  # float32 throughout, a block at a time
        e = min(n, s + 100_000)
        x = centers[labels[s:e]] + noise * rng.standard_normal((e - s, dim), dtype=np.float32)
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def child(gallery: int, queries: int, dim: int, runtimes: int, seed: int) -> dict:
    import numpy as np

    from hetero.app.verify.score import Scorer

    classes = 10 if gallery <= 60_000 else gallery // 1000
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, dim), dtype=np.float32)
    gl = rng.integers(0, classes, gallery)
    ql = rng.integers(0, classes, queries)
    t0 = time.perf_counter()
    g = _unit(rng, gallery, dim, centers, gl, 0.9)
    g_edge = _unit(rng, gallery, dim, centers, gl, 1.0)
    paragon = _unit(rng, queries, dim, centers, ql, 0.9)
    ref = _unit(rng, queries, dim, centers, ql, 1.0)
    t_data = time.perf_counter() - t0
    t0 = time.perf_counter()
    scorer = Scorer(g, gl, ql, paragon)
    scorer.set_reference(ref, g_edge)
    del g_edge
    scorer.score(ref)
    t_ref = time.perf_counter() - t0
    per = []
    for i in range(runtimes):
        q = ref + 0.01 * (i + 1) * rng.standard_normal(ref.shape, dtype=np.float32)
        t1 = time.perf_counter()
        m = scorer.score(q)
        per.append(time.perf_counter() - t1)
    return {"gallery": gallery, "queries": queries, "dim": dim, "classes": classes, "runtimes": runtimes,
            "data_s": t_data, "paragon_and_reference_s": t_ref, "per_runtime_s": per,
            "score_s": t_ref + sum(per), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "last_map_at_r": m["map_at_r"]}


def run_child(args: list[str], env: dict | None = None) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    if p.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def demo_child(export: str, cloud: str, edge: str, out: str) -> dict:
    from hetero.app.cli import main

    t0 = time.perf_counter()
    code = main(["verify", "--manifest", export, "--cloud", cloud, "--edge", edge, "--out", out, "--quiet"])
    seconds = time.perf_counter() - t0
    rep = json.loads((Path(out) / "report.json").read_text())
    return {"exit_code": code, "seconds": seconds, "pairs_ran": rep["verdict"]["ran"],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "timings_s": rep["timings_s"], "verdict": rep["verdict"]["passed"], "date": time.strftime("%Y-%m-%d"),
}


def write_markdown(r: dict, path: Path) -> None:
    """benchmarks/results/verify_scale.md from the JSON result."""
    L = ["# verify scale (benchmarks/verify_scale.py)", "",
         f"Measured on {r['cpu']} ({r['cores']} cores), {r['date']}; each configuration in a fresh process (peak RSS = "
         "its ru_maxrss). Synthetic unit vectors, dim 128, 10,000 queries; the scorer verify uses (paragon, torch "
         "reference with its own gallery, then one scoring per runtime). Exact search throughout.", ""]
    if r.get("gallery_scaling"):
        L += ["## Gallery size (1 runtime)", "", "| gallery | classes (R per query) | scoring s | paragon + reference s | "
              "per runtime s | peak RSS GiB |", "|---|---|---|---|---|---|"]
        for x in r["gallery_scaling"]:
            L.append(f"| {x['gallery']:,} | {x['classes']:,} ({x['gallery'] // x['classes']:,}) | {x['score_s']:.1f} | "
                     f"{x['paragon_and_reference_s']:.1f} | {x['per_runtime_s'][0]:.1f} | {x['peak_rss_bytes'] / 2**30:.2f} |")
    if r.get("rss_1m_gb"):
        L += ["", f"Target: 1M gallery, exact, peak RSS <= {RSS_TARGET_GB:g} GB: measured {r['rss_1m_gb']:.2f} GB "
              f"(ratio {RSS_TARGET_GB / r['rss_1m_gb']:.2f}).", ""]
    if r.get("runtime_scaling"):
        L += ["## Runtimes (60k gallery)", "", "| runtimes | scoring s | per runtime s | peak RSS GiB |", "|---|---|---|---|"]
        for x in r["runtime_scaling"]:
            L.append(f"| {x['runtimes']} | {x['score_s']:.1f} | {sum(x['per_runtime_s']) / x['runtimes']:.1f} | "
                     f"{x['peak_rss_bytes'] / 2**30:.2f} |")
    if r.get("demo"):
        L += ["", "## `hetero verify` on the demo bundle", "", "10k Fashion-MNIST queries x 60k cloud gallery; torch edge + "
              "ONNX FP32/FP16/INT8 (dynamic) + ORT on onnxruntime = 5 pairs, latency included. Target: at most "
              f"{DEMO_TARGET_S:.0f} s.", "", "| cache | wall s | torch embedding s | paragon + torch edge scoring s | "
              "per artifact s | exit | peak RSS GiB |", "|---|---|---|---|---|---|---|"]
        for k, x in r["demo"].items():
            t = x["timings_s"]
            per = [v for a, v in t.items() if "@" in a]
            L.append(f"| {k} | {x['seconds']:.1f} | {t['embed with torch (cloud and edge)']:.1f} | "
                     f"{t['score paragon and torch edge']:.1f} | {sum(per) / len(per):.1f} | {x['exit_code']} | "
                     f"{x['peak_rss_bytes'] / 2**30:.2f} |")
        L += ["", "Cold: an empty cache, so the 60k cloud gallery, the cloud queries and the torch edge's queries and "
              "gallery are embedded first. Warm: all cached (as after `make demo`, or any later verify of the same models)."]
    path.write_text("\n".join(L) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,60000,1000000")
    ap.add_argument("--runtimes", default="1,2,4,8", help="runtime counts, on the 60k gallery")
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--demo", default="runs/demo", help="the demo's run directory (cloud, edge, export); '' skips it")
    ap.add_argument("--json", default="benchmarks/results/verify_scale.json")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        if args.child[0] == "demo":
            print(json.dumps(demo_child(*args.child[1:])))
        else:
            print(json.dumps(child(*map(int, args.child))))
        return 0

    from devices.bench import cpu_model

    sizes = [int(s) for s in args.sizes.split(",") if s]
    counts = [int(s) for s in args.runtimes.split(",") if s]
    res = {"benchmark": "verify_scale", "cpu": cpu_model(), "cores": os.cpu_count(), "label": "measured",
           "date": time.strftime("%Y-%m-%d"), "gallery_scaling": [], "runtime_scaling": [], "demo": None}
    for n in sizes:
        r = run_child([str(n), str(args.queries), str(args.dim), "1", "0"])
        res["gallery_scaling"].append(r)
        print(f"gallery {n:>9,}: score {r['score_s']:6.1f} s (paragon+reference {r['paragon_and_reference_s']:.1f} s, "
              f"1 runtime {r['per_runtime_s'][0]:.1f} s), peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    for c in counts:
        r = run_child(["60000", str(args.queries), str(args.dim), str(c), "0"])
        res["runtime_scaling"].append(r)
        print(f"runtimes {c}: score {r['score_s']:6.1f} s ({sum(r['per_runtime_s']) / c:.1f} s per runtime), "
              f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    big = [r for r in res["gallery_scaling"] if r["gallery"] >= 1_000_000]
    if big:
        gb = big[0]["peak_rss_bytes"] / 1e9
        res["rss_1m_gb"] = gb
        print(f"1M gallery, exact: peak RSS {gb:.2f} GB (target <= {RSS_TARGET_GB} GB, ratio target/measured "
              f"{RSS_TARGET_GB / gb:.2f})")
    d = Path(args.demo) if args.demo else None
    if d and (d / "export" / "manifest.json").is_file():
        import tempfile

        res["demo"] = {}
        with tempfile.TemporaryDirectory() as cache:  # cold: an empty cache; warm: the same cache again
            for kind in ("cold", "warm"):
                r = run_child(["demo", str(d / "export"), str(d / "cloud"), str(d / "edge"), str(d / "verify-bench")],
                              env={"HETERO_CACHE": cache})
                res["demo"][kind] = r
                print(f"demo bundle, {kind} cache: hetero verify {r['seconds']:.1f} s, {r['pairs_ran']} pairs, exit "
                      f"{r['exit_code']} (target <= {DEMO_TARGET_S:.0f} s, ratio target/measured "
                      f"{DEMO_TARGET_S / r['seconds']:.2f}); peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    elif args.demo:
        print(f"no demo bundle at {d}; run `make demo` first to time verify on it")
    if args.json:
        old = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
        for key in ("gallery_scaling", "runtime_scaling", "demo", "rss_1m_gb"):  # sections not run this time are kept
            if not res.get(key) and old.get(key):
                res[key] = old[key]
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        write_markdown(res, Path(args.json).with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

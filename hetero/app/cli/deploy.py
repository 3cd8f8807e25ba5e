"""`hetero export`, `bench`, `devices` and `pack-runner`: parse, call :mod:`hetero.app.deploy`, print."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from devices.bench import compare_table, latency_table
from devices.profiles import describe
from devices.runner import RUNNERS
from export.manifest import FILENAME as MANIFEST_FILENAME
from hetero._atomic import check_output_file
from hetero.app import deploy
from hetero.app.options import int_list
from hetero.errors import HeteroError


def describe_artifact(out: str | Path, a: dict) -> str:
    """One line per manifest entry: what, size, and fidelity with its label."""
    head = f"{a['export_format']:<15} "
    if a.get("file") is None:
        return head + f"{a.get('note', 'not built here')}; build on the target with: {a.get('build_command', '?')}"
    size = f"{a['bytes']:,} bytes" + (f" ({a['weight_bytes']:,} of weights)" if a.get("weight_bytes") else "")
    f = a["fidelity"]
    if f.get("label") == "pending":
        fid = f"fidelity pending: {f.get('reason', '')}"
    else:
        fid = (f"vs torch: min cosine {f['min_cosine']:.7f}, top-10 agreement {f['top10_agreement']:.2%} "
               f"({f['label']}, {f['runtime']})")
    return head + f"{Path(out) / a['file']}: {size}, {fid}"


def cmd_export(args: argparse.Namespace) -> int:
    formats = [f.strip() for f in args.formats.split(",") if f.strip()] if args.formats else None
    r = deploy.export(args.edge, args.out, cloud=args.cloud, data=args.data, formats=formats, name=args.name,
                      check_real=args.check_real, check_samples=args.check_samples, calib=args.calib,
                      int8_mode=args.int8_mode,
                      batch_sizes=int_list(args.batch_sizes, "--batch-sizes") if args.batch_sizes else None,
                      coreml_image_input=args.coreml_image_input, ort_optimization=args.ort_optimization,
                      overwrite=args.overwrite, progress=not args.quiet)
    for a in r.artifacts:
        print(describe_artifact(args.out, a))
    for s in r.skipped:
        print(f"skipped {s['format']}: {s['reason']}")
    total = sum(a.get("seconds", 0.0) for a in r.artifacts)
    print(f"{len(r.artifacts)} artifact(s) in {args.out} ({total:.1f} s of conversion and checks); manifest: "
          f"{Path(args.out) / MANIFEST_FILENAME}")
    return 0


def _bench_one(path: str, args: argparse.Namespace) -> deploy.LatencyResult:
    remote = None
    if args.host:
        remote = deploy.Remote(args.host, port=args.port, identity=args.identity, python=args.python,
                               ssh_options=tuple(args.ssh_option or ()), timeout=args.timeout)
    return deploy.bench(path, runtime=args.runtime, precision=args.precision, fmt=args.format, profile=args.profile,
                        batch_sizes=int_list(args.batch, "--batch"), iters=args.iters, budget_s=args.budget,
                        warmup=args.warmup, threads=args.threads, remote=remote, progress=not args.quiet)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.iters is not None and args.budget is not None:
        raise HeteroError("give --iters N or --budget SECONDS, not both")
    kind = "latency comparison" if args.compare else "latency JSON"
    if args.json:
        check_output_file(args.json, kind, args.overwrite)  # before the benchmark; again when writing
    if args.compare:
        if len(args.paths) != 2:
            raise HeteroError(f"--compare takes two things to compare (A B), got {len(args.paths)}")
        a, b = (_bench_one(x, args) for x in args.paths)
        print(compare_table(a.data, b.data, "A", "B"))
        if args.json:
            deploy.save_latency((a, b), args.json, args.overwrite)
        return 0
    if len(args.paths) != 1:
        raise HeteroError(f"bench takes one export directory or checkpoint (or two with --compare), got {len(args.paths)}")
    res = _bench_one(args.paths[0], args)
    print(latency_table(res.data))
    if args.json:
        deploy.save_latency(res, args.json, args.overwrite)
        print(f"latency JSON: {args.json}")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    rows = describe()
    if args.json:
        print(json.dumps({"profiles": rows, "runtimes": {n: RUNNERS[n].unavailable() for n in sorted(RUNNERS)}}, indent=2))
        return 0
    print("| profile | artifact | runtime | runs here | stands for | why not |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['profile']} | {r['format']} {r['precision'] or ''} | {r['runtime']} {r['settings'] or ''} | "
              f"{r['runs_here']} | {r['stands_for']} | {r['why_not'] or ''} |")
    print("\nruntimes: " + "; ".join(f"{n} {'available' if RUNNERS[n].unavailable() is None else '(' + RUNNERS[n].unavailable() + ')'}"
                                    for n in sorted(RUNNERS)))
    return 0


def cmd_pack_runner(args: argparse.Namespace) -> int:
    path = deploy.pack_runner(args.out, args.overwrite)
    print(f"standalone runner: {path} ({path.stat().st_size:,} bytes); on the device, with python3, numpy and the "
          f"runtime: python3 {path.name} run EXPORT_DIR --input IMAGES_OR_NPY --out emb.npy | "
          f"python3 {path.name} bench EXPORT_DIR --json latency.json")
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to every deployment format, with manifest.json")
    p.add_argument("--edge", required=True, help="checkpoint directory to export")
    p.add_argument("--out", required=True, help="export directory to write (a new one, or an earlier export with --overwrite)")
    p.add_argument("--cloud", help="its cloud checkpoint: refuses an edge model from another space, and the top-10 "
                                   "agreement then searches the real cloud gallery (training split)")
    p.add_argument("--name", default="edge", help="artifact base name (default edge)")
    p.add_argument("--data", help="the model's dataset folder: test images check fidelity, training images calibrate INT8")
    p.add_argument("--check-real", action="store_true", help="check fidelity on Fashion-MNIST test images (found as usual)")
    p.add_argument("--check-samples", type=int, default=1000, help="test images that check fidelity (default 1000)")
    p.add_argument("--formats", help="comma-separated formats: onnx, onnx-fp16, onnx-int8, ort, coreml, coreml-fp16, "
                                     "coreml-int8w, coreml-palette6, coreml-palette4, tensorrt (default: every format "
                                     "this host can produce; the others are listed as skipped, with the reason)")
    p.add_argument("--calib", type=int, help="training images that calibrate INT8 (default 512 up to 112 px, 128 at "
                                             "224 px: onnxruntime holds their activations in memory; seeded sample, "
                                             "never test images)")
    p.add_argument("--int8-mode", choices=("static", "dynamic"), default="static",
                   help="onnx-int8: static QDQ calibrated on training images (default), or dynamic (weights only)")
    p.add_argument("--batch-sizes", help="batch sizes of fixed-shape targets: Core ML EnumeratedShapes, TensorRT "
                                         "profile min/opt/max (default 1,8,32)")
    p.add_argument("--coreml-image-input", action="store_true",
                   help="Core ML takes an image (CVPixelBuffer) whose scale/bias reproduce the preprocessing")
    p.add_argument("--ort-optimization", choices=("fixed", "runtime"), default="fixed",
                   help="ORT Mobile: optimise now for the CPU provider (fixed), or keep portable for NNAPI/Core ML EPs")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier hetero export at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_export)


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="latency of an export (or a checkpoint) on a runtime: p50/p90/p99, throughput, RSS")
    p.add_argument("paths", nargs="+", metavar="ARTIFACT_OR_MANIFEST",
                   help="export directory (or its manifest.json), checkpoint directory, or, with --compare, latency JSONs")
    p.add_argument("--runtime", help="runner: onnxruntime, torch, coreml-interp, coreml, tensorrt (default: onnxruntime "
                                     "for an export, torch for a checkpoint)")
    p.add_argument("--profile", help="a device profile (hetero devices lists them): sets format, precision, runtime, settings")
    p.add_argument("--precision", help="which artifact of the export: fp32, fp16, int8, ...")
    p.add_argument("--format", help="which artifact format: onnx, ort, coreml, ...")
    p.add_argument("--batch", default="1,8,32", help="batch sizes (default 1,8,32)")
    p.add_argument("--iters", type=int, help="timed iterations per batch size (default 100)")
    p.add_argument("--budget", type=float, help="seconds per batch size instead of a fixed count")
    p.add_argument("--warmup", type=int, default=10, help="untimed iterations first (default 10)")
    p.add_argument("--threads", type=int, help="runtime threads (default: the runtime's own choice)")
    p.add_argument("--compare", action="store_true", help="two inputs: side-by-side p50 and the ratio B/A")
    p.add_argument("--host", help="user@host: run on that machine over SSH (needs python3, numpy and the runtime there)")
    p.add_argument("--port", type=int, help="SSH port for --host")
    p.add_argument("--identity", help="SSH private key for --host")
    p.add_argument("--python", default="python3", help="the Python on --host that has numpy and the runtime (default python3)")
    p.add_argument("--ssh-option", action="append", help="extra ssh/scp argument for --host, e.g. --ssh-option=-oStrictHostKeyChecking=accept-new")
    p.add_argument("--timeout", type=float, default=600, help="with --host: seconds each ssh/scp step (the copy, the "
                                                              "bench) may take before it is stopped (default 600)")
    p.add_argument("--json", help="write the latency result (schema hetero-latency/1; with --compare "
                                  "hetero-latency-compare/1) here: a new path, or an earlier one with --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier latency JSON of the same schema at --json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench)


def add_devices(sub) -> None:
    p = sub.add_parser("devices", help="device profiles and runtimes, and which can run on this host (and why not)")
    p.add_argument("--json", action="store_true", help="machine-readable")
    p.set_defaults(func=cmd_devices)


def add_pack_runner(sub) -> None:
    p = sub.add_parser("pack-runner", help="pack the torch-free standalone runner into one zip to copy to a device")
    p.add_argument("out", help="zip file to write, e.g. runner.zip: a new path, or an earlier runner zip with --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier runner zip of hetero's at OUT")
    p.set_defaults(func=cmd_pack_runner)

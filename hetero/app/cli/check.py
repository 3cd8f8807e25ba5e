"""`hetero evaluate` and `hetero verify`: parse, call :mod:`hetero.app.checks`, exit with the verdict."""
from __future__ import annotations

import argparse

from hetero.app import checks


def cmd_evaluate(args: argparse.Namespace) -> int:
    checks.evaluate(args.cloud, args.edge, artifact=args.artifact, data=args.data, query_limit=args.query_limit,
                    gallery_limit=args.gallery_limit, out=args.out, progress=not args.quiet, update=args.update)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    r = checks.verify(args.manifest, args.cloud, edge=args.edge, data=args.data, gates=args.gates, out=args.out,
                      index=args.index, runtimes=args.runtime, query_limit=args.query_limit,
                      gallery_limit=args.gallery_limit, latency=not args.no_latency, html=not args.no_html,
                      progress=not args.quiet, require=args.require)
    return r.exit_code


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="cross-model retrieval: edge queries against the cloud gallery")
    p.add_argument("--cloud", required=True)
    p.add_argument("--edge", required=True)
    p.add_argument("--artifact", help="export directory: also embed the queries through onnxruntime")
    p.add_argument("--data", help="dataset folder (default Fashion-MNIST): test = queries, train = gallery")
    p.add_argument("--query-limit", type=int, help="use the first N test images as queries (N >= 1; default all)")
    p.add_argument("--gallery-limit", type=int, help="use the first N train images as the gallery (N >= 1; default all)")
    p.add_argument("--out", help="write report.json and report.md to this directory")
    p.add_argument("--update", action="store_true", help="name the rows old/new: --cloud is the old cloud, --edge the new "
                                                         "cloud model trained compatible with it")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)


def add_verify(sub) -> None:
    p = sub.add_parser("verify", help="every exported artifact on every runner here x the cloud gallery; gates -> exit code",
                       description="Embed the queries with every artifact of an export on every runner that can run "
                                   "it here, search the cloud-embedded gallery, score each pair (mAP@R, R@k, "
                                   "compatibility criterion, top-10 overlap, flips, drift vs torch, latency) and apply "
                                   "the gates. Exit 0: all gates pass; 1: a gate or a runner failed; 2: bad input. "
                                   "Gates file: TOML with [all] and [precision.NAME] tables (see docs/verify.md).")
    p.add_argument("--manifest", required=True, help="export directory (or its manifest.json) written by `hetero export`")
    p.add_argument("--cloud", required=True, help="the cloud checkpoint whose space the export lives in")
    p.add_argument("--edge", help="the torch edge checkpoint that was exported (default: the path the manifest records)")
    p.add_argument("--data", help="dataset folder (default Fashion-MNIST): test = queries, train = gallery")
    p.add_argument("--gates", help="TOML file of thresholds (default: the project's targets)")
    p.add_argument("--out", help="report directory (default: verify/ next to the export directory)")
    p.add_argument("--index", default="exact", choices=("exact", "ivf", "hnsw"),
                   help="top-k search of the gallery: exact (default), or approximate faiss IVF/HNSW, reported with "
                        "its recall against exact search (mAP@R stays exact)")
    p.add_argument("--runtime", action="append", help="only these runners (repeatable), e.g. onnxruntime")
    p.add_argument("--require", action="append", metavar="FORMAT@RUNNER[,...]",
                   help="pairs that must run here (repeatable), e.g. onnx-fp16@onnxruntime,coreml-fp16@coreml-interp: "
                        "one that is skipped or absent fails the verdict (exit 1)")
    p.add_argument("--query-limit", type=int, help="use the first N test images as queries (N >= 1; default all)")
    p.add_argument("--gallery-limit", type=int, help="use the first N train images as the gallery (N >= 1; default all)")
    p.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency p50 of each pair")
    p.add_argument("--no-html", action="store_true", help="write report.json and report.md only (no matplotlib needed)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_verify)

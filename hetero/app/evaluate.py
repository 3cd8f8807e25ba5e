"""Cross-model retrieval check: cloud gallery x edge queries (torch and exported artifacts)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from devices import create_runner, open_artifact
from devices.schema import REPORT_FILE
from export import fidelity
from hetero import distributed
from hetero._atomic import atomic_dir, check_output_dest, legacy_report, write_json_atomic, write_text_atomic
from hetero.app.report import compatibility, format_table, host_info, model_row, render_markdown
from hetero.app.verify.run import check_limits, check_preprocess
from hetero.app.verify.score import Scorer
from hetero.checkpoint import check_same_space, load_checkpoint
from hetero.data import load_dataset
from hetero.embed import (
    cached_embeddings_across_ranks as cached_embeddings,  # under torchrun: split over the ranks, then gathered
)
from hetero.errors import HeteroError

LEGACY = legacy_report("evaluate report", "hetero evaluate:")  # a report written before output markers


def score_models(cloud, edges: dict[str, Any], queries, gallery, *, artifacts: dict[str, Path] | None = None,
                 progress: bool = True, reference: str = "cloud") -> dict[str, Any]:
    """Embed and score: paragon (cloud->cloud), X->X and X->cloud for every edge/control model ``X``
    (the cloud's rows are named ``reference``: "old" for a backward-compatible update),
    and X->cloud through onnxruntime for every ``artifacts[X]`` export directory.

    Every row but the paragon carries negative/positive flip rates against the paragon's top-1.
    Returns ``{"retrieval": rows, "exports": rows}``. Every ``edge`` model must live in the cloud's
    space; controls and independently trained clouds are compared on purpose.
    """

    artifacts = artifacts or {}
    for name, ckpt in edges.items():
        if ckpt.role == "edge":  # controls and independent models are compared on purpose
            check_same_space(ckpt, cloud)
    prep = cloud.preprocess
    queries, gallery = queries.conform(prep), gallery.conform(prep)
    g_cloud = np.asarray(cached_embeddings(cloud, gallery, progress=progress, key=cloud.space, desc="cloud targets"))
    q_cloud = np.asarray(cached_embeddings(cloud, queries, progress=progress, desc="cloud queries"))
    scorer = Scorer(g_cloud, gallery.labels, queries.labels, q_cloud)  # the one scoring path (verify's)
    rows = [_row(reference, reference, "torch", scorer.paragon_metrics)]

    exports = []
    for name, ckpt in edges.items():
        q = np.asarray(cached_embeddings(ckpt, queries, progress=progress, desc=f"{name} queries"))
        if ckpt.role != "control":  # a control's own gallery is not part of the protocol
            g = np.asarray(cached_embeddings(ckpt, gallery, progress=progress, desc=f"{name} gallery"))
            rows.append(_row(name, name, "torch", scorer.score_own_gallery(q, g)))
        rows.append(_row(name, reference, "torch", scorer.score(q)))
        if name in artifacts:
            art = open_artifact(artifacts[name], "onnx")
            if art.space != cloud.space:
                raise HeteroError(f"artifact {artifacts[name]} was exported from cloud space {art.space[:12]}, not the "
                                  f"given cloud's {cloud.space[:12]}; export the edge model trained against this cloud")
            check_preprocess(art.manifest, ckpt, str(artifacts[name]))
            with create_runner(artifacts[name], "onnxruntime") as runner:
                q_art = runner.embed(ckpt.preprocess.apply(queries.conform(ckpt.preprocess).images))
                runtime = runner.runtime
            rows.append(_row(name, reference, runtime, scorer.score(q_art)))
            fid = fidelity(q, q_art)
            exports.append({"edge": name, "format": art.format, "precision": art.entry.get("precision"),
                            "path": str(art.path), "sha256": art.entry["sha256"], "min_cosine": fid["min_cosine"],
                            "max_abs_diff": fid["max_abs_diff"], "num_inputs": len(q_art), "runtime": runtime,
                            "label": "measured"})
    return {"retrieval": rows, "exports": exports}


def _row(query_model: str, gallery_model: str, runtime: str, m: dict[str, Any]) -> dict[str, Any]:
    """A retrieval row of the evaluate/demo report, from the scorer's metrics."""
    row = {"query_model": query_model, "gallery_model": gallery_model, "runtime": runtime,
           **{k: m[k] for k in ("map_at_r", "recall_at_1", "recall_at_10", "num_queries", "num_gallery")}}
    if "flips_vs_paragon" in m:
        row["negative_flip_rate"] = m["flips_vs_paragon"]["negative"]
        row["positive_flip_rate"] = m["flips_vs_paragon"]["positive"]
    return row


def evaluate(cloud_path: str, edge_path: str, *, artifact: str | None = None, data: str | None = None,
             query_limit: int | None = None, gallery_limit: int | None = None, out: str | None = None,
             progress: bool = True, update: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`hetero evaluate`: test split = queries, train split = gallery. ``update=True`` names the rows
    old/new (a backward-compatible cloud update: new->old, old->old, new->new)."""

    check_limits(query_limit, gallery_limit)
    if out:
        check_output_dest(out, "evaluate report", True, LEGACY)  # before any work: a new path or an earlier evaluate report
    distributed.init()  # under torchrun the ranks share the embedding; rank 0 alone logs and writes
    main = distributed.is_main()
    progress = progress and main
    if not main:
        log = _quiet
    cloud = load_checkpoint(cloud_path, role="cloud")
    edge = load_checkpoint(edge_path, role=("edge", "control"))
    name, ref = ("new", "old") if update else (edge.role, "cloud")
    queries, gallery = load_dataset(data, "test", progress=progress), load_dataset(data, "train", progress=progress)
    if tuple(queries.classes) != tuple(gallery.classes):
        raise HeteroError("the dataset's test and train splits have different classes; fix the folders")
    queries = queries.subset(query_limit) if query_limit is not None else queries
    gallery = gallery.subset(gallery_limit) if gallery_limit is not None else gallery
    scored = score_models(cloud, {name: edge}, queries, gallery,
                          artifacts={name: Path(artifact)} if artifact else None, progress=progress, reference=ref)
    report = {
        "title": f"hetero evaluate: {edge_path} against {cloud_path}",
        "queries": f"{queries.name} ({len(queries)})", "gallery": f"{gallery.name} ({len(gallery)}), cloud-embedded",
        "host": host_info(), "models": [model_row(ref, cloud), model_row(name, edge)],
        **scored, "compatibility": compatibility(scored["retrieval"], [name] if edge.role == "edge" else [], ref),
    }
    log(format_table(report["retrieval"]))
    for c in report["compatibility"]:
        log(f"compatibility criterion (edge->cloud > edge->edge): {'met' if c['criterion_met'] else 'NOT met'}")
    if out and main:
        with atomic_dir(out, "evaluate report", True, LEGACY) as tmp:
            write_json_atomic(tmp / REPORT_FILE, report)
            write_text_atomic(tmp / "report.md", render_markdown(report))
        log(f"report: {out}/report.json")
    distributed.barrier()
    return report


def _quiet(_: str) -> None:
    pass

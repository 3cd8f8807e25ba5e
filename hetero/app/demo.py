"""`hetero demo`: the whole slice on Fashion-MNIST, quick configuration.

cloud (the shipped pretrained one, or trained here with ``train_cloud``) -> compatible edge +
control (trained) -> ONNX export -> 10k test queries embedded through onnxruntime, searched
against the 60k train gallery embedded by the cloud -> report.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from devices.schema import REPORT_FILE
from export import export_checkpoint
from hetero._atomic import atomic_dir, check_output_dest, legacy_report, write_json_atomic, write_text_atomic
from hetero.app.evaluate import score_models
from hetero.app.report import compatibility, format_table, host_info, model_row, render_markdown
from hetero.app.verify.gates import load_gates
from hetero.app.verify.run import check_limits, verify
from hetero.checkpoint import save_checkpoint
from hetero.data import FASHION_MNIST_PREPROCESS, load_dataset
from hetero.errors import HeteroError
from hetero.pretrained import load_pretrained
from hetero.train import TrainConfig, train_cloud, train_edge

PRETRAINED_CLOUD = "fmnist-resnet20"
DEMO_FORMATS = ("onnx", "onnx-fp16", "onnx-int8", "ort")  # + the torch reference: 5 pairs for verify


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"
    data: str | None = None
    train_cloud: bool = False  # False: the shipped pretrained cloud (hetero/pretrained); True: train one here
    cloud_model: str = "resnet20"  # with train_cloud
    cloud_epochs: int = 2  # with train_cloud
    cloud_margin: float = 0.2  # with train_cloud: CosFace margin (0.2 raised the 2-epoch paragon from 0.747 to 0.798)
    edge_model: str = "mobilenet_w050"
    edge_epochs: int = 2
    control_epochs: int = 1  # the control only has to show that search breaks without compatibility
    batch_size: int = 128
    train_limit: int | None = None  # images used for training (the gallery stays the whole train split)
    gallery_limit: int | None = None
    query_limit: int | None = None
    seed: int = 0
    gates: str | None = None  # verify's gates file (default: the project's targets)
    progress: bool = True


LEGACY = legacy_report("demo run", "hetero demo:")  # a runs/demo written before output markers


def run_demo(cfg: DemoConfig, log=print) -> dict[str, Any]:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    load_gates(cfg.gates)  # a bad gates file fails now, not after training
    check_limits(cfg.query_limit, cfg.gallery_limit)  # and so do limits of 0 (not "every image")
    if cfg.train_limit is not None and cfg.train_limit < 1:
        raise HeteroError(f"--train-limit must be >= 1, got {cfg.train_limit}; leave it out to train on every image")
    check_output_dest(cfg.out, "demo run", True, LEGACY)  # and an --out that is not an earlier demo run

    def lap(name: str, t0: float) -> None:
        timings[name] = time.perf_counter() - t0

    t0 = time.perf_counter()
    train = load_dataset(cfg.data, "train", progress=cfg.progress)
    test = load_dataset(cfg.data, "test", progress=cfg.progress)
    if train.images.shape[1:] != (28, 28, 1):
        raise HeteroError(f"the demo runs on Fashion-MNIST (28x28 grey), but --data holds {train.images.shape[1:]} images; "
                          "use train-cloud/train-edge/export/evaluate for other data")
    gallery = train.subset(cfg.gallery_limit) if cfg.gallery_limit else train
    queries = test.subset(cfg.query_limit) if cfg.query_limit else test
    lap("load data", t0)
    out = Path(cfg.out)
    common = dict(batch_size=cfg.batch_size, seed=cfg.seed, limit=cfg.train_limit)
    t0 = time.perf_counter()
    cloud = None if cfg.train_cloud else _pretrained_cloud(train, log)  # refused before anything is written
    if cloud is not None:
        lap("load pretrained cloud", t0)
    with atomic_dir(out, "demo run", True, LEGACY) as tmp:
        if cloud is None:
            log(f"[1/5] training the cloud model ({cfg.cloud_model}, {cfg.cloud_epochs} epoch(s))")
            t0 = time.perf_counter()
            cloud = train_cloud(TrainConfig(model=cfg.cloud_model, epochs=cfg.cloud_epochs, margin=cfg.cloud_margin,
                                            **common), train, FASHION_MNIST_PREPROCESS, progress=cfg.progress)
            lap("train cloud", t0)
        save_checkpoint(cloud, tmp / "cloud")
        cloud.path = out / "cloud"

        edge_cfg = TrainConfig(model=cfg.edge_model, epochs=cfg.edge_epochs, **common)
        log(f"[2/5] training the compatible edge ({cfg.edge_model}, {cfg.edge_epochs} epoch(s), loss "
            f"{'+'.join(edge_cfg.losses)}) and the control (no compatibility loss, {cfg.control_epochs} epoch(s))")
        t0 = time.perf_counter()
        edge = train_edge(edge_cfg, cloud, train, progress=cfg.progress)
        save_checkpoint(edge, tmp / "edge")
        edge.path = out / "edge"
        lap("train edge", t0)
        t0 = time.perf_counter()
        control = train_edge(TrainConfig(model=cfg.edge_model, epochs=cfg.control_epochs, compat=False, **common), cloud,
                             train, progress=cfg.progress)
        save_checkpoint(control, tmp / "control")
        control.path = out / "control"
        lap("train control", t0)

        log(f"[3/5] exporting the edge model: {', '.join(DEMO_FORMATS)} (INT8 dynamic)")
        t0 = time.perf_counter()
        manifest = export_checkpoint(edge, tmp / "export", name="edge", formats=DEMO_FORMATS,
                                     check_inputs=FASHION_MNIST_PREPROCESS.apply(queries.images),
                                     check_desc=f"{queries.name} ({len(queries)} query images)",
                                     options={"int8_mode": "dynamic"}, progress=cfg.progress)
        lap("export", t0)

        log("[4/5] embedding gallery and queries with torch (cloud, edge, control), then searching")
        t0 = time.perf_counter()
        scored = score_models(cloud, {"edge": edge, "control": control}, queries, gallery, progress=cfg.progress)
        lap("embed + search + metrics (torch)", t0)
        rows = scored["retrieval"]
        for x in scored["exports"]:
            x["path"] = str(Path(x["path"]).relative_to(tmp))
        report: dict[str, Any] = {
            "title": "hetero demo: Fashion-MNIST, cloud gallery x edge queries",
            "queries": f"{queries.name} ({len(queries)})",
            "gallery": f"{gallery.name} ({len(gallery)}), embedded by the cloud model with torch",
            "host": host_info(),
            "config": asdict(cfg),
            "retrieval": rows,
            "models": [model_row("cloud", cloud), model_row("edge", edge), model_row("control", control)],
            "cloud_source": _cloud_source(cloud, cfg),
            "compatibility": compatibility(rows, ["edge"], "cloud"),
            "export_manifest": manifest,
        }
        report["timings_s"] = timings
        log("")
        log(format_table(rows))
        c = report["compatibility"][0]
        log(f"\ncompatibility criterion (edge->cloud > edge->edge): {'met' if c['criterion_met'] else 'NOT met'}; "
            f"gap to paragon {c['gap_to_paragon_map_at_r']:.4f} mAP@R")

        log("\n[5/5] hetero verify: every exported artifact on every runner here, against the cloud gallery")
        t0 = time.perf_counter()
        # inside the new output, so that the demo run is replaced in one step, verify included; its
        # report names the final paths
        checked = verify(str(tmp / "export"), str(tmp / "cloud"), edge=str(tmp / "edge"), data=cfg.data,
                         out=str(tmp / "verify"), gates=cfg.gates, query_limit=cfg.query_limit,
                         gallery_limit=cfg.gallery_limit, progress=cfg.progress, log=log)
        _rename_paths(tmp / "verify", tmp, out)
        lap("verify", t0)
        timings["total"] = time.perf_counter() - t_start
        report["verify"] = {"report": str(out / "verify" / "report.html"), "verdict": checked["verdict"],
                            "pairs": [{k: r[k] for k in ("name", "label", "status", "passed")} for r in checked["pairs"]]}
        write_json_atomic(tmp / REPORT_FILE, report)
        write_text_atomic(tmp / "report.md", render_markdown(report))
    log(f"total {timings['total']:.0f} s; reports: {out / 'report.md'} and {out / 'verify' / 'report.html'}")
    return report


def _rename_paths(reports: Path, tmp: Path, out: Path) -> None:
    """verify ran on the demo's new output while it was still being built: its reports name the final
    paths (the temp directory's name is unique, so a plain text replacement is exact)."""
    for f in sorted(reports.glob("report.*")):
        text = f.read_text(encoding="utf-8")
        for a, b in ((str(tmp), str(out)), (json.dumps(str(tmp))[1:-1], json.dumps(str(out))[1:-1])):
            text = text.replace(a, b)
        write_text_atomic(f, text)


def _pretrained_cloud(train, log):
    """The shipped cloud, refused unless ``train`` is the very data it was trained on."""

    cloud = load_pretrained(PRETRAINED_CLOUD)
    prov = cloud.info.get("provenance", {})
    log(f"[1/5] loading the shipped pretrained cloud model ({PRETRAINED_CLOUD}: {cloud.spec.backbone}, "
        f"{cloud.config.get('epochs', '?')} epochs, trained by hetero on {prov.get('host', {}).get('date', '?')}; "
        "--train-cloud trains one here instead)")
    if cloud.info.get("dataset_digest") != train.digest():
        raise HeteroError(f"the shipped cloud was trained on Fashion-MNIST, but --data holds other training images "
                          f"({train.name}); pass --train-cloud to train a cloud on them")
    return cloud


def _cloud_source(cloud, cfg: DemoConfig) -> dict[str, Any]:
    if cfg.train_cloud:
        return {"kind": "trained in this run", "config": cloud.config}
    return {"kind": "pretrained, shipped with hetero", "name": PRETRAINED_CLOUD, "fingerprint": cloud.space,
            "provenance": cloud.info.get("provenance", {}), "config": cloud.config}

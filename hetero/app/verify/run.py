"""`hetero verify`: every artifact of an export, on every runner that can run it here, searched
against the cloud gallery; gates decide the exit code (0 pass, 1 a gate or a runner failed,
2 bad input)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from devices.artifact import Artifact, inspected_file, load_manifest
from devices.bench import bench
from devices.errors import DeviceError
from devices.runner import RUNNERS, runner_class
from devices.schema import REPORT_FILE, VERIFY_SCHEMA
from export import EXPORTERS
from hetero import distributed
from hetero._atomic import atomic_dir, check_output_dest, write_json_atomic, write_text_atomic
from hetero._progress import progress_bar
from hetero.app.report import host_info
from hetero.app.verify.gates import check_gates, load_gates, no_op_gates, no_op_note, thresholds_for
from hetero.app.verify.html import render_html
from hetero.app.verify.markdown import render_markdown
from hetero.app.verify.score import INDEXES, Scorer
from hetero.checkpoint import load_checkpoint
from hetero.data import Preprocess, load_dataset
from hetero.embed import cached_embeddings_across_ranks as dist_embeddings
from hetero.errors import HeteroError

SCHEMA = VERIFY_SCHEMA
REFERENCE = "torch @ torch"


@dataclass(frozen=True)
class Pair:
    """One (artifact, runner) to run: ``entry`` is the manifest's artifact entry (None: the torch edge)."""

    entry: dict[str, Any] | None
    runner: str

    @property
    def name(self) -> str:
        return REFERENCE if self.entry is None else f"{self.entry.get('export_format', self.entry['format'])} @ {self.runner}"


def _one_line(e: BaseException) -> str:
    """The first line of an error; the class name too unless it is one of hetero's own."""
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return first if isinstance(e, HeteroError) and first else f"{e.__class__.__name__}: {first}".rstrip(": ")


def plan_pairs(manifest: dict[str, Any], only: list[str] | None = None) -> tuple[list[Pair], list[dict[str, Any]]]:
    """The (artifact, runner) pairs that can run here, and the skipped ones with their reasons."""

    runnable, skipped = [], []
    for entry in manifest["artifacts"]:
        names = [n for n, cls in RUNNERS.items() if entry.get("format") in cls.formats]
        if only:
            names = [n for n in names if n in only]
        if entry.get("file") is None:
            why = entry.get("status", "not built")
            hint = "; build it on the target (see the manifest's command)" if entry.get("format") == "tensorrt" else ""
            skipped += [_skip(entry, n, f"no file in the export ({why}){hint}") for n in names or ["-"]]
            continue
        if not names:
            skipped.append(_skip(entry, "-", f"no runner here runs {entry.get('format')} artifacts"))
        for n in names:
            why = RUNNERS[n].unavailable()
            if why:
                skipped.append(_skip(entry, n, why))
            else:
                runnable.append(Pair(entry, n))
    return runnable, skipped


def _precision(pair: Pair, precision_from: dict[str, tuple[str, str]]) -> str:
    """The precision whose gates a pair gets: its artifact's, as read from the file where it can be."""
    head = _pair_head(pair)
    return precision_from.get(head["artifact"], (head["precision"], ""))[0] if head["artifact"] else head["precision"]


def _skip(entry: dict[str, Any], runner: str, reason: str) -> dict[str, Any]:
    p = Pair(entry, runner)
    return {**_pair_head(p), "runtime": runner, "label": None, "status": "skipped", "reason": reason,
            "metrics": None, "latency": None, "gates": [], "passed": None}


def _pair_head(p: Pair) -> dict[str, Any]:
    e = p.entry or {}
    return {"name": p.name, "export_format": e.get("export_format", "torch") if p.entry else "torch",
            "format": e.get("format", "checkpoint"), "precision": e.get("precision", "fp32"),
            "artifact": e.get("file"), "runner": p.runner}


def check_artifacts(manifest: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Every listed file is present, matches its sha256 and is what its entry says (format,
    precision, input shape, read from the file): bad input otherwise, exit 2. Returns, per file, the
    precision that picks its gates (the file's where it can be read) and where that came from."""

    out = {}
    for entry in manifest["artifacts"]:
        if entry.get("file") is None:
            continue
        found = inspected_file(Path(manifest["_dir"]), entry)[1]
        said = entry.get("precision") or "fp32"
        if found.precision is None:
            out[entry["file"]] = (said, f"as the manifest says, not checked: {found.evidence}")
        elif found.precision != said:  # a compression that compressed nothing: FP32, else refused above
            out[entry["file"]] = (found.precision, f"read from the artifact ({found.evidence}; the manifest says {said})")
        else:
            out[entry["file"]] = (said, f"read from the artifact ({found.evidence})")
    return out


def check_preprocess(manifest: dict[str, Any], model, where: str) -> None:
    """The manifest's preprocessing must be the torch edge model's (``model``, the checkpoint it was
    exported from): a device preprocesses images as the manifest says, and the edge was trained on
    images so preprocessed. (An edge may read them at another size than its cloud: each model embeds
    the same pictures, prepared its own way.)"""

    got = manifest.get("preprocess")
    want = model.preprocess.to_dict()
    try:
        same = Preprocess.from_dict(got) == model.preprocess
    except HeteroError:
        same = False
    if not same:
        diff = [k for k in want if not isinstance(got, dict) or got.get(k) != want[k]] or ["preprocess"]
        shown = ", ".join(f"{k} {got.get(k) if isinstance(got, dict) else None!r} (model: {want[k]!r})"
                          if k in want else k for k in diff)
        raise HeteroError(f"{where}: the manifest's preprocessing differs from its edge model's: {shown}; devices would "
                          "feed the model other inputs than it was trained on, re-run `hetero export`")


def parse_required(specs: list[str] | None, manifest: dict[str, Any], runners: list[str] | None) -> list[str]:
    """``--require FORMAT@RUNNER[,...]`` as pair names ("onnx-fp16 @ onnxruntime"); an unknown
    format or runner, a runner that cannot run the format, or one left out by --runtime is bad input."""

    out: list[str] = []
    formats = EXPORTERS.registered()
    for spec in specs or []:
        for item in spec.split(","):
            fmt, at, runner = (x.strip() for x in item.partition("@"))
            if not at or not fmt or not runner:
                raise HeteroError(f"--require {item.strip()!r}: give FORMAT@RUNNER pairs separated by commas, e.g. "
                                  "onnx@onnxruntime,coreml-fp16@coreml-interp")
            if fmt not in formats:
                raise HeteroError(f"--require {item.strip()}: unknown format {fmt!r}; known formats: {', '.join(formats)}")
            if runner not in RUNNERS or runner == "torch":
                known = ", ".join(n for n in RUNNERS if n != "torch")
                raise HeteroError(f"--require {item.strip()}: unknown runner {runner!r}; known runners: {known}")
            kinds = {e.get("format") for e in manifest["artifacts"] if e.get("export_format", e.get("format")) == fmt}
            if kinds and not kinds & set(RUNNERS[runner].formats):
                raise HeteroError(f"--require {item.strip()}: runner {runner} runs {', '.join(RUNNERS[runner].formats)} "
                                  f"artifacts, not {fmt} ({', '.join(sorted(map(str, kinds)))})")
            if runners and runner not in runners:
                raise HeteroError(f"--require {item.strip()}: runner {runner} is left out by --runtime "
                                  f"{','.join(runners)}; add it, or drop the requirement")
            name = Pair({"format": fmt, "export_format": fmt}, runner).name
            if name not in out:
                out.append(name)
    return out


def _required_status(required: list[str], rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Per required pair: ran / failed / skipped / absent, and the verdict lines of the unmet ones
    (a failed runner is already in the verdict)."""
    by_name = {r["name"]: r for r in rows}
    status, failed = [], []
    for name in required:
        r = by_name.get(name)
        if r is None:
            status.append({"pair": name, "status": "absent", "reason": "the export has no such artifact"})
            failed.append(f"{name}: required, but the export has no {name.split(' @ ')[0]} artifact")
            continue
        status.append({"pair": name, "status": "ran" if r["status"] == "ok" else r["status"], "reason": r["reason"]})
        if r["status"] == "skipped":
            failed.append(f"{name}: required, but skipped ({r['reason']})")
    return status, failed


def _edge_checkpoint(manifest: dict[str, Any], edge: str | None):
    model = manifest.get("model") or {}
    path = edge or model.get("checkpoint")
    if not path or not Path(path).exists():
        raise HeteroError(f"the torch edge model the manifest was exported from ({model.get('checkpoint') or 'unrecorded'}) "
                          "is not here; pass its checkpoint with --edge")
    ckpt = load_checkpoint(path, role=("edge", "control"))
    want = model.get("checkpoint_fingerprint")
    if want and ckpt.fingerprint != want:
        raise HeteroError(f"--edge {path} is not the checkpoint this export was made from (fingerprint "
                          f"{ckpt.fingerprint[:12]}, manifest {want[:12]}); pass the exported checkpoint")
    return ckpt


def _latency(runner, budget_s: float) -> dict[str, Any] | None:
    res = bench(runner, (1,), warmup=5, budget_s=budget_s)
    r = res["results"][0]
    return {"p50_ms": r["p50_ms"], "p90_ms": r["p90_ms"], "batch": 1, "iterations": r["iterations"],
            "threads": runner.settings.get("threads"), "label": res["label"]}


def _examples(name: str, ids: np.ndarray, ok: np.ndarray, scorer, per_pair: int, reference: bool) -> list[dict[str, Any]]:
    """Flip examples, lowest query index first: for the torch edge, up to ``per_pair`` negative (and a
    third as many positive) flips vs the paragon; for an artifact, its flips vs the torch edge model
    (what the export changed), so the table does not repeat the torch rows."""
    base, vs = (scorer.paragon_ok, "paragon") if reference else (scorer.reference_ok, "torch")
    out = []
    for kind, sel, n in (("negative", base & ~ok, per_pair), ("positive", ~base & ok, max(1, per_pair // 3))):
        for i in np.flatnonzero(sel)[:n]:
            out.append({"pair": name, "kind": f"{kind} flip vs {vs}", "query": int(i), "query_label": int(scorer.ql[i]),
                        "paragon_top5": scorer.paragon_ids[i, :5].tolist(),
                        "paragon_top5_labels": scorer.gl[scorer.paragon_ids[i, :5]].tolist(),
                        "edge_top5": ids[i, :5].tolist(), "edge_top5_labels": scorer.gl[ids[i, :5]].tolist()})
    return out


def verify(manifest: str, cloud: str, *, edge: str | None = None, data: str | None = None, gates: str | None = None,
           out: str | None = None, index: str = "exact", runners: list[str] | None = None,
           query_limit: int | None = None, gallery_limit: int | None = None, latency: bool = True,
           latency_budget_s: float = 0.3, html: bool = True, progress: bool = True,
           require: list[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the verification and write report.json/.md/.html into ``out``; returns the report.

    ``require``: ``FORMAT@RUNNER`` pairs (comma-separated lists allowed) that must run here: one that
    is skipped or absent fails the verdict (exit 1)."""


    distributed.init()  # under torchrun the ranks share the torch embedding; rank 0 alone runs the runtimes and writes
    if not distributed.is_main():
        progress, log = False, _quiet
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if index not in INDEXES:
        raise HeteroError(f"--index {index!r} is not one of {', '.join(INDEXES)}")
    check_limits(query_limit, gallery_limit)
    gate_cfg, gate_source = load_gates(gates)
    idle_gates = no_op_gates(gate_cfg)
    try:
        man = load_manifest(manifest)
    except DeviceError as e:
        raise HeteroError(str(e)) from None
    known = set(runner_class(r).name for r in runners) if runners else None
    required = parse_required(require, man, sorted(known) if known else None)
    out_dir = Path(out) if out else Path(man["_dir"]).parent / "verify"
    _check_out(out_dir)
    cloud_ckpt = load_checkpoint(cloud, role="cloud")
    control = (man.get("model") or {}).get("role") == "control"
    if not control and man.get("space") != cloud_ckpt.space:
        raise HeteroError(f"{manifest} was exported in cloud space {str(man.get('space'))[:12]}, but --cloud {cloud} is "
                          f"space {cloud_ckpt.space[:12]}; pass the cloud the edge model was trained against")
    edge_ckpt = _edge_checkpoint(man, edge)
    check_preprocess(man, edge_ckpt, str(manifest))
    precision_from = check_artifacts(man)
    if control and edge_ckpt.info.get("cloud_fingerprint") != cloud_ckpt.space:
        raise HeteroError(f"{manifest} is the export of a control model made for cloud space "
                          f"{str(edge_ckpt.info.get('cloud_fingerprint'))[:12]}, not --cloud {cloud} "
                          f"({cloud_ckpt.space[:12]}); pass that cloud")
    pairs, skipped = plan_pairs(man, sorted(known) if known else None)

    prep = cloud_ckpt.preprocess
    queries = load_dataset(data, "test", progress=progress)
    gallery = load_dataset(data, "train", progress=progress)
    if tuple(queries.classes) != tuple(gallery.classes):
        raise HeteroError("the dataset's test (queries) and train (gallery) splits have different classes; fix the folders")
    want_classes = man.get("classes") or list(cloud_ckpt.classes)
    if want_classes and list(gallery.classes) != list(want_classes):
        raise HeteroError(f"the dataset's classes ({', '.join(gallery.classes[:4])}, ...: {len(gallery.classes)}) do not "
                          f"match the gallery the cloud was trained on ({len(want_classes)} classes); pass that dataset with --data")
    queries = (queries.subset(query_limit) if query_limit is not None else queries).conform(prep)
    gallery = (gallery.subset(gallery_limit) if gallery_limit is not None else gallery).conform(prep)
    timings["load"] = time.perf_counter() - t_start

    t0 = time.perf_counter()
    # the torch embeddings are cached too (keyed by weights and data), so a re-run only embeds through the runtimes;
    # under torchrun the ranks split them and gather the rows (hetero.distributed)
    g_cloud = np.asarray(dist_embeddings(cloud_ckpt, gallery, progress=progress, key=cloud_ckpt.space, desc="cloud targets"))
    q_cloud = np.asarray(dist_embeddings(cloud_ckpt, queries, progress=progress, desc="cloud queries"))
    q_torch = np.asarray(dist_embeddings(edge_ckpt, queries, progress=progress, desc="edge queries (torch)"))
    g_edge = np.asarray(dist_embeddings(edge_ckpt, gallery, progress=progress, desc="edge gallery (torch)"))
    timings["embed with torch (cloud and edge)"] = time.perf_counter() - t0
    if not distributed.is_main():  # its share of the embedding is done; the report is rank 0's
        return {"verdict": {"exit_code": 0, "rank": distributed.rank()}}
    t0 = time.perf_counter()
    scorer = Scorer(g_cloud, gallery.labels, queries.labels, q_cloud, index=index)
    scorer.set_reference(q_torch, g_edge)
    del g_edge
    timings["score paragon and torch edge"] = time.perf_counter() - t0

    rows: list[dict[str, Any]] = []
    drift: dict[str, np.ndarray] = {}
    examples: list[dict[str, Any]] = []

    def finish(pair: Pair, runtime: str, label: str, m: dict[str, Any], lat: dict[str, Any] | None) -> None:
        ids, ok, cos = m.pop("_ids"), m.pop("_ok"), m.pop("_drift", None)
        if cos is not None and pair.entry is not None:
            drift[pair.name] = cos
        th = thresholds_for(gate_cfg, _precision(pair, precision_from), reference=pair.entry is None)
        g = check_gates(m, th)
        rows.append({**_pair_head(pair), "runtime": runtime, "label": label, "status": "ok", "reason": None,
                     "metrics": m, "latency": lat, "gates": g, "passed": all(x["passed"] for x in g)})
        examples.extend(_examples(pair.name, ids, ok, scorer, 3, reference=pair.entry is None))

    ref_pair = Pair(None, "torch")
    lat = None
    if latency:
        lat = _torch_latency(edge_ckpt, latency_budget_s)
    finish(ref_pair, f"torch {_torch_version()}", "reference", scorer.score(q_torch, keep=True), lat)

    q_inputs = edge_ckpt.preprocess.apply(queries.conform(edge_ckpt.preprocess).images)
    bar = _bar(len(pairs), progress)
    for pair in pairs:
        t0 = time.perf_counter()
        art = Artifact(Path(man["_dir"]) / pair.entry["file"], pair.entry, man)
        cls = runner_class(pair.runner)
        try:
            with cls(art) as r:
                q = r.embed(q_inputs)
                runtime, label = r.runtime, r.label
            lat = None
            if latency:
                one = {"threads": 1} if "threads" in cls.setting_names() else {}
                with cls(art, **one) as r:
                    lat = _latency(r, latency_budget_s)
            m = scorer.score(q, keep=True)
        except Exception as e:  # noqa: BLE001 - a runner failing on one artifact must not stop the others
            rows.append({**_pair_head(pair), "runtime": pair.runner, "label": cls.label, "status": "failed",
                         "reason": _one_line(e), "metrics": None, "latency": None, "gates": [], "passed": False})
            log(f"  {pair.name}: FAILED ({_one_line(e)})")
            bar.update(1)
            continue
        finish(pair, runtime, label, m, lat)
        timings[pair.name] = time.perf_counter() - t0
        bar.update(1)
    bar.close()
    rows += skipped

    failed = [f"{r['name']}: {g['gate']} {_fmt(g['value'])} (threshold {_fmt(g['threshold'])})"
              for r in rows if r["status"] == "ok" for g in r["gates"] if not g["passed"]]
    failed += [f"{r['name']}: runner failed ({r['reason']})" for r in rows if r["status"] == "failed"]
    ran_artifacts = sum(1 for r in rows if r["status"] == "ok" and r["name"] != REFERENCE)
    if ran_artifacts == 0:
        failed.append("no artifact of the export could run on this host (see the skipped pairs)")
    required_status, unmet = _required_status(required, rows)
    failed += unmet
    for r in rows:
        if r["artifact"] is not None:
            r["precision"], r["precision_from"] = precision_from.get(r["artifact"], (r["precision"], "as the manifest says"))
    timings["total"] = time.perf_counter() - t_start
    report = {
        "schema": SCHEMA,
        "title": f"hetero verify: {manifest} against {cloud}",
        "manifest": str(manifest), "cloud": str(cloud), "edge": str(edge_ckpt.path), "edge_role": edge_ckpt.role,
        "space": cloud_ckpt.space,
        "queries": f"{queries.name} ({len(queries)})",
        "gallery": f"{gallery.name} ({len(gallery)}), embedded by the cloud model",
        "host": host_info(), "search": scorer.search_info,
        "paragon": scorer.paragon_metrics, "edge_to_edge": scorer.edge_to_edge,
        "pairs": rows,
        "gates": {"source": gate_source, "thresholds": gate_cfg, "no_op": idle_gates,
                  "warnings": [no_op_note(g) for g in idle_gates]},
        "verdict": {"passed": not failed, "exit_code": 1 if failed else 0, "failed": failed,
                    "ran": sum(1 for r in rows if r["status"] == "ok"), "skipped": len(skipped),
                    "failed_runners": sum(1 for r in rows if r["status"] == "failed"),
                    "required": required_status},
        "examples": examples,
        "timings_s": timings,
    }
    _write(out_dir, report, drift, queries, gallery, html)
    log(summary_table(report))
    log(f"report: {out_dir / 'report.html'}" if html else f"report: {out_dir / 'report.json'}")
    return report


def check_limits(query_limit: int | None, gallery_limit: int | None) -> None:
    """--query-limit/--gallery-limit: None means every image; a count must be >= 1 (0 is not "all")."""
    for flag, n in (("--query-limit", query_limit), ("--gallery-limit", gallery_limit)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise HeteroError(f"{flag} must be a whole number >= 1, got {n!r}; leave it out to use every image")


def _torch_version() -> str:
    return torch.__version__


def _torch_latency(edge_ckpt, budget_s: float) -> dict[str, Any] | None:
    cls = runner_class("torch")
    if cls.unavailable():
        return None
    with cls(cls.open_path(edge_ckpt.path), threads=1) as r:
        return _latency(r, budget_s)


def _bar(total: int, enabled: bool):
    return progress_bar(total=total, desc="artifacts x runners", unit="pair", disable=not enabled, leave=False)


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    return f"{v:.6g}"


def _check_out(out_dir: Path) -> None:
    """Only a new path, an empty directory or an earlier verify report may be written (replaced)."""

    check_output_dest(out_dir, "verify report", True, _legacy_report)


def _legacy_report(d: Path) -> str | None:
    """A verify report written before output markers."""
    try:
        old = json.loads((d / REPORT_FILE).read_text(encoding="utf-8"))
        return "verify report" if isinstance(old, dict) and old.get("schema") == SCHEMA else None
    except (OSError, ValueError, RecursionError):
        return None


def _write(out_dir: Path, report: dict[str, Any], drift: dict[str, np.ndarray], queries, gallery, html: bool) -> None:
    page = None
    if html:
        page = render_html(report, drift=drift, images={"queries": queries.images, "gallery": gallery.images,
                                                        "classes": list(gallery.classes)})
    with atomic_dir(out_dir, "verify report", True, _legacy_report) as tmp:
        write_json_atomic(tmp / REPORT_FILE, report)
        write_text_atomic(tmp / "report.md", render_markdown(report))
        if page is not None:
            write_text_atomic(tmp / "report.html", page)


def summary_table(report: dict[str, Any]) -> str:
    """The console table: one line per pair, then the verdict."""
    head = f"{'pair':<34} {'label':<9} {'mAP@R':>7} {'gap':>7} {'top10/torch':>11} {'NFR':>7} {'min cos':>10} {'p50 ms':>8}  gates"
    lines = [head, "-" * len(head)]
    p = report["paragon"]
    lines.append(f"{'paragon (cloud->cloud)':<34} {'':<9} {p['map_at_r']:>7.4f}")
    for r in report["pairs"]:
        if r["status"] != "ok":
            lines.append(f"{r['name'][:34]:<34} {r['status']:<9} {r['reason'][:90]}")
            continue
        m, lat = r["metrics"], r["latency"]
        lines.append(f"{r['name'][:34]:<34} {r['label']:<9} {m['map_at_r']:>7.4f} {m['gap_to_paragon']:>7.4f} "
                     f"{100 * m['top10_overlap_torch']:>10.2f}% {100 * m['flips_vs_paragon']['negative']:>6.2f}% "
                     f"{m['drift']['min']:>10.7f} {lat['p50_ms'] if lat else float('nan'):>8.3f}  "
                     f"{'pass' if r['passed'] else 'FAIL'}")
    v = report["verdict"]
    lines.append("")
    lines.append(f"verdict: {'PASS' if v['passed'] else 'FAIL'} (exit {v['exit_code']}): {v['ran']} pair(s) ran, "
                 f"{v['skipped']} skipped, {v['failed_runners']} runner failure(s)")
    lines += [f"  failed: {f}" for f in v["failed"]]
    for r in v.get("required") or []:
        lines.append(f"  required: {r['pair']}: {r['status']}")
    lines += [f"warning: {w}" for w in report["gates"].get("warnings") or []]
    return "\n".join(lines)


def _quiet(_: str) -> None:
    pass

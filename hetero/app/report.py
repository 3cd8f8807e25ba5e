"""Cross-model retrieval report: rows of (query model, gallery model, runtime) -> metrics, the
compatibility criterion, exports; rendered as JSON and markdown."""
from __future__ import annotations

import datetime as _dt
from typing import Any

import torch

from devices.bench import host
from hetero.models.complexity import count_flops, count_params


def host_info() -> dict[str, Any]:
    """The host of a report, from :func:`devices.bench.host` (the one place it is read), under the
    report's keys, with torch's version and the date."""
    h = host()
    return {
        "machine": h["machine"], "system": h["os"].split(" ")[0], "processor": h["cpu"], "cpu_count": h["cores"],
        "python": h["python"], "torch": torch.__version__, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
    }


def model_row(name: str, ckpt) -> dict[str, Any]:
    return {
        "name": name, "role": ckpt.role, "backbone": ckpt.spec.backbone, "epochs": ckpt.config.get("epochs"),
        "params": count_params(ckpt.model),
        "flops": count_flops(ckpt.model, ckpt.input_shape), "space": ckpt.space, "fingerprint": ckpt.fingerprint,
    }


def _find(rows: list[dict[str, Any]], q: str, g: str, runtime: str = "torch") -> dict[str, Any] | None:
    return next((r for r in rows if r["query_model"] == q and r["gallery_model"] == g and r["runtime"].startswith(runtime)), None)


def compatibility(rows: list[dict[str, Any]], edges: list[str], cloud: str) -> list[dict[str, Any]]:
    """The compatibility criterion (Shen et al. 2020): edge->cloud mAP@R above edge->edge mAP@R."""
    paragon = _find(rows, cloud, cloud)
    out = []
    for e in edges:
        het, hom = _find(rows, e, cloud), _find(rows, e, e)
        if het is None or hom is None or paragon is None:
            continue
        out.append({"edge": e, "criterion_met": bool(het["map_at_r"] > hom["map_at_r"]),
                    "edge_to_cloud_map_at_r": het["map_at_r"], "edge_to_edge_map_at_r": hom["map_at_r"],
                    "gap_to_paragon_map_at_r": paragon["map_at_r"] - het["map_at_r"],
                    "negative_flip_rate": het.get("negative_flip_rate"), "positive_flip_rate": het.get("positive_flip_rate")})
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def provenance_line(report: dict[str, Any]) -> str:
    """Where and when a report was measured, and on what data."""
    host = report.get("host", {})
    return (f"Measured on {host.get('processor', '?')} ({host.get('cpu_count', '?')} CPUs), "
            f"{host.get('system', '?')}, torch {host.get('torch', '?')}, {host.get('date', '?')}. "
            f"Queries: {report.get('queries', '?')}; gallery: {report.get('gallery', '?')}.")


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# {report.get('title', 'hetero report')}", "", provenance_line(report)]
    ref = report["retrieval"][0]["query_model"] if report["retrieval"] else "cloud"  # "old" for an update
    lines += ["", "## Retrieval", "", f"Flip rates compare each query's top-1 with the paragon's ({ref}->{ref}): negative = "
              "right for the paragon, wrong here.", "",
              "| query model | gallery model | query runtime | mAP@R | R@1 | R@10 | neg. flips | pos. flips |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["retrieval"]:
        lines.append(f"| {r['query_model']} | {r['gallery_model']} | {r['runtime']} | {r['map_at_r']:.4f} | "
                     f"{r['recall_at_1']:.4f} | {r['recall_at_10']:.4f} | {_pct(r.get('negative_flip_rate'))} | "
                     f"{_pct(r.get('positive_flip_rate'))} |")
    lines += ["", "## Models", "", "| name | role | backbone | epochs | params | MFLOPs |", "|---|---|---|---|---|---|"]
    for m in report["models"]:
        lines.append(f"| {m['name']} | {m['role']} | {m['backbone']} | {m.get('epochs') or '-'} | {m['params']:,} | "
                     f"{m['flops'] / 1e6:.2f} |")
    src = report.get("cloud_source")
    if src and src.get("provenance"):
        pv = src["provenance"]
        lines += ["", f"The cloud is {src['kind']} ({src.get('name', '')}, fingerprint {src['fingerprint'][:12]}): "
                  f"`{pv.get('command', '?')}`, on {pv.get('host', {}).get('processor', '?')}, {pv.get('host', {}).get('date', '?')}."]
    if report.get("compatibility"):
        lines += ["", "## Compatibility (edge->cloud mAP@R > edge->edge mAP@R)", "",
                  "| edge | criterion met | edge->cloud | edge->edge | gap to paragon |", "|---|---|---|---|---|"]
        for c in report["compatibility"]:
            lines.append(f"| {c['edge']} | {'yes' if c['criterion_met'] else 'NO'} | {c['edge_to_cloud_map_at_r']:.4f} | "
                         f"{c['edge_to_edge_map_at_r']:.4f} | {c['gap_to_paragon_map_at_r']:.4f} |")
    if report.get("exports"):
        lines += ["", "## Exports (parity with torch, measured)", "", "| edge | format | file | sha256 | min cosine | max abs diff |",
                  "|---|---|---|---|---|---|"]
        for x in report["exports"]:
            lines.append(f"| {x['edge']} | {x['format']} | {x['path']} | {x['sha256'][:12]} | {x['min_cosine']:.7f} | {x['max_abs_diff']:.2e} |")
    if report.get("timings_s"):
        lines += ["", "## Timings (s, measured)", "", "| step | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in report["timings_s"].items()]
    return "\n".join(lines) + "\n"


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'query':<10} {'gallery':<10} {'runtime':<38} {'mAP@R':>7} {'R@1':>7} {'R@10':>7} {'NFR':>7}"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['query_model']:<10} {r['gallery_model']:<10} {r['runtime'][:38]:<38} {r['map_at_r']:>7.4f} "
                   f"{r['recall_at_1']:>7.4f} {r['recall_at_10']:>7.4f} {_pct(r.get('negative_flip_rate')):>7}")
    return "\n".join(out)

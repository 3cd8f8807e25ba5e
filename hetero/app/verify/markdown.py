"""report.md of `hetero verify` (report.html carries the same tables plus the plots)."""
from __future__ import annotations

from typing import Any

from hetero.app.report import _pct, provenance_line


def _cos(x: float) -> str:
    return f"{x:.7f}"


def render_markdown(report: dict[str, Any]) -> str:
    v, s = report["verdict"], report["search"]
    lines = [f"# {report['title']}", "", provenance_line(report)]
    search = "exact (faiss, inner product)" if s["index"] == "exact" else (
        f"**approximate** ({s['index']}, {s['params']}): recall@10 against exact search "
        f"{_pct(s['recall_at_10_vs_exact'])} on {s.get('recall_queries')} queries; mAP@R stays exact")
    lines += [f"Search: {search}. Gates: {report['gates']['source']}.", "",
              f"**Verdict: {'PASS' if v['passed'] else 'FAIL'}** (exit code {v['exit_code']}): {v['ran']} pair(s) ran, "
              f"{v['skipped']} skipped here, {v['failed_runners']} runner failure(s)."]
    lines += [f"- {f}" for f in v["failed"]]
    if v.get("required"):
        lines += ["", "Required pairs (`--require`): " + "; ".join(f"{r['pair']}: **{r['status']}**" for r in v["required"]) + "."]
    warnings = report["gates"].get("warnings") or []
    if warnings:
        lines += [""] + [f"> **Warning:** {w}." for w in warnings]
    p, e2e = report["paragon"], report.get("edge_to_edge") or {}
    lines += ["", f"Paragon (cloud->cloud, torch): mAP@R {p['map_at_r']:.4f}, R@1 {p['recall_at_1']:.4f}, "
              f"R@10 {p['recall_at_10']:.4f}. Torch edge->edge (for the compatibility criterion): mAP@R "
              f"{e2e.get('map_at_r', float('nan')):.4f}.", "",
              "## Pairs (edge queries on each runtime x cloud gallery)", "",
              "Flips compare each query's top-1 with the paragon's and with the torch edge model's (negative = right "
              "there, wrong here). Drift: cosine to the torch edge model's embedding of the same query. **Emulated** "
              "rows ran in hetero's Core ML reference interpreter, not Core ML.", "",
              "| pair | label | mAP@R | R@1 | R@10 | gap | criterion | top-10 torch | top-10 paragon | NFR paragon | "
              "PFR paragon | NFR torch | drift min | drift p01 | drift mean | p50 ms (batch 1) | gates |",
              "|" + "---|" * 17]
    for r in report["pairs"]:
        if r["status"] != "ok":
            continue
        m, lat = r["metrics"], r["latency"]
        label = f"**{r['label']}**" if r["label"] == "emulated" else r["label"]
        lines.append(
            f"| {r['name']} | {label} | {m['map_at_r']:.4f} | {m['recall_at_1']:.4f} | {m['recall_at_10']:.4f} | "
            f"{m['gap_to_paragon']:.4f} | {'met' if m['criterion_met'] else 'NOT met'} | {_pct(m['top10_overlap_torch'])} | "
            f"{_pct(m['top10_overlap_paragon'])} | {_pct(m['flips_vs_paragon']['negative'])} | "
            f"{_pct(m['flips_vs_paragon']['positive'])} | {_pct(m['flips_vs_torch']['negative'])} | {_cos(m['drift']['min'])} | "
            f"{_cos(m['drift']['p01'])} | {_cos(m['drift']['mean'])} | "
            f"{_latency(lat)} | {'pass' if r['passed'] else '**FAIL**'} |")
    lines += ["", "## Gates", "", "| pair | gate | threshold | measured | result |", "|---|---|---|---|---|"]
    for r in report["pairs"]:
        for g in r["gates"]:
            lines.append(f"| {r['name']} | {g['gate']} | {_val(g['threshold'])} | {_val(g['value'])} | "
                         f"{'pass' if g['passed'] else '**FAIL**'} |")
    unchecked = [r for r in report["pairs"] if r.get("precision_from", "").startswith("as the manifest says")]
    if unchecked:
        lines += ["", "Precision taken from the manifest, not read from the artifact (its gates follow the manifest): "
                  + "; ".join(f"{r['name']} ({r['precision_from']})" for r in unchecked) + "."]
    other = [r for r in report["pairs"] if r["status"] != "ok"]
    if other:
        lines += ["", "## Skipped and failed", "", "| pair | status | reason |", "|---|---|---|"]
        lines += [f"| {r['name']} | {r['status']} | {r['reason']} |" for r in other]
    if report.get("timings_s"):
        lines += ["", "## Timings (s, measured)", "", "| step | seconds |", "|---|---|"]
        lines += [f"| {k} | {t:.1f} |" for k, t in report["timings_s"].items()]
    return "\n".join(lines) + "\n"


def _latency(lat: dict[str, Any] | None) -> str:
    return "-" if not lat else f"{lat['p50_ms']:.3f} ({lat['label']})"


def _val(x: Any) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    return f"{x:.7g}"

"""The self-contained HTML page of a `hetero verify` report: one file, inline CSS, every image a
PNG data URI, no script and no URL, so it opens offline and can be attached to a release as is."""
from __future__ import annotations

import base64
import io
from html import escape
from typing import Any

import numpy as np
from PIL import Image

from hetero.app.verify import plots
from hetero.errors import HeteroError, MissingDependencyError

THUMB_PX = 56  # thumbnails are upscaled (nearest) to about this height; Fashion-MNIST's 28 px doubles

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px;color:#1a1a1a;
  background:#fff;max-width:1400px}
h1{font-size:22px;margin:0 0 6px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
p.prov{margin:2px 0;font-size:13px;color:#333}p.note{font-size:12px;color:#555}
p.warn{margin:6px 0;padding:8px 12px;background:#fff3cd;border-left:4px solid #e65100;font-size:13px}
.verdict{margin:16px 0;padding:14px 18px;border-radius:6px;font-size:15px;color:#fff}
.verdict .big{font-size:30px;font-weight:700;letter-spacing:1px;margin-right:14px}
.verdict.pass{background:#1b5e20}.verdict.fail{background:#8e0000}.verdict ul{margin:6px 0 0 18px;padding:0}
table{border-collapse:collapse;font-size:12px;margin:4px 0}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;vertical-align:middle}
th{background:#f0f0f0}td.l,th.l{text-align:left}
tr.fail td{background:#ffd6d6}td.fail{background:#ffd6d6;color:#8e0000;font-weight:700}td.pass{color:#1b5e20}
.tag{display:inline-block;font-size:10px;padding:0 5px;border-radius:8px;margin-left:4px;color:#fff;
  vertical-align:middle}
.tag.reference{background:#555}.tag.measured{background:#1565c0}.tag.emulated{background:#e65100}
.tag.skipped{background:#777}.tag.failed{background:#8e0000}.tag.ok{background:#1b5e20}
small{color:#555}
figure.plot{margin:8px 0 18px}figure.plot figcaption{font-size:12px;color:#444}
figure.plot img{max-width:100%;border:1px solid #eee}
.row{display:flex;gap:4px}
figure.th{margin:0;padding:0;text-align:center;font-size:10px;width:64px}
figure.th img{display:block;margin:0 auto;border:3px solid #999}
figure.th.hit img{border-color:#2e7d32}figure.th.miss img{border-color:#c62828}figure.th.query img{border-color:#1565c0}
figure.th figcaption{overflow:hidden;white-space:nowrap;text-overflow:ellipsis}
span.hit{color:#2e7d32;font-weight:600}span.miss{color:#c62828;font-weight:600}
"""


def _e(x: Any) -> str:
    return escape(str(x), quote=True)


def _f4(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _cos(x: float | None) -> str:
    return "–" if x is None else f"{x:.7f}"


def _gate_value(gate: str, x: Any) -> str:
    """A gate's threshold or value in the unit of its metric."""
    if x is None:
        return "–"
    if isinstance(x, (bool, np.bool_)):
        return "true" if x else "false"
    if "cosine" in gate:
        return _cos(x)
    if "flip" in gate or "overlap" in gate:
        return _pct(x)
    return _f4(x)


def _tag(kind: str) -> str:
    return f'<span class="tag {_e(kind)}">{_e(kind)}</span>'


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _thumb_png(img: np.ndarray) -> bytes:
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise HeteroError(f"thumbnail images must be uint8 [N,H,W,C], got dtype {a.dtype}; convert them with .astype(np.uint8)")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise HeteroError(f"thumbnail images must be [N,H,W,C] with C 1 or 3, got an image of shape {a.shape}")
    im = Image.fromarray(a)
    scale = max(1, round(THUMB_PX / max(a.shape[0], 1)))
    if scale > 1:
        im = im.resize((a.shape[1] * scale, a.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


class _Thumbs:
    """Thumbnail data URIs of the query and gallery images, each encoded once."""

    def __init__(self, images: dict[str, Any] | None, report: dict[str, Any]):
        images = images or {}
        self.sets = {k: images.get(k) for k in ("queries", "gallery")}
        self.classes = list(images.get("classes") or report.get("classes") or [])
        self._cache: dict[tuple[str, int], str] = {}

    def name(self, label: int) -> str:
        return self.classes[label] if 0 <= label < len(self.classes) else str(label)

    def cell(self, which: str, index: int, label: int, cls: str) -> str:
        arr = self.sets[which]
        what = "query" if which == "queries" else "gallery"
        title = f"{what} {index}: {self.name(label)}"
        if arr is None:
            return f'<figure class="th {cls}"><figcaption title="{_e(title)}">#{index}<br>{_e(self.name(label))}</figcaption></figure>'
        if not 0 <= index < len(arr):
            raise HeteroError(f"flip example needs {what} image {index} but only {len(arr)} {which} images were given; "
                              f"pass the images the report was computed on")
        key = (which, index)
        if key not in self._cache:
            self._cache[key] = _data_uri(_thumb_png(arr[index]))
        return (f'<figure class="th {cls}"><img src="{self._cache[key]}" alt="{_e(title)}" title="{_e(title)}">'
                f'<figcaption title="{_e(title)}">{_e(self.name(label))}</figcaption></figure>')


def _provenance(r: dict[str, Any]) -> str:
    h = r.get("host") or {}
    s = r.get("search") or {}
    if s.get("label") == "approximate" or s.get("index") not in (None, "exact"):
        params = ", ".join(f"{k}={v}" for k, v in (s.get("params") or {}).items())
        rec = s.get("recall_at_10_vs_exact")
        search = (f"approximate ({s.get('index')}{', ' + params if params else ''}; "
                  f"recall@10 vs exact {_f4(rec) if rec is not None else 'not measured'})")
    else:
        search = "exact"
    lines = [
        f"Measured on {h.get('processor', '?')}, {h.get('cpu_count', '?')} CPUs, {h.get('system', '?')} "
        f"{h.get('machine', '?')}; Python {h.get('python', '?')}, torch {h.get('torch', '?')}; {h.get('date', '?')}.",
        f"Queries: {r.get('queries', '?')}. Gallery: {r.get('gallery', '?')}. Search index: {search}.",
        f"Export: {r.get('manifest', '?')}; cloud: {r.get('cloud', '?')}; edge: {r.get('edge', '?')}; "
        f"space {str(r.get('space', '?'))[:16]}.",
    ]
    return "\n".join(f'<p class="prov">{_e(x)}</p>' for x in lines)


def _verdict(r: dict[str, Any]) -> str:
    v = r["verdict"]
    ok = bool(v["passed"])
    failed = "".join(f"<li>{_e(f)}</li>" for f in v.get("failed") or [])
    required = "; ".join(f"{x['pair']}: {x['status']}" for x in v.get("required") or [])
    warnings = "".join(f'<p class="warn">Warning: {_e(w)}.</p>' for w in (r.get("gates") or {}).get("warnings") or [])
    return (f'<div class="verdict {"pass" if ok else "fail"}"><span class="big">{"PASS" if ok else "FAIL"}</span>'
            f'exit code {_e(v.get("exit_code"))} · {_e(v.get("ran", "?"))} pairs ran, {_e(v.get("skipped", 0))} skipped'
            + (f"<div>Failed gates:</div><ul>{failed}</ul>" if failed else "")
            + (f"<div>Required pairs: {_e(required)}</div>" if required else "") + "</div>" + warnings)


def _references(r: dict[str, Any]) -> str:
    rows = []
    for name, key in (("paragon: cloud queries -> cloud gallery (torch)", "paragon"),
                      ("torch edge queries -> torch edge gallery", "edge_to_edge")):
        m = r.get(key) or {}
        rows.append(f'<tr><td class="l">{_e(name)}</td><td>{_f4(m.get("map_at_r"))}</td>'
                    f'<td>{_f4(m.get("recall_at_1"))}</td><td>{_f4(m.get("recall_at_10"))}</td></tr>')
    return ('<table><tr><th class="l">reference</th><th>mAP@R</th><th>R@1</th><th>R@10</th></tr>'
            + "".join(rows) + "</table>")


def _latency(lat: dict[str, Any] | None) -> str:
    if not lat:
        return "–"
    v = lat["p50_ms"]
    s = f"{v:.3f} ms" if v < 10 else f"{v:.1f} ms"
    s = _e(s) + f' <small>b{_e(lat.get("batch", "?"))} t{_e(lat.get("threads", "?"))}</small>'
    return s + (_tag("emulated") if lat.get("label") == "emulated" else "")


def _pairs_table(r: dict[str, Any]) -> str:
    head = ('<tr><th class="l" rowspan="2">pair</th><th rowspan="2">label</th><th rowspan="2">status</th>'
            '<th rowspan="2">mAP@R</th><th rowspan="2">R@1</th><th rowspan="2">R@10</th>'
            '<th rowspan="2">gap to paragon</th><th rowspan="2">criterion</th>'
            '<th colspan="2">top-10 overlap</th><th colspan="2">flips vs paragon</th><th colspan="2">flips vs torch</th>'
            '<th colspan="3">drift cosine vs torch</th><th rowspan="2">latency p50</th></tr>'
            '<tr><th>torch</th><th>paragon</th><th>neg</th><th>pos</th><th>neg</th><th>pos</th>'
            '<th>min</th><th>p01</th><th>mean</th></tr>')
    rows = []
    for p in r["pairs"]:
        m = p.get("metrics") or {}
        fp, ft, d = m.get("flips_vs_paragon") or {}, m.get("flips_vs_torch") or {}, m.get("drift") or {}
        crit = m.get("criterion_met")
        crit_s = "–" if crit is None else ('<span class="hit">met</span>' if crit else '<span class="miss">not met</span>')
        cls = ' class="fail"' if p.get("passed") is False else ""
        src = p.get("precision_from") or ""
        unchecked = f"<br><small>precision {_e(p.get('precision'))} {_e(src)}</small>" \
            if src.startswith("as the manifest says") else ""
        rows.append(
            f'<tr{cls}><td class="l">{_e(p["name"])}<br><small>{_e(p.get("runtime") or "")}</small>{unchecked}</td>'
            f'<td>{_tag(p.get("label", "?"))}</td><td>{_tag(p["status"])}</td>'
            f'<td>{_f4(m.get("map_at_r"))}</td><td>{_f4(m.get("recall_at_1"))}</td><td>{_f4(m.get("recall_at_10"))}</td>'
            f'<td>{_f4(m.get("gap_to_paragon"))}</td><td>{crit_s}</td>'
            f'<td>{_pct(m.get("top10_overlap_torch"))}</td><td>{_pct(m.get("top10_overlap_paragon"))}</td>'
            f'<td>{_pct(fp.get("negative"))}</td><td>{_pct(fp.get("positive"))}</td>'
            f'<td>{_pct(ft.get("negative"))}</td><td>{_pct(ft.get("positive"))}</td>'
            f'<td>{_cos(d.get("min"))}</td><td>{_cos(d.get("p01"))}</td><td>{_cos(d.get("mean"))}</td>'
            f'<td>{_latency(p.get("latency"))}</td></tr>')
    return '<table class="pairs">' + head + "".join(rows) + "</table>"


def _gates_table(r: dict[str, Any]) -> str:
    rows = []
    for p in r["pairs"]:
        for g in p.get("gates") or []:
            ok = bool(g["passed"])
            row_cls = "" if ok else ' class="fail"'
            rows.append(f'<tr{row_cls}><td class="l">{_e(p["name"])}'
                        f'{_tag("emulated") if p.get("label") == "emulated" else ""}</td>'
                        f'<td class="l">{_e(g["gate"])}</td><td>{_e(_gate_value(g["gate"], g["threshold"]))}</td>'
                        f'<td>{_e(_gate_value(g["gate"], g["value"]))}</td>'
                        f'<td class="{"pass" if ok else "fail"}">{"pass" if ok else "FAIL"}</td></tr>')
    if not rows:
        return '<p class="note">No pair was scored, so no gate was checked.</p>'
    return ('<table class="gates"><tr><th class="l">pair</th><th class="l">gate</th><th>threshold</th>'
            '<th>measured</th><th>result</th></tr>' + "".join(rows) + "</table>")


def _not_run(r: dict[str, Any]) -> str:
    rows = [f'<tr><td class="l">{_e(p["name"])}</td><td>{_tag(p["status"])}</td>'
            f'<td class="l">{_e(p.get("runtime") or "")}</td><td class="l">{_e(p.get("reason") or "")}</td></tr>'
            for p in r["pairs"] if p["status"] != "ok"]
    if not rows:
        return '<p class="note">Every pair ran.</p>'
    return ('<table class="notrun"><tr><th class="l">pair</th><th>status</th><th class="l">runtime</th>'
            '<th class="l">reason</th></tr>' + "".join(rows) + "</table>")


def _emulated_name(r: dict[str, Any], name: str) -> str:
    """A pair's name, tagged when its numbers are emulated (the drift plot only knows names)."""
    label = next((p.get("label") for p in r["pairs"] if p["name"] == name), None)
    return f"{name} [emulated]" if label == "emulated" else name


def _plots(r: dict[str, Any], drift: dict[str, np.ndarray] | None) -> str:
    try:
        figs = [
            ("map", plots.map_plot(r), "mAP@R per pair, with the paragon and the torch edge->edge mAP@R",
             "mAP@R of each scored pair (edge queries, cloud gallery). Green: every gate passed; red: a gate failed. "
             "Solid line: the paragon (cloud->cloud); dashed: torch edge->edge (the compatibility criterion)."),
            ("drift", plots.drift_plot({_emulated_name(r, k): v for k, v in drift.items()}) if drift else None,
             "histogram of 1 - cosine to the torch edge embedding per pair",
             "Per-query drift of each pair's embedding from the torch edge model's, as 1 - cosine on a log axis."),
            ("latency", plots.latency_plot(r), "latency p50 against mAP@R per pair",
             "Latency p50 against mAP@R; triangles are emulated latencies."),
        ]
    except MissingDependencyError as e:  # the page is still useful without its figures
        return f'<p class="note">Plots omitted: {_e(e)}</p>'
    out = []
    for key, png, alt, caption in figs:
        if png is None:
            if key == "drift":
                out.append('<p class="note">No per-query drift was given, so there is no drift histogram.</p>')
            continue
        out.append(f'<figure class="plot" id="plot-{key}"><img src="{_data_uri(png)}" alt="{_e(alt)}">'
                   f"<figcaption>{_e(caption)}</figcaption></figure>")
    return "".join(out)


def _examples(r: dict[str, Any], thumbs: _Thumbs) -> str:
    ex = r.get("examples") or []
    if not ex:
        return '<p class="note">No flip examples.</p>'
    rows = []
    for x in ex:
        ql = x["query_label"]

        def top(idx: list[int], labels: list[int]) -> str:
            return '<div class="row">' + "".join(
                thumbs.cell("gallery", int(i), int(lab), "hit" if lab == ql else "miss")
                for i, lab in zip(idx, labels)) + "</div>"

        rows.append(f'<tr><td class="l">{_e(x["pair"])}<br><small>{_e(x["kind"])}</small></td>'
                    f'<td>{thumbs.cell("queries", int(x["query"]), int(ql), "query")}</td>'
                    f'<td>{top(x["paragon_top5"], x["paragon_top5_labels"])}</td>'
                    f'<td>{top(x["edge_top5"], x["edge_top5_labels"])}</td></tr>')
    return ('<p class="note">Each row: a query, then the paragon\'s (cloud->cloud) top 5 and the edge pair\'s top 5 in the '
            'cloud gallery. Green border: same class as the query; red: another class. The torch edge\'s rows are its flips '
            'against the paragon; an artifact\'s rows are its flips against the torch edge model (what the export '
            'changed).</p>'
            '<table class="examples"><tr><th class="l">pair</th><th class="l">query</th><th class="l">paragon top 5</th>'
            '<th class="l">edge top 5</th></tr>'
            + "".join(rows) + "</table>")


def _thresholds(r: dict[str, Any]) -> str:
    g = r.get("gates") or {}
    t = g.get("thresholds") or {}
    rows = [("all", k, v) for k, v in (t.get("all") or {}).items()]
    rows += [(f"precision {p}", k, v) for p, table in (t.get("precision") or {}).items() for k, v in table.items()]
    body = "".join(f'<tr><td class="l">{_e(s)}</td><td class="l">{_e(k)}</td><td>{_e(_gate_value(k, v))}</td></tr>'
                   for s, k, v in rows)
    return (f'<p class="prov">Gate thresholds from: {_e(g.get("source", "?"))}</p>'
            + (f'<table class="thresholds"><tr><th class="l">applies to</th><th class="l">gate</th><th>threshold</th></tr>'
               f"{body}</table>" if rows else ""))


def render_html(report: dict[str, Any], *, drift: dict[str, np.ndarray] | None = None,
                images: dict[str, Any] | None = None) -> str:
    """The report as one self-contained HTML page.

    ``drift``: per-query cosine to the torch edge embedding, by pair name (the drift histogram).
    ``images``: {"queries": uint8 [N,H,W,C], "gallery": uint8 [M,H,W,C], "classes": [...]} for the
    thumbnails of the flip examples; without it the examples show indices and class names only.
    """
    timings = report.get("timings_s") or {}
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(report.get('title', 'hetero verify'))}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(report.get('title', 'hetero verify'))}</h1>",
        _provenance(report),
        _verdict(report),
        "<h2>References</h2>", _references(report),
        "<h2>Pairs</h2>",
        '<p class="note">Labels: reference = the torch edge model the others are compared with; measured = run on '
        'the named runtime on this host; emulated = a stand-in for the target runtime, not the device itself.</p>',
        _pairs_table(report),
        "<h2>Gates</h2>", _gates_table(report),
        "<h2>Skipped and failed pairs</h2>", _not_run(report),
        "<h2>Plots</h2>", _plots(report, drift),
        "<h2>Flip examples</h2>", _examples(report, _Thumbs(images, report)),
        "<h2>Gate thresholds</h2>", _thresholds(report),
        f'<p class="note">{_e(report.get("schema", ""))}' + (f" · timings: {_e(timing)}" if timing else "") + "</p>",
        "</body></html>",
    ]
    return "\n".join(parts)

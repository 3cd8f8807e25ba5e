"""Figures of the `hetero verify` report, each returned as PNG bytes for inlining as a data URI.

matplotlib (the ``report`` extra) is imported lazily, and only its object-oriented API is used:
no pyplot, so no global figure state and no GUI backend.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np

from hetero.errors import require

PASS_COLOR = "#2ca02c"  # bars/points of pairs whose gates all passed
FAIL_COLOR = "#d62728"  # ... and of pairs that failed a gate
PARAGON_COLOR = "#1f1f1f"
EDGE_COLOR = "#1f77b4"
DPI = 80  # ~640 px wide figures: readable, and ten pairs keep the HTML well under a megabyte
DRIFT_FLOOR = 1e-9  # 1 - cosine below this (float rounding) is drawn at the floor of the log axis


def _figure(width: float, height: float):
    require("matplotlib", "report")
    from matplotlib.figure import Figure  # optional: hetero[report]

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _plain_log_ticks(ax) -> None:
    """Log x axis labelled 0.1, 0.2, 0.5, 1, ...: latencies rarely span a decade, where the default
    labels every minor tick in 10^x notation and they overlap."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # optional: hetero[report]

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _tick_name(pair: dict[str, Any]) -> str:
    return f"{pair['name']} [emulated]" if pair.get("label") == "emulated" else pair["name"]


def map_plot(report: dict[str, Any]) -> bytes | None:
    """mAP@R per scored pair against the paragon (cloud->cloud) and the torch edge->edge line.

    The compatibility criterion asks each bar to end right of the dashed line; the gap to the paragon
    is the distance to the solid one. None when no pair was scored.
    """
    pairs = [p for p in report["pairs"] if p["status"] == "ok" and p.get("metrics")]
    if not pairs:
        return None
    from matplotlib.lines import Line2D  # optional: hetero[report]
    from matplotlib.patches import Patch  # optional: hetero[report]

    values = np.array([p["metrics"]["map_at_r"] for p in pairs], dtype=float)
    paragon = report["paragon"]["map_at_r"]
    e2e = report["edge_to_edge"]["map_at_r"]
    fig = _figure(8.0, 1.6 + 0.38 * len(pairs))
    ax = fig.add_subplot()
    y = np.arange(len(pairs))[::-1]  # first pair on top
    colors = [PASS_COLOR if p.get("passed") else FAIL_COLOR for p in pairs]
    ax.barh(y, values, color=colors, height=0.65)
    ax.set_yticks(y, [_tick_name(p) for p in pairs])
    # the differences that matter are a few hundredths: start the axis near the smallest value
    lo = min(values.min(), paragon, e2e)
    hi = max(values.max(), paragon, e2e)
    span = max(hi - lo, 0.01)
    ax.set_xlim(max(0.0, lo - 0.5 * span), hi + 0.35 * span)
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:.4f}", va="center", ha="left", fontsize=8)
    ax.axvline(paragon, color=PARAGON_COLOR, lw=1.5)
    ax.axvline(e2e, color=EDGE_COLOR, lw=1.5, ls="--")
    ax.set_xlabel("mAP@R, edge queries -> cloud gallery (axis does not start at 0)")
    ax.legend(handles=[Patch(color=PASS_COLOR, label="all gates passed"), Patch(color=FAIL_COLOR, label="a gate failed"),
                       Line2D([], [], color=PARAGON_COLOR, lw=1.5, label=f"paragon cloud->cloud {paragon:.4f}"),
                       Line2D([], [], color=EDGE_COLOR, lw=1.5, ls="--", label=f"torch edge->edge {e2e:.4f}")],
              loc="lower left", bbox_to_anchor=(0, 1.0), ncols=2, fontsize=8, frameon=False)
    return _png(fig)


def drift_plot(drift: dict[str, np.ndarray]) -> bytes | None:
    """Per-query drift of each pair's embeddings from the torch edge model's, as 1 - cosine.

    Cosines sit within 1e-7..1e-2 of 1, so the distance from 1 is plotted on a log axis. None when
    ``drift`` is empty.
    """
    if not drift:
        return None
    dist = {name: np.clip(1.0 - np.asarray(c, dtype=np.float64).ravel(), DRIFT_FLOOR, None) for name, c in drift.items()}
    lo = min((float(d.min()) for d in dist.values() if d.size), default=DRIFT_FLOOR)
    hi = max(max((float(d.max()) for d in dist.values() if d.size), default=lo), lo * 10)
    bins = np.logspace(np.log10(lo) - 0.05, np.log10(hi) + 0.05, 50)
    fig = _figure(9.5, 3.6)
    ax = fig.add_subplot()
    for name, d in dist.items():
        ax.hist(d, bins=bins, histtype="step", lw=1.5, label=f"{name} (n={d.size})")
    ax.set_xscale("log")
    ax.set_xlabel(f"1 - cosine(pair embedding, torch edge embedding) per query (log; clipped at {DRIFT_FLOOR:g})")
    ax.set_ylabel("queries")
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the steps fill the axes
    return _png(fig)


def latency_plot(report: dict[str, Any]) -> bytes | None:
    """Latency p50 against mAP@R, one labelled point per scored pair that has a latency; None if none has."""
    pairs = [p for p in report["pairs"] if p["status"] == "ok" and p.get("metrics") and p.get("latency")]
    if not pairs:
        return None
    from matplotlib.lines import Line2D  # optional: hetero[report]

    batches = {p["latency"].get("batch") for p in pairs}
    fig = _figure(8.0, 3.8)
    ax = fig.add_subplot()
    for p in pairs:
        lat = p["latency"]
        x, yv = lat["p50_ms"], p["metrics"]["map_at_r"]
        emulated = lat.get("label") == "emulated" or p.get("label") == "emulated"
        ax.scatter([x], [yv], s=40, color=PASS_COLOR if p.get("passed") else FAIL_COLOR,
                   marker="^" if emulated else "o", zorder=3)
        note = [] if len(batches) == 1 else [f"batch {lat.get('batch')}"]
        note += ["latency emulated"] if lat.get("label") == "emulated" else []
        ax.annotate(_tick_name(p) + (f" ({', '.join(note)})" if note else ""),
                    (x, yv), xytext=(5, 4), textcoords="offset points", fontsize=8)
    ax.axhline(report["edge_to_edge"]["map_at_r"], color=EDGE_COLOR, lw=1, ls="--")
    _plain_log_ticks(ax)
    batch = f"batch {next(iter(batches))}" if len(batches) == 1 else "batch per point"
    ax.set_xlabel(f"latency p50, ms per call (log; {batch})")
    ax.set_ylabel("mAP@R, edge -> cloud")
    ax.margins(x=0.3, y=0.2)
    ax.legend(handles=[Line2D([], [], ls="", marker="o", color="grey", label="measured"),
                       Line2D([], [], ls="", marker="^", color="grey", label="emulated"),
                       Line2D([], [], color=EDGE_COLOR, lw=1, ls="--", label="torch edge->edge mAP@R")],
              fontsize=8, frameon=False, loc="best")
    return _png(fig)

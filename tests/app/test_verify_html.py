"""The HTML page of `hetero verify` on a synthetic report: tables, values, labels, escaping, every image
an inline PNG, no URL; and, in headless chromium, that it renders with no network request."""
from __future__ import annotations

import base64
import copy
import io
import json
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from hetero.errors import HeteroError
from hetero.app.verify import plots
from hetero.app.verify.html import render_html

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt & tie", "Sneaker", "Bag", "Ankle boot"]
SKIP_REASON = "tensorrt is not installed <b>bold</b>; install it with: pip install 'hetero[tensorrt]'"


def _metrics(map_at_r, overlap_torch, neg, drift_min, criterion=True):
    return {"map_at_r": map_at_r, "recall_at_1": 0.871, "recall_at_10": 0.9737, "gap_to_paragon": round(0.8524 - map_at_r, 6),
            "criterion_met": criterion, "top10_overlap_torch": overlap_torch, "top10_overlap_paragon": 0.71,
            "flips_vs_paragon": {"negative": neg, "positive": 0.0369}, "flips_vs_torch": {"negative": 0.002, "positive": 0.0018},
            "drift": {"min": drift_min, "p01": 0.999995, "mean": 0.9999997}}


def _pair(name, fmt, precision, runner, label, status, metrics=None, gates=(), latency=None, reason=None):
    passed = None if status == "skipped" else (status == "ok" and all(g["passed"] for g in gates))
    return {"name": name, "export_format": fmt, "format": fmt.split("-")[0], "precision": precision, "artifact": f"edge.{precision}",
            "runner": runner, "runtime": f"{runner} 1.0", "label": label, "status": status, "reason": reason,
            "metrics": metrics, "latency": latency, "gates": list(gates), "passed": passed}


def make_report(*, approximate=False, latency=True):
    g = lambda gate, threshold, value, passed: {"gate": gate, "threshold": threshold, "value": value, "passed": passed}
    lat = (lambda ms, label="measured": {"p50_ms": ms, "batch": 1, "threads": 1, "label": label}) if latency else (lambda *a: None)
    pairs = [
        _pair("torch @ torch", "torch-fp32", "fp32", "torch", "reference", "ok", _metrics(0.8201, 1.0, 0.075, 1.0),
              [g("compatibility_criterion", True, True, True), g("max_gap_to_paragon", 0.05, 0.0323, True)], lat(1.9)),
        _pair("onnx-fp16 @ onnxruntime", "onnx-fp16", "fp16", "onnxruntime", "measured", "ok", _metrics(0.8165, 0.9938, 0.0789, 0.99999),
              [g("max_negative_flip_rate", 0.10, 0.0789, True), g("min_drift_cosine", 0.999, 0.99999, True),
               g("min_top10_overlap", 0.98, 0.9938, True)], lat(0.21)),
        _pair("coreml-int8 @ coreml-emulated", "coreml-int8", "int8", "coreml", "emulated", "ok", _metrics(0.7902, 0.9123, 0.0911, 0.98765),
              [g("min_drift_cosine", 0.99, 0.98765, False), g("min_top10_overlap", 0.95, 0.9123, False)], lat(0.9, "emulated")),
        _pair("tensorrt-fp16 @ tensorrt", "tensorrt-fp16", "fp16", "tensorrt", "measured", "skipped", reason=SKIP_REASON),
        _pair("onnx-int8 @ onnxruntime", "onnx-int8", "int8", "onnxruntime", "measured", "failed",
              reason="RuntimeError: ConvInteger(10) is not implemented"),
    ]
    search = ({"index": "hnsw", "label": "approximate", "recall_at_10_vs_exact": 0.987, "params": {"M": 32, "efSearch": 128}}
              if approximate else {"index": "exact", "label": "exact", "recall_at_10_vs_exact": None, "params": {}})
    return {
        "schema": "hetero-verify/1", "title": "hetero verify: runs/demo/export against runs/demo/cloud",
        "manifest": "runs/demo/export", "cloud": "runs/demo/cloud", "edge": "runs/demo/edge", "space": "6a49a732" * 8,
        "queries": "fashion-mnist/test (20)", "gallery": "fashion-mnist/train (50), embedded by the cloud model",
        "host": {"processor": "Intel(R) Xeon(R) Processor", "cpu_count": 2, "system": "Linux", "machine": "x86_64",
                 "python": "3.11.7", "torch": "2.14.1", "date": "2026-11-26"},
        "search": search,
        "paragon": {"map_at_r": 0.8524, "recall_at_1": 0.913, "recall_at_10": 0.9819},
        "edge_to_edge": {"map_at_r": 0.7816, "recall_at_1": 0.88, "recall_at_10": 0.97},
        "pairs": pairs,
        "gates": {"source": "gates/release.toml", "thresholds": {"all": {"compatibility_criterion": True, "max_gap_to_paragon": 0.05},
                                                                 "precision": {"int8": {"min_drift_cosine": 0.99}}}},
        "verdict": {"passed": False, "exit_code": 1, "failed": ["coreml-int8 @ coreml-emulated: min_drift_cosine",
                                                               "coreml-int8 @ coreml-emulated: min_top10_overlap"],
                    "skipped": 1, "ran": 4},
        "examples": [
            {"pair": "coreml-int8 @ coreml-emulated", "kind": "negative flip", "query": 3, "query_label": 4,
             "paragon_top5": [10, 11, 12, 13, 14], "paragon_top5_labels": [4, 4, 2, 4, 4],
             "edge_top5": [20, 21, 22, 23, 24], "edge_top5_labels": [2, 4, 6, 4, 1]},
            {"pair": "onnx-fp16 @ onnxruntime", "kind": "positive flip", "query": 7, "query_label": 6,
             "paragon_top5": [30, 31, 32, 33, 34], "paragon_top5_labels": [0, 6, 6, 2, 6],
             "edge_top5": [10, 31, 32, 40, 41], "edge_top5_labels": [6, 6, 6, 0, 6]},
        ],
        "timings_s": {"load": 0.3, "embed": 12.0, "score": 20.0, "total": 35.0},
    }


def make_drift(seed=0):
    rng = np.random.default_rng(seed)
    return {"torch @ torch": np.ones(20, np.float32),  # 1 - cosine = 0: drawn at the clip floor
            "onnx-fp16 @ onnxruntime": 1 - 10 ** rng.uniform(-7, -5, 20),
            "coreml-int8 @ coreml-emulated": 1 - 10 ** rng.uniform(-4, -2, 20)}


def make_images(seed=0, channels=1):
    rng = np.random.default_rng(seed)
    return {"queries": rng.integers(0, 256, (20, 28, 28, channels), dtype=np.uint8),
            "gallery": rng.integers(0, 256, (50, 28, 28, channels), dtype=np.uint8), "classes": CLASSES}


class Page(HTMLParser):
    """Tables (class -> rows of (tr class, [td text])), images (attrs) and figure classes of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[tuple[str, list[str]]]] = {}
        self.imgs: list[dict[str, str]] = []
        self.thumbs: list[tuple[str, str]] = []  # (figure class, caption)
        self._table = self._cell = self._fig = None
        self._caption: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("class", "")
            self.tables.setdefault(self._table, [])
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append((a.get("class", ""), []))
        elif tag == "td" and self._table is not None:  # header cells are left out
            self._cell = []
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "figure" and "th" in a.get("class", "").split():
            self._fig = a["class"]
        elif tag == "figcaption" and self._fig:
            self._caption = []

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag == "td" and self._cell is not None and self._table is not None:
            self.tables[self._table][-1][1].append(" ".join(" ".join(self._cell).split()))
            self._cell = None
        elif tag == "figcaption" and self._caption is not None:
            self.thumbs.append((self._fig, "".join(self._caption)))
            self._caption = self._fig = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._caption is not None:
            self._caption.append(data)


def rows(page: Page, table: str) -> dict[str, tuple[str, list[str]]]:
    return {cells[0]: (cls, cells) for cls, cells in page.tables[table] if cells}


@pytest.fixture(scope="module")
def page_text():
    return render_html(make_report(approximate=True), drift=make_drift(), images=make_images())


def test_pairs_table_values_and_labels(page_text):
    page = Page(page_text)
    pairs = {k.split(" ")[0] + " @ " + k.split(" @ ")[1].split(" ")[0]: v for k, v in rows(page, "pairs").items()}
    assert len(pairs) == 5
    _, fp16 = pairs["onnx-fp16 @ onnxruntime"]
    # name+runtime, label, status, mAP@R, R@1, R@10, gap, criterion, overlap torch/paragon, flips, drift, latency
    assert fp16[1:8] == ["measured", "ok", "0.8165", "0.8710", "0.9737", "0.0359", "met"]
    assert fp16[8:14] == ["99.38%", "71.00%", "7.89%", "3.69%", "0.20%", "0.18%"]
    assert fp16[14:17] == ["0.9999900", "0.9999950", "0.9999997"]
    assert fp16[17].startswith("0.210 ms")
    cls, emu = pairs["coreml-int8 @ coreml-emulated"]
    assert cls == "fail" and emu[1] == "emulated" and emu[17].endswith("emulated")  # emulated latency tagged too
    assert '<span class="tag emulated">emulated</span>' in page_text
    assert pairs["torch @ torch"][1][1] == "reference"
    assert pairs["tensorrt-fp16 @ tensorrt"][1][2:4] == ["skipped", "–"]
    assert pairs["onnx-int8 @ onnxruntime"][0] == "fail"  # a failed run is a failed pair


def test_gates_verdict_provenance(page_text):
    page = Page(page_text)
    gates = [(cls, cells) for cls, cells in page.tables["gates"] if cells]
    assert len(gates) == 7
    failed = [(c[0], c[1]) for cls, c in gates if cls == "fail"]
    assert failed == [("coreml-int8 @ coreml-emulated emulated", "min_drift_cosine"),
                      ("coreml-int8 @ coreml-emulated emulated", "min_top10_overlap")]
    assert all(c[4] == "FAIL" for cls, c in gates if cls == "fail") and all(c[4] == "pass" for cls, c in gates if cls != "fail")
    by_gate = {(c[0].removesuffix(" emulated"), c[1]): c[2:4] for _, c in gates}
    assert by_gate[("coreml-int8 @ coreml-emulated", "min_drift_cosine")] == ["0.9900000", "0.9876500"]
    assert by_gate[("coreml-int8 @ coreml-emulated", "min_top10_overlap")] == ["95.00%", "91.23%"]
    assert by_gate[("torch @ torch", "compatibility_criterion")] == ["true", "true"]
    assert by_gate[("torch @ torch", "max_gap_to_paragon")] == ["0.0500", "0.0323"]
    assert re.search(r'class="verdict fail"><span class="big">FAIL</span>exit code 1', page_text)
    assert "<li>coreml-int8 @ coreml-emulated: min_top10_overlap</li>" in page_text
    assert "Intel(R) Xeon(R) Processor, 2 CPUs" in page_text and "torch 2.14.1; 2026-11-26" in page_text
    assert "approximate (hnsw, M=32, efSearch=128; recall@10 vs exact 0.9870)" in page_text
    assert "Gate thresholds from: gates/release.toml" in page_text
    assert [c for _, c in page.tables["thresholds"] if c] == [
        ["all", "compatibility_criterion", "true"], ["all", "max_gap_to_paragon", "0.0500"],
        ["precision int8", "min_drift_cosine", "0.9900000"]]
    notrun = rows(page, "notrun")
    assert set(notrun) == {"tensorrt-fp16 @ tensorrt", "onnx-int8 @ onnxruntime"}
    assert notrun["onnx-int8 @ onnxruntime"][1][3] == "RuntimeError: ConvInteger(10) is not implemented"
    exact = render_html(make_report())
    assert "Search index: exact." in exact and "approximate" not in exact


def test_passing_verdict_banner():
    r = make_report()
    r["verdict"] = {"passed": True, "exit_code": 0, "failed": [], "skipped": 1, "ran": 4}
    text = render_html(r)
    assert '<div class="verdict pass"><span class="big">PASS</span>exit code 0' in text and "Failed gates" not in text


def test_text_is_escaped(page_text):
    assert "<b>bold</b>" not in page_text and "&lt;b&gt;bold&lt;/b&gt;" in page_text
    assert "Shirt &amp; tie" in page_text and "Shirt & tie" not in page_text
    r = make_report()
    r["title"] = 'x"><script>alert(1)</script>'
    r["pairs"][1]["name"] = "<i>evil</i>"
    text = render_html(r)
    assert "<script" not in text and "<i>evil</i>" not in text and "&lt;i&gt;evil&lt;/i&gt;" in text


def test_self_contained(page_text):
    page = Page(page_text)
    assert len(page.imgs) == 3 + 2 * 11  # 3 plots; per example a query and 2 x 5 results
    for img in page.imgs:
        assert img["src"].startswith("data:image/png;base64,") and img.get("alt")
        Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))).verify()
    low = page_text.lower()
    for banned in ("http://", "https://", "<script", "<link", "@import", "url(", "@font-face", "//fonts"):
        assert banned not in low, banned
    assert {i["alt"] for i in page.imgs[:3]} >= {"mAP@R per pair, with the paragon and the torch edge->edge mAP@R"}


def test_thumbnails_borders_and_pixels(page_text):
    page = Page(page_text)
    images = make_images()
    r = make_report()
    expect = []
    for ex in r["examples"]:
        expect.append(("th query", CLASSES[ex["query_label"]]))
        for lab in ex["paragon_top5_labels"] + ex["edge_top5_labels"]:
            expect.append(("th hit" if lab == ex["query_label"] else "th miss", CLASSES[lab]))
    assert page.thumbs == expect
    thumbs = [i for i in page.imgs if i["alt"].startswith(("query ", "gallery "))]
    assert thumbs[0]["alt"] == "query 3: Coat" and thumbs[1]["alt"] == "gallery 10: Coat"
    q = np.asarray(Image.open(io.BytesIO(base64.b64decode(thumbs[0]["src"].split(",", 1)[1]))))
    assert q.shape == (56, 56)  # 28 px upscaled x2, nearest: every source pixel a 2x2 block
    np.testing.assert_array_equal(q, np.repeat(np.repeat(images["queries"][3, ..., 0], 2, 0), 2, 1))
    rgb = make_images(channels=3)
    text = render_html(r, images=rgb)
    q3 = Page(text).imgs[2]  # after the two plots that have data (no drift given)
    assert q3["alt"] == "query 3: Coat"
    assert np.asarray(Image.open(io.BytesIO(base64.b64decode(q3["src"].split(",", 1)[1])))).shape == (56, 56, 3)


def test_without_images_shows_indices_and_names():
    text = render_html(make_report())
    page = Page(text)
    assert len(page.imgs) == 2  # the mAP and latency plots; no drift given, no thumbnails
    assert "No per-query drift was given" in text
    captions = [c for _, c in page.thumbs]
    assert captions[:3] == ["#34", "#104", "#114"] and len(captions) == 22  # "#index" + label number, no class list


def test_bad_images_are_one_line_errors():
    images = make_images()
    images["gallery"] = images["gallery"][:12]
    with pytest.raises(HeteroError, match="gallery image 12 but only 12 gallery images"):
        render_html(make_report(), images=images)
    images = make_images()
    images["queries"] = images["queries"].astype(np.float32)
    with pytest.raises(HeteroError, match="uint8"):
        render_html(make_report(), images=images)


def test_latency_plot_absent_without_latency():
    r = make_report(latency=False)
    assert plots.latency_plot(r) is None
    text = render_html(r, drift=make_drift())
    assert 'id="plot-map"' in text and 'id="plot-drift"' in text and 'id="plot-latency"' not in text
    assert 'id="plot-latency"' in render_html(make_report())


def _colour_pixels(png: bytes | np.ndarray, hex_colour: str, tol: int = 4) -> int:
    a = png if isinstance(png, np.ndarray) else np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
    return int((np.abs(a.astype(np.int16) - rgb).max(-1) <= tol).sum())


def test_map_plot_colours_bars_by_gates():
    r = make_report()
    png = plots.map_plot(r)
    assert png.startswith(b"\x89PNG")
    fails = _colour_pixels(png, plots.FAIL_COLOR)
    r["pairs"][2]["passed"] = True
    assert _colour_pixels(plots.map_plot(r), plots.FAIL_COLOR) < fails - 500  # one bar fewer in red
    r["pairs"] = [p for p in r["pairs"] if p["status"] != "ok"]
    assert plots.map_plot(r) is None


def test_drift_plot_handles_exact_and_overshooting_cosines():
    png = plots.drift_plot({"a": np.array([1.0, 1.0000001, 0.9999]), "b": np.ones(4)})
    Image.open(io.BytesIO(png)).verify()
    assert plots.drift_plot({}) is None


def test_missing_matplotlib_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(HeteroError, match=r"matplotlib is not installed.*pip install 'hetero\[report\]'"):
        plots.map_plot(make_report())
    text = render_html(make_report(), drift=make_drift())
    assert "Plots omitted: matplotlib is not installed" in text and "data:image/png" not in text


def test_ten_pairs_stay_small():
    r = make_report()
    base = r["pairs"][1]
    r["pairs"] = [dict(copy.deepcopy(base), name=f"pair-{i} @ onnxruntime") for i in range(10)]
    drift = {p["name"]: 1 - 10 ** np.random.default_rng(i).uniform(-7, -3, 10_000) for i, p in enumerate(r["pairs"])}
    text = render_html(r, drift=drift, images=make_images())
    assert len(text.encode()) < 1_500_000


# --- headless chromium -------------------------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--no-default-browser-check",
    "--disable-extensions", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--metrics-recording-only", "--no-pings", "--allow-browser-signin=false",
    "--disable-features=Translate,OptimizationHints,MediaRouter,NetworkTimeServiceQuerying",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # nothing reaches the network even if something asks
]


def _chromium(tmp_path, html_path, tag, *extra):
    exe = shutil.which("chromium")
    shot, netlog = tmp_path / f"{tag}.png", tmp_path / f"{tag}.netlog.json"
    proc = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / ('profile-' + tag)}", "--window-size=1280,4000",
                           f"--screenshot={shot}", f"--log-net-log={netlog}", "--dump-dom", *extra, html_path.as_uri()],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, shot, json.loads(netlog.read_text())


def _page_requests(netlog: dict) -> list[str]:
    """URLs the page asked for over the network.

    file:// and data: loads never enter the net log. Chromium still makes a few requests of its own
    (account list, search prefetch) that no flag of this build turns off; the net log marks those with
    initiator "not an origin", whereas every request a file:// page issues carries its opaque origin
    ("null"), so those are the ones that must not exist.
    """
    types = {v: k for k, v in netlog["constants"]["logEventTypes"].items()}
    out = []
    for e in netlog["events"]:
        p = e.get("params") or {}
        if types.get(e["type"]) == "URL_REQUEST_START_JOB" and "url" in p and p.get("initiator") != "not an origin":
            out.append(p.get("url", "?"))
    return out


_PROBE = ("<script>addEventListener('load',()=>{const i=[...document.images];document.body.dataset.imgs=i.length;"
          "document.body.dataset.decoded=i.filter(x=>x.complete&&x.naturalWidth>0).length})</script></body>")


@pytest.mark.browser
def test_renders_offline_in_chromium(tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    t0 = time.monotonic()
    text = render_html(make_report(approximate=True), drift=make_drift(), images=make_images(channels=3))
    n_img = len(Page(text).imgs)
    page = tmp_path / "report.html"
    page.write_text(text, encoding="utf-8")
    dom, shot, netlog = _chromium(tmp_path, page, "page")
    assert _page_requests(netlog) == []
    assert 'class="pairs"' in dom and 'class="gates"' in dom and 'class="examples"' in dom
    assert dom.count("<img") == n_img

    a = np.asarray(Image.open(shot).convert("RGB"))
    assert a.shape[:2] == (4000, 1280)
    packed = (a[..., 0].astype(np.int32) << 16) | (a[..., 1].astype(np.int32) << 8) | a[..., 2]
    assert len(np.unique(packed)) > 1000  # text, plots and thumbnails, not a blank page
    assert _colour_pixels(a, plots.PASS_COLOR) > 2000  # the mAP bars of passing pairs
    assert _colour_pixels(a, plots.FAIL_COLOR) > 1000  # ... and of the emulated pair that failed
    assert _colour_pixels(a, "#8e0000") > 5000  # the FAIL banner

    # The page has no script, so whether its images decoded is asked of a copy with a probe appended.
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", _PROBE), encoding="utf-8")
    dom, _, _ = _chromium(tmp_path, probe, "probe")
    assert f'data-imgs="{n_img}"' in dom and f'data-decoded="{n_img}"' in dom, re.findall(r"<body[^>]*>", dom)

    # The net-log check can fail: a page that fetches a stylesheet and an image is caught.
    bad = tmp_path / "bad.html"
    bad.write_text(text.replace("</body>", '<img src="http://127.0.0.1:9/x.png" alt="">'
                                           '<link rel="stylesheet" href="https://example.invalid/a.css"></body>'))
    _, _, netlog = _chromium(tmp_path, bad, "bad")
    assert sorted(_page_requests(netlog)) == ["http://127.0.0.1:9/x.png", "https://example.invalid/a.css"]
    assert time.monotonic() - t0 < 30

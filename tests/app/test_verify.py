"""`hetero verify` end to end on tiny models and synthetic data: pairs, metrics against brute force,
gates and exit codes (a control fails with 1), bad input (2, one line, nothing written), a runner
that fails on one artifact while the others run."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from clitest import PERMISSIVE_GATES, one_line_error, run
from hetero.app.cli import main
from hetero.errors import HeteroError
from hetero.app.verify.gates import DEFAULTS, load_gates, parse_gates, thresholds_for
from hetero.app.verify.score import Scorer
from hetero.compare import topk_overlap




@pytest.fixture(scope="module")
def bundle(saved, tmp_path_factory):
    """The tiny cloud and edge (conftest), exported to ONNX FP32/FP16, ORT and Core ML FP16."""
    from export import export_checkpoint
    from hetero.checkpoint import load_checkpoint

    root = tmp_path_factory.mktemp("verify")
    export_checkpoint(load_checkpoint(saved / "edge"), root / "export", name="edge",
                      formats=("onnx", "onnx-fp16", "ort", "coreml-fp16"))
    (root / "gates.toml").write_text(PERMISSIVE_GATES)
    return root


@pytest.fixture(scope="module")
def verified(bundle, saved, tmp_path_factory):
    out = tmp_path_factory.mktemp("v") / "report"
    code = main(["verify", "--manifest", str(bundle / "export"), "--cloud", str(saved / "cloud"), "--edge",
                 str(saved / "edge"), "--data", "synthetic", "--gates", str(bundle / "gates.toml"), "--out", str(out),
                 "--quiet"])
    return code, out, json.loads((out / "report.json").read_text())


def test_every_artifact_on_every_runner_here(verified):
    code, out, rep = verified
    assert code == 0 and rep["verdict"]["passed"] and rep["verdict"]["exit_code"] == 0
    pairs = {r["name"]: r for r in rep["pairs"]}
    ran = {n for n, r in pairs.items() if r["status"] == "ok"}
    assert ran == {"torch @ torch", "onnx @ onnxruntime", "onnx-fp16 @ onnxruntime", "ort @ onnxruntime",
                   "coreml-fp16 @ coreml-interp"}
    assert pairs["coreml-fp16 @ coreml-interp"]["label"] == "emulated"
    assert pairs["onnx @ onnxruntime"]["label"] == "measured" and pairs["torch @ torch"]["label"] == "reference"
    mac = pairs["coreml-fp16 @ coreml"]
    assert mac["status"] == "skipped" and "macOS" in mac["reason"]
    for name in ran:
        r = pairs[name]
        assert r["passed"] and r["gates"] and all(g["passed"] for g in r["gates"])
        assert r["latency"] is None or r["latency"]["p50_ms"] > 0
    fp32 = pairs["onnx @ onnxruntime"]["metrics"]
    assert fp32["drift"]["min"] >= 0.99999 and fp32["top10_overlap_torch"] >= 0.99
    assert {g["gate"] for g in pairs["onnx-fp16 @ onnxruntime"]["gates"]} >= {"min_drift_cosine", "min_top10_overlap"}
    gate = next(g for g in pairs["onnx-fp16 @ onnxruntime"]["gates"] if g["gate"] == "min_drift_cosine")
    assert gate["threshold"] == 0.99  # the gates file overrode the FP16 default (0.999)
    for f in ("report.json", "report.md", "report.html"):
        assert (out / f).is_file()
    md = (out / "report.md").read_text()
    assert "Verdict: PASS" in md and "| onnx-fp16 @ onnxruntime | measured |" in md and "**emulated**" in md
    assert "<table" in (out / "report.html").read_text()


def test_metrics_match_a_brute_force_reference(verified, saved):
    """The torch pair's numbers, recomputed here with plain numpy from the same models and data."""
    from hetero.checkpoint import load_checkpoint
    from hetero.data import load_dataset
    from hetero.embed import embed_images

    _, _, rep = verified
    cloud, edge = load_checkpoint(saved / "cloud"), load_checkpoint(saved / "edge")
    q_set, g_set = load_dataset("synthetic", "test"), load_dataset("synthetic", "train")
    prep = cloud.preprocess
    gc = embed_images(cloud.model, g_set, prep, progress=False).astype(np.float64)
    qc = embed_images(cloud.model, q_set, prep, progress=False).astype(np.float64)
    qe = embed_images(edge.model, q_set, prep, progress=False).astype(np.float64)
    ql, gl = q_set.labels, g_set.labels

    def brute(q):
        order = np.argsort(-(q @ gc.T), axis=1, kind="stable")
        rel = gl[order] == ql[:, None]
        aps = []
        for i in range(len(q)):
            r = int((gl == ql[i]).sum())
            hits = rel[i, :r]
            aps.append((np.cumsum(hits) / np.arange(1, r + 1) * hits).sum() / r)
        return float(np.mean(aps)), float(rel[:, 0].mean()), float(rel[:, :10].any(1).mean()), order[:, :10], rel[:, 0]

    p_map, _, _, p_top, p_ok = brute(qc)
    e_map, e_r1, e_r10, e_top, e_ok = brute(qe)
    m = next(r for r in rep["pairs"] if r["name"] == "torch @ torch")["metrics"]
    # the report ranks in float32 (faiss), the reference in float64: a near-tie may swap two neighbours,
    # so a count may differ by a query or two, and mAP@R by far less than a query's weight
    q = 2 / len(ql)
    assert rep["paragon"]["map_at_r"] == pytest.approx(p_map, abs=1e-3)
    assert m["map_at_r"] == pytest.approx(e_map, abs=1e-3)
    assert m["recall_at_1"] == pytest.approx(e_r1, abs=q) and m["recall_at_10"] == pytest.approx(e_r10, abs=q)
    assert m["gap_to_paragon"] == pytest.approx(p_map - e_map, abs=2e-3)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(e_top, p_top)])
    assert m["top10_overlap_paragon"] == pytest.approx(overlap, abs=q)
    assert m["flips_vs_paragon"]["negative"] == pytest.approx(float(np.mean(p_ok & ~e_ok)), abs=q)
    assert m["top10_overlap_torch"] == 1.0 and m["drift"]["min"] == pytest.approx(1.0)


def test_scorer_top_overlap_and_approximate_index():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((3000, 16)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    gl = rng.integers(0, 5, 3000)
    q = g[:200] + 0.05 * rng.standard_normal((200, 16)).astype(np.float32)
    ql = gl[:200]
    a = np.array([[1, 2, 3], [4, 5, 6]])
    assert topk_overlap(a, np.array([[3, 2, 9], [7, 8, 9]])) == pytest.approx(2 / 6)
    exact = Scorer(g, gl, ql, q)
    hnsw = Scorer(g, gl, ql, q, index="hnsw")
    assert exact.search_info["label"] == "exact" and exact.search_info["recall_at_10_vs_exact"] is None
    assert hnsw.search_info["label"] == "approximate" and 0.9 <= hnsw.search_info["recall_at_10_vs_exact"] <= 1.0
    assert hnsw.paragon_metrics == exact.paragon_metrics  # mAP@R stays exact
    ivf = Scorer(g, gl, ql, q, index="ivf")
    assert 0.5 <= ivf.search_info["recall_at_10_vs_exact"] <= 1.0


def test_control_fails_the_default_gates(saved, synth, tmp_path, capsys):
    """A model trained with no compatibility loss: exit 1, the criterion and the gap gates fail."""
    from export import export_checkpoint
    from hetero.checkpoint import load_checkpoint, save_checkpoint
    from hetero.train import TrainConfig, train_edge

    cloud = load_checkpoint(saved / "cloud")
    control = train_edge(TrainConfig(model="test_mobilenet", dim=16, epochs=3, batch_size=32, compat=False), cloud,
                         synth[0], progress=False)
    save_checkpoint(control, tmp_path / "control")
    export_checkpoint(load_checkpoint(tmp_path / "control"), tmp_path / "export", name="control")
    code, out, err = run(capsys, "verify", "--manifest", tmp_path / "export", "--cloud", saved / "cloud", "--edge",
                         tmp_path / "control", "--data", "synthetic", "--out", tmp_path / "rep", "--quiet", "--no-latency")
    assert code == 1, err
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert not rep["verdict"]["passed"] and rep["edge_role"] == "control"
    failed = {g["gate"] for r in rep["pairs"] for g in r["gates"] if not g["passed"]}
    assert {"compatibility_criterion", "max_gap_to_paragon"} <= failed
    assert "verdict: FAIL (exit 1)" in out


def _copy(bundle, tmp_path):
    dst = tmp_path / "export"
    shutil.copytree(bundle / "export", dst)
    return dst


def _manifest_edit(d, fn):
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def _bad_verify(capsys, saved, tmp_path, manifest, *extra, words=()):
    out = tmp_path / "rep"
    code, _, err = run(capsys, "verify", "--manifest", manifest, "--cloud", saved / "cloud", "--edge", saved / "edge",
                       "--data", "synthetic", "--out", out, "--quiet", "--no-latency", *extra)
    one_line_error(code, err, *words)
    assert not out.exists()  # nothing written


def test_bad_input_fingerprint_mismatch(bundle, saved, tmp_path, capsys):
    d = _copy(bundle, tmp_path)
    _manifest_edit(d, lambda m: m.update(space="ab" * 32))
    _bad_verify(capsys, saved, tmp_path, d, words=("cloud space abababababab",))


def test_bad_input_missing_artifact_and_hash_mismatch(bundle, saved, tmp_path, capsys):
    d = _copy(bundle, tmp_path)
    (d / "edge.fp16.onnx").unlink()
    _bad_verify(capsys, saved, tmp_path, d, words=("edge.fp16.onnx", "missing"))
    shutil.rmtree(d)
    d = _copy(bundle, tmp_path)
    with open(d / "edge.onnx", "ab") as f:
        f.write(b"\0")
    _bad_verify(capsys, saved, tmp_path, d, words=("edge.onnx", "sha256"))


@pytest.mark.parametrize("text, words", [
    ("[all]\nmax_gap = 0.1\n", ("unknown gate 'max_gap'",)),
    ("[all]\nmax_negative_flip_rate = 1.5\n", ("out of range",)),
    ("[precision.fp8]\nmin_drift_cosine = 0.9\n", ("unknown precision 'fp8'",)),
    ("[al]\n", ("unknown section 'al'",)),
    ("[all]\ncompatibility_criterion = 1\n", ("true or false",)),
    ("[all\n", ("not valid TOML",)),
])
def test_bad_input_gates_file(bundle, saved, tmp_path, capsys, text, words):
    (tmp_path / "g.toml").write_text(text)
    _bad_verify(capsys, saved, tmp_path, bundle / "export", "--gates", tmp_path / "g.toml", words=words)


def test_bad_input_dataset_classes_differ(bundle, saved, tmp_path, capsys):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(tmp_path / "data" / split / cls / f"{i}.png")
    _bad_verify(capsys, saved, tmp_path, bundle / "export", "--data", tmp_path / "data", words=("classes",))


def test_a_failing_runner_is_reported_and_the_others_run(bundle, saved, tmp_path, capsys):
    """edge.ort replaced by garbage whose sha256 the manifest then records: onnxruntime fails on it alone."""
    d = _copy(bundle, tmp_path)
    (d / "edge.ort").write_bytes(b"not a flatbuffer" * 10)
    digest = hashlib.sha256((d / "edge.ort").read_bytes()).hexdigest()
    _manifest_edit(d, lambda m: [a.update(sha256=digest) for a in m["artifacts"] if a.get("file") == "edge.ort"])
    code, out, err = run(capsys, "verify", "--manifest", d, "--cloud", saved / "cloud", "--edge", saved / "edge",
                         "--data", "synthetic", "--gates", bundle / "gates.toml", "--out", tmp_path / "rep", "--quiet",
                         "--no-latency", "--no-html", "--runtime", "onnxruntime")
    assert code == 1, err
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    pairs = {r["name"]: r for r in rep["pairs"]}
    assert pairs["ort @ onnxruntime"]["status"] == "failed" and pairs["ort @ onnxruntime"]["reason"]
    assert pairs["onnx @ onnxruntime"]["status"] == "ok" and pairs["onnx-fp16 @ onnxruntime"]["status"] == "ok"
    assert "coreml-fp16 @ coreml-interp" not in pairs  # --runtime onnxruntime only
    assert any("runner failed" in f for f in rep["verdict"]["failed"]) and not (tmp_path / "rep" / "report.html").exists()


def test_out_refuses_a_foreign_directory(bundle, saved, tmp_path, capsys):
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "precious.txt").write_text("keep")
    code, _, err = run(capsys, "verify", "--manifest", bundle / "export", "--cloud", saved / "cloud", "--edge",
                       saved / "edge", "--data", "synthetic", "--out", tmp_path / "rep", "--quiet")
    one_line_error(code, err, "files hetero did not write", "nothing was touched")
    assert (tmp_path / "rep" / "precious.txt").read_text() == "keep"


def test_gate_resolution():
    gates, source = load_gates(None)
    assert source == "defaults" and gates == parse_gates({})
    assert thresholds_for(gates, "fp32")["min_drift_cosine"] == 0.99999
    assert thresholds_for(gates, "fp16")["min_drift_cosine"] == 0.999
    assert thresholds_for(gates, "int8")["min_drift_cosine"] == 0.99
    assert thresholds_for(gates, "palette4")["min_top10_overlap"] == DEFAULTS["precision"]["int8"]["min_top10_overlap"]
    custom = parse_gates({"precision": {"palette4": {"min_top10_overlap": 0.4}}})
    assert thresholds_for(custom, "palette4")["min_top10_overlap"] == 0.4
    assert thresholds_for(custom, "int8-weights")["min_top10_overlap"] == 0.95
    assert "min_drift_cosine" not in thresholds_for(gates, "fp32", reference=True)


def test_readme_gates_block_is_the_defaults():
    """The README's gates example is exactly what verify uses without --gates."""
    import re
    import tomllib
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (block,) = re.findall(r"```toml\n(.*?)```", readme, flags=re.S)
    data = tomllib.loads(block)
    assert data == DEFAULTS and parse_gates(data) == parse_gates({})


def test_gates_that_check_nothing_are_found():
    """Every gate at (or beyond) the end of its metric's range cannot fail; the defaults check something."""
    from hetero.app.verify.gates import GATES, no_op_gates, no_op_note

    assert no_op_gates(parse_gates({})) == []
    idle = no_op_gates(parse_gates({"all": {"compatibility_criterion": False, "max_gap_to_paragon": 1,
                                            "max_negative_flip_rate": 0.99, "min_map_at_r": 0.0},
                                    "precision": {"fp16": {"min_drift_cosine": -1.0, "min_p01_drift_cosine": -0.99},
                                                  "int8": {"min_top10_overlap": 0}}}))
    assert [(g["where"], g["gate"]) for g in idle] == [
        ("all", "compatibility_criterion"), ("all", "max_gap_to_paragon"), ("all", "min_map_at_r"),
        ("precision.fp16", "min_drift_cosine"), ("precision.int8", "min_top10_overlap")]
    assert no_op_note(idle[0]) == "gate all.compatibility_criterion = false checks nothing (false turns the criterion " \
                                  "off); it cannot fail"
    assert "cosine is at least -1" in no_op_note(idle[3])
    # each no-op threshold indeed passes the worst value its metric can take
    worst = {"criterion_met": False, "gap_to_paragon": 1.0, "flips_vs_paragon": {"negative": 1.0},
             "flips_vs_torch": {"negative": 1.0}, "map_at_r": 0.0, "drift": {"min": -1.0, "p01": -1.0},
             "top10_overlap_torch": 0.0, "top10_overlap_paragon": 0.0}
    every = parse_gates({"all": {"compatibility_criterion": False, "max_gap_to_paragon": 1.0, "max_negative_flip_rate": 1.0,
                                 "max_negative_flip_rate_vs_torch": 1.0, "min_map_at_r": 0.0, "min_drift_cosine": -1.0,
                                 "min_p01_drift_cosine": -1.0, "min_top10_overlap": 0.0, "min_top10_overlap_paragon": 0.0}})
    assert {g["gate"] for g in no_op_gates(every) if g["where"] == "all"} == set(GATES)
    from hetero.app.verify.gates import check_gates

    assert all(g["passed"] for g in check_gates(worst, every["all"]))


def test_required_pairs_are_parsed_and_judged():
    from hetero.app.verify.run import _required_status, parse_required

    man = {"artifacts": [{"format": "onnx", "export_format": "onnx", "file": "edge.onnx"},
                         {"format": "coreml", "export_format": "coreml-fp16", "file": "edge.fp16.mlpackage"}]}
    assert parse_required(["onnx@onnxruntime, coreml-fp16 @ coreml", "onnx@onnxruntime"], man, None) == [
        "onnx @ onnxruntime", "coreml-fp16 @ coreml"]
    assert parse_required(None, man, None) == []
    for spec, words in (("onnx@nope", "unknown runner 'nope'; known runners: "), ("fp8@onnxruntime", "unknown format"),
                        ("onnx@torch", "unknown runner 'torch'"), ("onnx@", "FORMAT@RUNNER"),
                        ("coreml-fp16@onnxruntime", "runs onnx, ort artifacts, not coreml-fp16")):
        with pytest.raises(HeteroError, match=words):
            parse_required([spec], man, None)
    with pytest.raises(HeteroError, match="left out by --runtime onnxruntime"):
        parse_required(["coreml-fp16@coreml-interp"], man, ["onnxruntime"])
    rows = [{"name": "onnx @ onnxruntime", "status": "ok", "reason": None},
            {"name": "coreml-fp16 @ coreml", "status": "skipped", "reason": "needs macOS"},
            {"name": "ort @ onnxruntime", "status": "failed", "reason": "boom"}]
    status, failed = _required_status(["onnx @ onnxruntime", "coreml-fp16 @ coreml", "ort @ onnxruntime",
                                       "onnx-int8 @ onnxruntime"], rows)
    assert [s["status"] for s in status] == ["ran", "skipped", "failed", "absent"]
    # a failed runner already fails the verdict on its own line; skipped and absent get theirs
    assert failed == ["coreml-fp16 @ coreml: required, but skipped (needs macOS)",
                      "onnx-int8 @ onnxruntime: required, but the export has no onnx-int8 artifact"]


def test_the_report_says_where_each_precision_came_from(verified):
    _, _, rep = verified
    pairs = {r["name"]: r for r in rep["pairs"]}
    assert pairs["onnx-fp16 @ onnxruntime"]["precision_from"] == "read from the artifact (float16 weight tensors)"
    assert pairs["coreml-fp16 @ coreml-interp"]["precision_from"] == "read from the artifact (float16 constants)"
    assert pairs["ort @ onnxruntime"]["precision_from"].startswith("read from the artifact")
    assert "precision_from" not in pairs["torch @ torch"] and rep["verdict"]["required"] == []
    assert rep["gates"]["warnings"] and all("checks nothing" in w for w in rep["gates"]["warnings"])  # PERMISSIVE_GATES


def test_bad_input_relabelled_precision_and_other_preprocessing(bundle, saved, tmp_path, capsys):
    d = _copy(bundle, tmp_path)
    _manifest_edit(d, lambda m: [a.update(precision="int8") for a in m["artifacts"] if a["file"] == "edge.fp16.onnx"])
    _bad_verify(capsys, saved, tmp_path, d, words=("edge.fp16.onnx holds fp16 weights", "says precision int8"))
    shutil.rmtree(d)
    d = _copy(bundle, tmp_path)
    _manifest_edit(d, lambda m: m["preprocess"].update(mean=[0.5]))
    _bad_verify(capsys, saved, tmp_path, d, words=("preprocessing differs from its edge model's", "mean [0.5]"))


@pytest.mark.parametrize("flag", ["--query-limit", "--gallery-limit"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_bad_input_limits_below_one(bundle, saved, tmp_path, capsys, flag, value):
    _bad_verify(capsys, saved, tmp_path, bundle / "export", flag, value, words=(flag, ">= 1"))

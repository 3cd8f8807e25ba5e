"""Bad input, as a user types it: a manifest edited by hand (preprocessing, paths, hashes, precision,
removed artifacts), limits of zero, gates that check nothing and required pairs, given to
``hetero verify``, ``hetero evaluate``, ``hetero bench`` and the torch-free ``python -m devices``.

Each refusal is one ``error:`` line, exit 2, no traceback and every user file byte-identical
(:func:`badinput.fails_cleanly`). A required pair that was skipped is a gate failure (exit 1) with a
report; a gate that checks nothing is accepted, and flagged on the console and in the report.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from badinput import cli, copy_tree, edit_json, fails_cleanly, rehash
from clitest import PERMISSIVE_GATES


# every gate at a value that cannot fail: the verdict is PASS whatever a tiny model measures
NO_OP_GATES = """
[all]
compatibility_criterion = false
max_gap_to_paragon = 1.0
max_negative_flip_rate = 1.0
[precision.fp32]
min_drift_cosine = -1.0
min_top10_overlap = 0.0
[precision.fp16]
min_drift_cosine = -1
min_top10_overlap = 0
"""


def _verify(art, place, x, *extra):
    return cli("verify", "--manifest", x, "--cloud", art / "cloud", "--edge", art / "edge", "--data", "synthetic",
               "--out", place.path / "rep", "--quiet", "--no-latency", "--no-html", *extra)


def _run_images(art, place, x, *extra):
    """``python -m devices run`` on a folder of images: the manifest's preprocessing is applied."""
    return cli("run", x, "--input", art / "mixed" / "test" / "class0", "--out", place.path / "emb.npy", *extra,
               module="devices")


def _devices_bench(x, *extra):
    return cli("bench", x, "--iters", "2", "--warmup", "0", "--batch", "1", *extra, module="devices")


def _hetero_bench(x, *extra):
    return cli("bench", x, "--iters", "2", "--warmup", "0", "--batch", "1", "--quiet", *extra)


def _only_new(p, place_dir: Path) -> list[str]:
    """The watched paths a command changed, less its own new report under ``place_dir``."""
    return [k for k in p.changed if k != str(place_dir) and not k.startswith(str(place_dir) + "/")]


@pytest.fixture(scope="module")
def fp16x(art, tmp_path_factory):
    """An export of the handed-over edge with ONNX FP32 and FP16 (the shared one has ONNX + Core ML FP16)."""
    from export import export_checkpoint
    from hetero.checkpoint import load_checkpoint

    out = tmp_path_factory.mktemp("fp16-export") / "export"
    export_checkpoint(load_checkpoint(art / "edge"), out, name="edge", formats=("onnx", "onnx-fp16"))
    return out


# ------------------------------------------------------------------------------------ preprocessing

def _set_prep(**kw):
    return lambda m: m["preprocess"].update(kw)


@pytest.mark.parametrize("edit, words, command", [
    (_set_prep(std=[float("inf")]), ("preprocess.std", "not finite"), "run"),
    (_set_prep(std=[0.0]), ("preprocess.std", "positive"), "hetero-bench"),
    (_set_prep(mean=[float("nan")]), ("preprocess.mean", "not finite"), "devices-bench"),
    (_set_prep(size=100000), ("preprocess.size", "1..4096"), "run"),
    (_set_prep(size=32), ("does not match the input", "edge.onnx"), "run"),
    (_set_prep(channels=3, mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2]), ("does not match the input",), "devices-bench"),
    (_set_prep(mean="0.5"), ("preprocess.mean", "list"), "hetero-bench"),
], ids=["std-infinity", "std-zero", "mean-nan", "size-absurd", "size-not-the-inputs", "channels", "mean-string"])
def test_manifest_preprocessing_refused_where_the_manifest_is_loaded(art, tmp_path, place, edit, words, command):
    """``std: Infinity`` (valid JSON to Python) made every image the same zero input: every row alike."""
    x = copy_tree(art / "export", tmp_path / "x")
    edit_json(x / "manifest.json", edit)
    p = {"run": lambda: _run_images(art, place, x), "hetero-bench": lambda: _hetero_bench(x),
         "devices-bench": lambda: _devices_bench(x)}[command]()
    fails_cleanly(p, *words, "re-run `hetero export`")


@pytest.mark.parametrize("edit, words", [
    (_set_prep(mean=[0.5]), ("preprocessing differs from its edge model's", "mean [0.5] (model: [0.286])")),
    (_set_prep(std=[0.5]), ("preprocessing differs from its edge model's", "std [0.5]")),
    (lambda m: [m["preprocess"].update(size=32)] + [a["input"].update(shape=["batch", 1, 32, 32]) for a in m["artifacts"]],
     ("preprocessing differs from its edge model's", "size 32 (model: 28)")),
], ids=["mean", "std", "size-and-every-input"])
def test_verify_refuses_preprocessing_other_than_the_edge_models(art, tmp_path, place, edit, words):
    x = copy_tree(art / "export", tmp_path / "x")
    edit_json(x / "manifest.json", edit)
    fails_cleanly(_verify(art, place, x), *words)


def test_evaluate_refuses_an_artifact_with_other_preprocessing(art, tmp_path, place):
    x = copy_tree(art / "export", tmp_path / "x")
    edit_json(x / "manifest.json", _set_prep(mean=[0.1]))
    fails_cleanly(cli("evaluate", "--cloud", art / "cloud", "--edge", art / "edge", "--artifact", x, "--data", "synthetic",
                      "--out", place.path / "ev", "--quiet"), "preprocessing differs from its edge model's")


# ----------------------------------------------------------------------------------------- precision

def _relabel_onnx_fp16_as_int8(x: Path) -> None:
    """What a hand-editor would do to pass an FP16 model off as INT8 (looser gates): rename the file,
    edit the entry and the requested formats, and re-record the hash."""
    (x / "edge.fp16.onnx").rename(x / "edge.int8.onnx")

    def edit(m):
        for a in m["artifacts"]:
            if a["export_format"] == "onnx-fp16":
                a.pop("fp32_ops", None)
                a.update(export_format="onnx-int8", precision="int8", file="edge.int8.onnx", made_from="edge.onnx",
                         quantization="static", calibration={"images": 512, "source": "training split"},
                         converter="onnxruntime quantize_static (QDQ, per-channel, percentile calibration)")
        m["export"]["requested"] = ["onnx", "onnx-int8"]

    edit_json(x / "manifest.json", edit)
    rehash(x, "edge.int8.onnx")


def test_verify_refuses_fp16_relabelled_int8(art, fp16x, tmp_path, place):
    x = copy_tree(fp16x, tmp_path / "x")
    _relabel_onnx_fp16_as_int8(x)
    fails_cleanly(_verify(art, place, x), "edge.int8.onnx holds fp16 weights", "says precision int8", "edited by hand")


def test_devices_bench_refuses_fp16_relabelled_int8(fp16x, tmp_path):
    x = copy_tree(fp16x, tmp_path / "x")
    _relabel_onnx_fp16_as_int8(x)
    fails_cleanly(_devices_bench(x, "--precision", "int8"), "holds fp16 weights")


def test_coreml_fp16_relabelled_int8_weights(art, tmp_path):
    """The Core ML package's program says float16 constants, whatever its entry says."""
    x = copy_tree(art / "export", tmp_path / "x")
    (x / "edge.fp16.mlpackage").rename(x / "edge.int8w.mlpackage")

    def edit(m):
        for a in m["artifacts"]:
            if a["export_format"] == "coreml-fp16":
                a.update(export_format="coreml-int8w", precision="int8-weights", file="edge.int8w.mlpackage",
                         compute_precision="fp32")
        m["export"]["requested"] = ["onnx", "coreml-int8w"]

    edit_json(x / "manifest.json", edit)
    rehash(x, "edge.int8w.mlpackage")
    fails_cleanly(_devices_bench(x, "--runtime", "coreml-interp", "--format", "coreml"),
                  "holds fp16 weights", "int8-weights")


# ------------------------------------------------------------------------------ paths, hashes, entries

def test_entry_pointed_at_another_artifact(art, fp16x, tmp_path, place):
    x = copy_tree(fp16x, tmp_path / "x")
    edit_json(x / "manifest.json", lambda m: m["artifacts"][1].update(file="edge.onnx"))
    rehash(x, "edge.onnx")
    fails_cleanly(_verify(art, place, x), "lists edge.onnx for two artifacts")


def test_entries_swapped_between_two_artifacts(art, fp16x, tmp_path, place):
    """Paths and hashes swapped consistently: the FP32 entry now names the FP16 file."""
    x = copy_tree(fp16x, tmp_path / "x")

    def swap(m):
        a, b = m["artifacts"][0], m["artifacts"][1]
        a["file"], b["file"] = b["file"], a["file"]
        a["sha256"], b["sha256"] = b["sha256"], a["sha256"]

    edit_json(x / "manifest.json", swap)
    fails_cleanly(_verify(art, place, x), "edge.fp16.onnx holds fp16 weights", "says precision fp32")


def test_entry_pointed_at_a_missing_file(art, tmp_path, place):
    x = copy_tree(art / "export", tmp_path / "x")
    edit_json(x / "manifest.json", lambda m: m["artifacts"][0].update(file="edge.v2.onnx"))
    fails_cleanly(_verify(art, place, x), "edge.v2.onnx, which is not in the export directory", "edge.onnx")


def test_wrong_sha256(art, tmp_path):
    x = copy_tree(art / "export", tmp_path / "x")
    edit_json(x / "manifest.json", lambda m: m["artifacts"][0].update(sha256="0" * 64))
    fails_cleanly(_hetero_bench(x), "edge.onnx", "sha256")


def test_removed_artifact_entry(art, tmp_path, place):
    """The Core ML entry deleted, its package left in the directory: verify would skip it silently."""
    x = copy_tree(art / "export", tmp_path / "x")
    edit_json(x / "manifest.json", lambda m: m.update(artifacts=[a for a in m["artifacts"] if a["format"] != "coreml"]))
    fails_cleanly(_verify(art, place, x), "lists no entry for edge.fp16.mlpackage")


def test_removed_artifact_entry_and_file(art, tmp_path, place):
    import shutil

    x = copy_tree(art / "export", tmp_path / "x")
    shutil.rmtree(x / "edge.fp16.mlpackage")
    edit_json(x / "manifest.json", lambda m: m.update(artifacts=[a for a in m["artifacts"] if a["format"] != "coreml"]))
    fails_cleanly(_verify(art, place, x), "no entry for coreml-fp16", "asked for")


def test_removed_artifact_file(art, tmp_path, place):
    import shutil

    x = copy_tree(art / "export", tmp_path / "x")
    shutil.rmtree(x / "edge.fp16.mlpackage")
    fails_cleanly(_verify(art, place, x), "edge.fp16.mlpackage", "missing")


# -------------------------------------------------------------------------------------------- limits

@pytest.mark.parametrize("command", ["verify", "evaluate"])
@pytest.mark.parametrize("flag", ["--query-limit", "--gallery-limit"])
def test_limit_zero_is_not_everything(art, place, command, flag):
    if command == "verify":
        p = _verify(art, place, art / "export", flag, "0")
    else:
        p = cli("evaluate", "--cloud", art / "cloud", "--edge", art / "edge", "--data", "synthetic", "--out",
                place.path / "ev", "--quiet", flag, "0")
    fails_cleanly(p, flag, ">= 1", "got 0")


# ----------------------------------------------------------------------------- gates and required pairs

def test_require_a_pair_that_was_skipped(art, tmp_path, place):
    """Core ML proper runs on macOS only: required, its skip fails the verdict (exit 1) and says so."""
    from devices.runner import RUNNERS

    if RUNNERS["coreml"].unavailable() is None:
        pytest.skip("Core ML runs here: the pair is not skipped")
    place.allow = {"rep"}
    (tmp_path / "gates.toml").write_text(PERMISSIVE_GATES)
    p = _verify(art, place, art / "export", "--gates", tmp_path / "gates.toml",
                "--require", "onnx@onnxruntime,coreml-fp16@coreml")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert not _only_new(p, place.path / "rep"), p.changed
    rep = json.loads((place.path / "rep" / "report.json").read_text())
    assert not rep["verdict"]["passed"]
    assert {r["pair"]: r["status"] for r in rep["verdict"]["required"]} == {
        "onnx @ onnxruntime": "ran", "coreml-fp16 @ coreml": "skipped"}
    assert any(f.startswith("coreml-fp16 @ coreml: required, but skipped") for f in rep["verdict"]["failed"])
    assert "coreml-fp16 @ coreml: required, but skipped" in (place.path / "rep" / "report.md").read_text()
    assert "required: coreml-fp16 @ coreml: skipped" in p.stdout


def test_require_a_pair_the_export_lacks(art, tmp_path, place):
    place.allow = {"rep"}
    (tmp_path / "gates.toml").write_text(PERMISSIVE_GATES)
    p = _verify(art, place, art / "export", "--gates", tmp_path / "gates.toml", "--require", "onnx-int8@onnxruntime",
                "--runtime", "onnxruntime")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert not _only_new(p, place.path / "rep"), p.changed
    rep = json.loads((place.path / "rep" / "report.json").read_text())
    assert rep["verdict"]["required"] == [{"pair": "onnx-int8 @ onnxruntime", "status": "absent",
                                           "reason": "the export has no such artifact"}]


@pytest.mark.parametrize("spec, words", [
    ("onnx@tflite", ("unknown runner 'tflite'", "known runners:", "onnxruntime", "coreml-interp")),
    ("onnx-fp8@onnxruntime", ("unknown format 'onnx-fp8'", "known formats:", "onnx-fp16", "coreml-fp16")),
    ("onnx", ("FORMAT@RUNNER",)),
    ("onnx@coreml-interp", ("runner coreml-interp runs coreml artifacts, not onnx",)),
], ids=["runner", "format", "no-runner", "runner-cannot-run-it"])
def test_require_bad_names(art, place, spec, words):
    fails_cleanly(_verify(art, place, art / "export", "--require", spec), "--require", *words)


def test_require_a_runner_left_out_by_runtime(art, place):
    fails_cleanly(_verify(art, place, art / "export", "--runtime", "onnxruntime", "--require", "coreml-fp16@coreml-interp"),
                  "left out by --runtime")


def test_a_gate_that_checks_nothing_is_flagged(art, tmp_path, place):
    """Accepted (exit 0 here: every gate is permissive), but the console, report.json, .md and .html say
    which gates cannot fail."""
    place.allow = {"rep"}
    (tmp_path / "gates.toml").write_text(NO_OP_GATES)
    p = cli("verify", "--manifest", art / "export", "--cloud", art / "cloud", "--edge", art / "edge", "--data",
            "synthetic", "--out", place.path / "rep", "--quiet", "--no-latency", "--gates", tmp_path / "gates.toml")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert not _only_new(p, place.path / "rep"), p.changed
    assert "warning: gate precision.fp32.min_drift_cosine = -1 checks nothing" in p.stdout
    rep = json.loads((place.path / "rep" / "report.json").read_text())
    idle = {(g["where"], g["gate"]) for g in rep["gates"]["no_op"]}
    assert idle == {("all", "compatibility_criterion"), ("all", "max_gap_to_paragon"), ("all", "max_negative_flip_rate"),
                    ("precision.fp16", "min_drift_cosine"), ("precision.fp16", "min_top10_overlap"),
                    ("precision.fp32", "min_drift_cosine"), ("precision.fp32", "min_top10_overlap")}
    assert rep["verdict"]["passed"] and len(rep["gates"]["warnings"]) == len(idle)
    md = (place.path / "rep" / "report.md").read_text()
    assert "**Warning:** gate precision.fp32.min_drift_cosine = -1 checks nothing" in md
    assert "Warning: gate all.compatibility_criterion = false checks nothing" in (place.path / "rep" / "report.html").read_text()

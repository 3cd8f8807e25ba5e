"""The CLI end to end on synthetic data, and every bad input: one line, exit 2, nothing written."""
import gzip
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clitest import one_line_error, other_space_cloud, run
from hetero.app.cli import main

TINY = ["--data", "synthetic", "--epochs", "2", "--batch-size", "32", "--dim", "16", "--quiet"]



@pytest.fixture(scope="module")
def trained(saved, tmp_path_factory):
    """The conftest's tiny cloud and edge, and a second cloud of another space (its weights nudged)."""
    import shutil

    root = tmp_path_factory.mktemp("cli")
    for name in ("cloud", "edge"):
        shutil.copytree(saved / name, root / name)
    other_space_cloud(root / "cloud", root / "cloud2")
    return root


def test_train_export_evaluate(trained, tmp_path, capsys):
    code, out, _ = run(capsys, "export", "--edge", trained / "edge", "--cloud", trained / "cloud", "--out", tmp_path / "x",
                       "--data", "synthetic", "--check-samples", "100")
    assert code == 0 and "min cosine" in out
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["artifacts"][0]["fidelity"]["num_inputs"] == 100
    code, out, _ = run(capsys, "evaluate", "--cloud", trained / "cloud", "--edge", trained / "edge", "--artifact",
                       tmp_path / "x", "--data", "synthetic", "--out", tmp_path / "rep", "--quiet")
    assert code == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    combos = {(r["query_model"], r["gallery_model"], r["runtime"].split()[0]) for r in rep["retrieval"]}
    assert combos == {("cloud", "cloud", "torch"), ("edge", "edge", "torch"), ("edge", "cloud", "torch"),
                      ("edge", "cloud", "onnxruntime")}
    ort_row = [r for r in rep["retrieval"] if r["runtime"].startswith("onnxruntime")][0]
    torch_row = [r for r in rep["retrieval"] if r["query_model"] == "edge" and r["gallery_model"] == "cloud"][0]
    assert abs(ort_row["map_at_r"] - torch_row["map_at_r"]) < 1e-3
    assert (tmp_path / "rep" / "report.md").read_text().startswith("# hetero evaluate")


def test_export_calibrates_int8_only_on_the_models_training_data(trained, tmp_path, capsys):
    """The edge was trained on synthetic images: without --data, INT8 is skipped (default formats) or
    refused (asked for), never calibrated on Fashion-MNIST; with --data it is built."""
    code, out, _ = run(capsys, "export", "--edge", trained / "edge", "--out", tmp_path / "a", "--quiet")
    assert code == 0 and "skipped onnx-int8: needs calibration images" in out and "edge.fp16.onnx" in out
    msg = one_line_error(*run(capsys, "export", "--edge", trained / "edge", "--out", tmp_path / "b",
                              "--formats", "onnx-int8")[::2])
    assert "trained on synthetic/train" in msg and "--data" in msg and not (tmp_path / "b").exists()
    code, out, _ = run(capsys, "export", "--edge", trained / "edge", "--out", tmp_path / "c", "--formats", "onnx-int8",
                       "--data", "synthetic", "--calib", "100", "--check-samples", "50")
    assert code == 0 and re.search(r"^onnx-int8 +\S+edge.int8.onnx: ", out, re.M)
    calib = json.loads((tmp_path / "c" / "manifest.json").read_text())["artifacts"][1]["calibration"]
    assert calib == {"images": 100, "source": "training split", "method": "percentile"}
    msg = one_line_error(*run(capsys, "export", "--edge", trained / "edge", "--out", tmp_path / "d", "--formats", "onnx,tflite")[::2])
    assert "unknown export format 'tflite'" in msg and "onnx-fp16" in msg


def test_evaluate_as_update_names_rows_old_and_new(trained, tmp_path, capsys):
    code, out, _ = run(capsys, "evaluate", "--cloud", trained / "cloud", "--edge", trained / "edge", "--update",
                       "--data", "synthetic", "--out", tmp_path / "u", "--quiet")
    assert code == 0
    rows = json.loads((tmp_path / "u" / "report.json").read_text())["retrieval"]
    assert [(r["query_model"], r["gallery_model"]) for r in rows] == [("old", "old"), ("new", "new"), ("new", "old")]
    assert "with the paragon's (old->old)" in (tmp_path / "u" / "report.md").read_text()


def test_control_and_config_file(trained, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('model = "test_mobilenet"\nepochs = 1\nlimit = 200\n')
    code, out, _ = run(capsys, "train-edge", "--cloud", trained / "cloud", "--out", tmp_path / "ctl", "--no-compat",
                       "--config", cfg, "--data", "synthetic", "--dim", "16", "--quiet")
    assert code == 0 and "control" in out
    meta = json.loads((tmp_path / "ctl" / "hetero.json").read_text())
    assert meta["role"] == "control" and meta["config"]["limit"] == 200 and meta["config"]["compat"] is False


def test_missing_and_wrong_data_paths(tmp_path, capsys):
    msg = one_line_error(*run(capsys, "train-cloud", "--out", tmp_path / "c", "--data", tmp_path / "nope")[::2])
    assert "no such directory" in msg and not (tmp_path / "c").exists()
    (tmp_path / "empty").mkdir()
    msg = one_line_error(*run(capsys, "data", "--data", tmp_path / "empty")[::2])
    assert "--data" in msg or "empty" in msg


def test_unreadable_dataset(tmp_path, capsys):
    d = tmp_path / "fm"
    d.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (d / f"{name}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03garbage"))
    msg = one_line_error(*run(capsys, "train-cloud", "--out", tmp_path / "c", "--data", d)[::2])
    assert "idx" in msg.lower() and not (tmp_path / "c").exists()


def test_corrupt_and_foreign_checkpoints(trained, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained / "cloud", bad)
    (bad / "weights.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    msg = one_line_error(*run(capsys, "train-edge", "--cloud", bad, "--out", tmp_path / "e", *TINY)[::2])
    assert "sha256" in msg and not (tmp_path / "e").exists()
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(b"PK\x03\x04 a torch zip")
    msg = one_line_error(*run(capsys, "export", "--edge", foreign, "--out", tmp_path / "x")[::2])
    assert "not a hetero checkpoint" in msg and not (tmp_path / "x").exists()
    msg = one_line_error(*run(capsys, "train-edge", "--cloud", trained / "edge", "--out", tmp_path / "e", *TINY)[::2])
    assert "expected cloud" in msg


def test_fingerprint_mismatch(trained, tmp_path, capsys):
    msg = one_line_error(*run(capsys, "export", "--edge", trained / "edge", "--cloud", trained / "cloud2", "--out", tmp_path / "x")[::2])
    assert "cloud space" in msg and not (tmp_path / "x").exists()
    msg = one_line_error(*run(capsys, "evaluate", "--cloud", trained / "cloud2", "--edge", trained / "edge", "--data", "synthetic",
                              "--out", tmp_path / "r", "--quiet")[::2])
    assert "cloud space" in msg and not (tmp_path / "r").exists()


def test_nothing_is_overwritten(trained, tmp_path, capsys):
    out = tmp_path / "c"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    msg = one_line_error(*run(capsys, "train-cloud", "--out", out, "--model", "test_resnet", *TINY)[::2])
    assert "--overwrite" in msg and [p.name for p in out.iterdir()] == ["mine.txt"]


def test_bad_training_options(trained, tmp_path, capsys):
    msg = one_line_error(*run(capsys, "train-edge", "--cloud", trained / "cloud", "--out", tmp_path / "e", "--loss", "triplet=1", *TINY)[::2])
    assert "unknown loss 'triplet'" in msg
    msg = one_line_error(*run(capsys, "train-edge", "--cloud", trained / "cloud", "--out", tmp_path / "e", "--loss", "alignment=-1", *TINY)[::2])
    assert ">= 0" in msg
    msg = one_line_error(*run(capsys, "train-cloud", "--out", tmp_path / "c", "--model", "nonet", *TINY)[::2])
    assert "unknown backbone 'nonet'" in msg
    msg = one_line_error(*run(capsys, "demo", "--out", tmp_path / "d", "--cloud-epochs", "1", "--cloud-margin", "0")[::2])
    assert "--cloud-epochs, --cloud-margin" in msg and "add --train-cloud" in msg
    assert not (tmp_path / "e").exists() and not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_console_script_prints_no_traceback(tmp_path):
    exe = Path(sys.executable).with_name("hetero")
    p = subprocess.run([str(exe), "export", "--edge", str(tmp_path / "none"), "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, env={**os.environ})
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("error: checkpoint") and len(p.stderr.strip().splitlines()) == 1


def test_image_folder_rgb_any_size(tmp_path, capsys, monkeypatch):
    """Train, export and evaluate on an ImageFolder of 20x20 RGB images (3 classes of colour blobs);
    --quiet hides the folder's loading bar too."""
    import numpy as np
    from PIL import Image

    import hetero.data.image_folder

    monkeypatch.setattr(hetero.data.image_folder, "_PROGRESS_MIN", 0)  # a loading bar even for 150 images

    rng = np.random.default_rng(0)
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]
    for split, n in (("train", 40), ("test", 10)):
        for c, colour in enumerate(colours):
            d = tmp_path / "folder" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = (rng.integers(0, 60, (20, 20, 3)) + np.array(colour) * rng.uniform(0.6, 1.0)).clip(0, 255)
                Image.fromarray(img.astype(np.uint8)).save(d / f"{i}.png")
    data = ["--data", tmp_path / "folder"]
    small = ["--epochs", "2", "--batch-size", "16", "--dim", "8", "--quiet"]
    code, _, err = run(capsys, "train-cloud", "--out", tmp_path / "c", "--model", "test_resnet", *data, *small)
    assert code == 0 and "loading" not in err, err
    code, _, err = run(capsys, "train-edge", "--cloud", tmp_path / "c", "--out", tmp_path / "e", "--model", "test_mobilenet",
                       *data, *small)
    assert code == 0 and "loading" not in err, err
    meta = json.loads((tmp_path / "c" / "hetero.json").read_text())
    assert meta["preprocess"]["channels"] == 3 and len(meta["classes"]) == 3
    code, out, err = run(capsys, "export", "--edge", tmp_path / "e", "--out", tmp_path / "x", *data)
    assert code == 0 and "loading test/test" in err  # not --quiet: the bar shows
    assert json.loads((tmp_path / "x" / "manifest.json").read_text())["artifacts"][0]["input"]["shape"][1] == 3
    code, out, err = run(capsys, "evaluate", "--cloud", tmp_path / "c", "--edge", tmp_path / "e", "--artifact", tmp_path / "x",
                       *data, "--quiet")
    assert code == 0 and "onnxruntime" in out and "loading" not in err, err


def test_cache_lists_and_clears_only_target_files(tmp_path, monkeypatch, capsys, tiny_cloud, synth):
    from hetero.embed import cloud_targets

    monkeypatch.setenv("HETERO_CACHE", str(tmp_path))
    cloud_targets(tiny_cloud, synth[0], progress=False)
    cloud_targets(tiny_cloud, synth[1], progress=False)
    (tmp_path / "targets" / "notes.txt").write_text("not ours")
    code, out, _ = run(capsys, "cache")
    assert code == 0 and out.count(f"model {tiny_cloud.space[:16]}") == 2 and "2 file(s)" in out
    assert run(capsys, "cache", "--fingerprint", tiny_cloud.space)[1].count("model ") == 2  # a full fingerprint lists them too
    code, out, _ = run(capsys, "cache", "--clear", "--space", "ffff")  # another space: nothing goes
    assert code == 0 and "deleted 0" in out and len(list((tmp_path / "targets").glob("*.npy"))) == 2
    code, err = run(capsys, "cache", "--clear", "--space", "../x")[::2]
    assert "hex fingerprint prefix" in one_line_error(code, err)
    code, out, _ = run(capsys, "cache", "--clear", "--space", tiny_cloud.space[:8])
    assert code == 0 and "deleted 2" in out
    assert [p.name for p in (tmp_path / "targets").iterdir()] == ["notes.txt"]
    assert "0 file(s)" in run(capsys, "cache")[1]


def _export_fails(trained, capsys, *extra):
    """``hetero export`` with bad input: one line, exit 2, no traceback (test_console_script_prints_no_traceback
    runs the console script itself)."""
    return one_line_error(*run(capsys, "export", "--edge", trained / "edge", "--quiet", *extra)[::2])


def test_export_bad_input_as_typed(trained, tmp_path, capsys):
    """The issue's bad-input list for export, each a one-line error and nothing left behind."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    msg = _export_fails(trained, capsys, "--out", mine, "--overwrite")  # exists, not a hetero export
    assert "files hetero did not write" in msg and (mine / "notes.txt").read_text() == "keep me"
    msg = _export_fails(trained, capsys, "--out", tmp_path / "a", "--cloud", trained / "cloud2")  # another space
    assert "cloud space" in msg
    msg = _export_fails(trained, capsys, "--out", tmp_path / "b", "--formats", "onnx,tflite")  # unknown format
    assert "unknown export format 'tflite'" in msg and "coreml" in msg and "tensorrt" in msg
    msg = _export_fails(trained, capsys, "--out", tmp_path / "c", "--batch-sizes", "1,x")
    assert "--batch-sizes" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_export_names_the_pip_extra_of_a_missing_library(trained, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "coremltools" else real(name, *a))
    msg = one_line_error(*run(capsys, "export", "--edge", trained / "edge", "--out", tmp_path / "x", "--formats",
                              "coreml-fp16", "--quiet")[::2])
    assert "coremltools not installed" in msg and "pip install 'hetero[coreml]'" in msg
    code, out, _ = run(capsys, "export", "--edge", trained / "edge", "--out", tmp_path / "y", "--formats", "onnx", "--quiet")
    assert code == 0
    code, out, _ = run(capsys, "export", "--edge", trained / "edge", "--out", tmp_path / "z", "--quiet")  # default set
    assert code == 0 and "skipped coreml: coremltools not installed (pip install 'hetero[coreml]')" in out
    assert not (tmp_path / "x").exists()

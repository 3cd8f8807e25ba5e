"""Bad input, as a user types it: every case runs ``hetero ...`` (or the torch-free ``python -m devices
run``) and must print exactly one ``error: ...`` line on stderr, no traceback, exit non-zero, and leave
nothing behind (``--out`` absent or unchanged, no temp directory beside it). A few inputs must *work*
(mixed image sizes and modes).

Cases run in this process through the CLI's ``main(argv)`` (a traceback there is an exception the test
sees) unless they need a real process: signals, the full-disk shim where tmpfs cannot be mounted, a
module that must not be imported into the test process (an untrusted factory). The expensive artifacts
(two clouds, an edge, an ONNX + Core ML export) are built once per worker (tests/app/bad_inputs/conftest.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from badinput import (REPO, TINY_TRAIN, child_env, cli, copy_tree, edit_json, fails_cleanly, interrupt, rehash,
                      resave_meta)

# --------------------------------------------------------------------------------------- checkpoints

def test_truncated_weights(art, tmp_path, place):
    edge = copy_tree(art / "edge", tmp_path / "edge")
    w = (edge / "weights.safetensors").read_bytes()
    (edge / "weights.safetensors").write_bytes(w[: len(w) // 3])
    fails_cleanly(cli("export", "--edge", edge, "--out", place.path / "x", "--quiet"), "sha256")


def test_truncated_weights_with_a_matching_hash(art, tmp_path, place):
    """Damage past the hash check (someone re-recorded it): safetensors refuses, one line."""
    edge = copy_tree(art / "edge", tmp_path / "edge")
    w = (edge / "weights.safetensors").read_bytes()
    (edge / "weights.safetensors").write_bytes(w[: len(w) // 3])
    resave_meta(edge, lambda m: m.update(weights_sha256=hashlib.sha256(w[: len(w) // 3]).hexdigest()))
    fails_cleanly(cli("export", "--edge", edge, "--out", place.path / "x", "--quiet"), "corrupt")


def test_truncated_checkpoint_json(art, tmp_path, place):
    edge = copy_tree(art / "edge", tmp_path / "edge")
    (edge / "hetero.json").write_text((edge / "hetero.json").read_text()[:150])
    fails_cleanly(cli("export", "--edge", edge, "--out", place.path / "x", "--quiet"), "not valid JSON")


def test_checkpoint_json_of_wrong_types(art, tmp_path, place):
    edge = copy_tree(art / "edge", tmp_path / "edge")
    resave_meta(edge, lambda m: m.update(model="resnet", preprocess={"size": "big"}))
    fails_cleanly(cli("export", "--edge", edge, "--out", place.path / "x", "--quiet"))


@pytest.mark.parametrize("value, word", [("nan", "NaN"), ("-inf", "Inf")])
def test_checkpoint_weights_not_finite(art, tmp_path, place, value, word):
    """Consistent hashes and fingerprint, but a NaN or Inf weight (a diverged run): refused on load."""
    import torch

    from hetero.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(art / "edge")
    with torch.no_grad():
        next(ckpt.model.parameters()).view(-1)[0] = float(value)
    save_checkpoint(ckpt, tmp_path / "edge")
    fails_cleanly(cli("export", "--edge", tmp_path / "edge", "--out", place.path / "x", "--quiet"), word)


@pytest.mark.parametrize("factory, kwargs", [("os:system", "command"), ("subprocess:getoutput", "cmd")])
def test_checkpoint_naming_a_dangerous_factory(art, tmp_path, place, factory, kwargs):
    """A BYO checkpoint's hetero.json names module:callable(**kwargs); one handed over must not get
    to run a shell command when loaded (the weights hash is the attacker's to re-record)."""
    ckpt = copy_tree(art / "cloud", tmp_path / "c")
    marker = tmp_path / "PWNED"
    resave_meta(ckpt, lambda m: m.update(model={"backbone": factory, "dim": 16, "kind": "factory",
                                                 "backbone_kwargs": {kwargs: f"touch {marker}"}}))
    fails_cleanly(cli("export", "--edge", ckpt, "--out", place.path / "x", "--quiet"), "refusing")
    assert not marker.exists()


def test_checkpoint_naming_an_untrusted_factory_of_a_user_module(art, tmp_path, place):
    """A factory that is no library function but a handed-over checkpoint's choice: not called unless
    imported on this machine or listed in $HETERO_TRUSTED_FACTORIES."""
    mod = tmp_path / "mods"
    mod.mkdir()
    marker = tmp_path / "RAN"
    (mod / "sender_models.py").write_text(f"def build(**kw):\n    open({str(marker)!r}, 'w').close()\n    raise SystemExit(3)\n")
    ckpt = copy_tree(art / "cloud", tmp_path / "c")
    resave_meta(ckpt, lambda m: m.update(model={"backbone": "sender_models:build", "dim": 16, "kind": "factory",
                                                 "backbone_kwargs": {}}))
    env = child_env({"PYTHONPATH": os.pathsep.join([str(mod), str(REPO)])})
    fails_cleanly(cli("export", "--edge", ckpt, "--out", place.path / "x", "--quiet", env=env),
                  "sender_models:build", "HETERO_TRUSTED_FACTORIES")
    assert not marker.exists()
    cli("export", "--edge", ckpt, "--out", place.path / "x", "--quiet",
        env={**env, "HETERO_TRUSTED_FACTORIES": "sender_models:build"})
    assert marker.exists()  # trusted by the user: it is called (and this one then fails)


def test_edge_from_another_cloud_space(art, place):
    fails_cleanly(cli("export", "--edge", art / "edge", "--cloud", art / "cloud2", "--out", place.path / "x", "--quiet"),
                  "cloud space")


def test_verify_against_another_cloud(art, place):
    fails_cleanly(cli("verify", "--manifest", art / "export", "--cloud", art / "cloud2", "--edge", art / "edge",
                      "--data", "synthetic", "--out", place.path / "rep", "--quiet", "--no-latency", "--no-html"),
                  "cloud space")


# ------------------------------------------------------------------------------------- bring your own

BYO = ["import-cloud", "--factory", "tinybyo:make", "--dim", "8", "--size", "16"]


def _byo(art, place, weights, *extra):
    return cli(*BYO, "--weights", art / "byo" / weights, "--out", place.path / "c", *extra, path=[art / "byo"])


@pytest.mark.parametrize("weights", ["evil.pt", "evil_legacy.pt"])
def test_pickle_in_a_pt_is_refused_and_never_run(art, place, weights):
    p = _byo(art, place, weights)
    fails_cleanly(p, "pickled Python objects", "refusing to unpickle")
    assert not (art / "byo" / "PWNED").exists()  # the payload never ran


def test_truncated_safetensors(art, place):
    fails_cleanly(_byo(art, place, "truncated.safetensors"), "not a readable safetensors file")


def test_byo_weights_with_nan(art, place):
    fails_cleanly(_byo(art, place, "nan.safetensors"), "NaN")


def test_byo_wrong_channel_count(art, place):
    fails_cleanly(_byo(art, place, "good.safetensors", "--channels", "1", "--mean", "0.5", "--std", "0.25"),
                  "check --channels and --size")


# ------------------------------------------------------------------------------ exports and manifests

def _bench(export: Path, *extra):
    return cli("bench", export, "--iters", "2", "--warmup", "0", "--batch", "1", "--quiet", *extra)


def test_truncated_onnx(art, tmp_path):
    x = copy_tree(art / "export", tmp_path / "x")
    (x / "edge.onnx").write_bytes((x / "edge.onnx").read_bytes()[:3000])
    fails_cleanly(_bench(x), "sha256")
    rehash(x, "edge.onnx")  # past the hash: onnxruntime cannot parse it
    fails_cleanly(_bench(x), "cannot load")


def test_corrupt_mlpackage(art, tmp_path):
    x = copy_tree(art / "export", tmp_path / "x")
    model = next((x / "edge.fp16.mlpackage").rglob("model.mlmodel"))
    model.write_bytes(b"\x08\x07garbage" * 10)
    coreml = ("--runtime", "coreml-interp", "--format", "coreml")
    fails_cleanly(_bench(x, *coreml), "sha256")
    rehash(x, "edge.fp16.mlpackage")
    fails_cleanly(_bench(x, *coreml), "edge.fp16.mlpackage")


def test_mlpackage_with_a_link_out_of_the_export(art, tmp_path):
    """A symlink inside the package, hash re-recorded by whoever planted it: refused before reading."""
    x = copy_tree(art / "export", tmp_path / "x")
    weight = next((x / "edge.fp16.mlpackage").rglob("weight.bin"))
    (tmp_path / "elsewhere.bin").write_bytes(weight.read_bytes())
    weight.unlink()
    weight.symlink_to(tmp_path / "elsewhere.bin")
    rehash(x, "edge.fp16.mlpackage")
    fails_cleanly(_bench(x, "--runtime", "coreml-interp", "--format", "coreml"), "links outside the export directory")


def test_truncated_manifest(art, tmp_path):
    x = copy_tree(art / "export", tmp_path / "x")
    (x / "manifest.json").write_text((x / "manifest.json").read_text()[:200])
    fails_cleanly(_bench(x), "not valid JSON")


@pytest.mark.parametrize("where", ["dotdot", "absolute", "symlink"])
def test_manifest_path_outside_its_directory(art, tmp_path, where):
    x = copy_tree(art / "export", tmp_path / "x")
    secret = tmp_path / "secret.onnx"
    shutil.copy(x / "edge.onnx", secret)
    name = {"dotdot": "../secret.onnx", "absolute": str(secret), "symlink": "link.onnx"}[where]
    if where == "symlink":
        (x / "link.onnx").symlink_to(secret)
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    edit_json(x / "manifest.json", lambda m: m["artifacts"][0].update(file=name, sha256=digest))
    fails_cleanly(_bench(x), "escapes" if where != "absolute" else "invalid artifact path")


@pytest.mark.parametrize("damage, words", [
    (lambda m: m["artifacts"][0].pop("input"), "no input name"),
    (lambda m: m["artifacts"][0]["input"].update(shape=["batch", "one", 28, 28]), "input shape"),
    (lambda m: m.update(dim="big"), "dim"),
    (lambda m: m["artifacts"][0].update(format=["onnx"]), "no format"),
], ids=["no-input", "shape", "dim", "format"])
def test_manifest_of_wrong_structure(art, tmp_path, damage, words):
    x = copy_tree(art / "export", tmp_path / "x")
    edit_json(x / "manifest.json", damage)
    fails_cleanly(_bench(x), "malformed", words)


def test_latency_json_damaged(art, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text('{"schema": "hetero-latency/1", "results": [{}]}')
    b.write_text('{"schema": "hetero-latency/1", "res')
    fails_cleanly(cli("bench", a, a, "--compare"), "damaged")
    fails_cleanly(cli("bench", b, a, "--compare"), "not valid JSON")


# --------------------------------------------------------------------------- query arrays (standalone)

@pytest.mark.parametrize("kind", ["nan", "inf", "channels", "size", "object"])
def test_query_npy(art, tmp_path, place, kind):
    """``python -m devices run`` takes a preprocessed .npy batch: NaN/Inf, a wrong channel count or
    image size, and a pickled object array are each refused; no embeddings file is written."""
    x = np.zeros((2, 1, 28, 28), np.float32)
    if kind == "nan":
        x[0, 0, 5, 5] = np.nan
    elif kind == "inf":
        x[1, 0, 0, 0] = -np.inf
    elif kind == "channels":
        x = np.zeros((2, 3, 28, 28), np.float32)
    elif kind == "size":
        x = np.zeros((2, 1, 32, 32), np.float32)
    npy = tmp_path / "q.npy"
    if kind == "object":
        np.save(npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        np.save(npy, x)
    p = cli("run", art / "export", "--input", npy, "--out", place.path / "emb.npy", module="devices")
    fails_cleanly(p, {"nan": "NaN", "inf": "Inf", "channels": "model takes [N, 1, 28, 28]",
                      "size": "model takes [N, 1, 28, 28]", "object": "allow_pickle"}[kind])


# ---------------------------------------------------------------------------------------------- data

def test_empty_dataset_directory(art, place):
    fails_cleanly(cli("train-cloud", "--out", place.path / "c", "--data", art / "empty", *TINY_TRAIN), "--data")


def test_image_folder_of_mixed_sizes_and_modes_works(art, place):
    """RGB, L, P, RGBA, LA, 1-bit, 16-bit and CMYK images of any size, plus non-image files: trains."""
    place.allow = {"c"}
    p = cli("train-cloud", "--out", place.path / "c", "--data", art / "mixed", *TINY_TRAIN)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    meta = json.loads((place.path / "c" / "hetero.json").read_text())
    assert meta["preprocess"]["channels"] == 3 and meta["classes"] == ["class0", "class1"]
    assert sorted(q.name for q in place.path.iterdir()) == ["c"]  # no temp dir left


@pytest.mark.parametrize("folder, words", [("truncated", "0.png"), ("textjpg", "photo.jpg")])
def test_image_folder_with_a_corrupt_image(art, place, folder, words):
    fails_cleanly(cli("train-cloud", "--out", place.path / "c", "--data", art / folder, *TINY_TRAIN),
                  words, "cannot read image")


def test_config_file_corrupt(art, tmp_path, place):
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"epochs": 1, ')
    fails_cleanly(cli("train-cloud", "--out", place.path / "c", "--data", "synthetic", "--config", cfg, "--quiet"),
                  "cannot be parsed")


def test_arch_json_corrupt(art, tmp_path, place):
    arch = tmp_path / "arch.json"
    arch.write_text('{"format": "hetero-arch", "arch": [1, 2')
    fails_cleanly(cli("train-edge", "--cloud", art / "cloud", "--arch", arch, "--out", place.path / "e",
                      "--data", "synthetic", "--quiet"), "not valid JSON")


def test_full_disk_during_export(art, full_disk):
    d, env = full_disk("20k")
    fails_cleanly(cli("export", "--edge", art / "edge", "--out", d / "x", "--formats", "onnx,onnx-fp16",
                      "--check-samples", "20", "--quiet", env=env), "cannot write", "no space left")
    assert list(d.iterdir()) == []


def test_full_disk_when_saving_a_checkpoint(art, full_disk):
    d, env = full_disk("4k")
    fails_cleanly(cli("train-cloud", "--out", d / "c", "--data", "synthetic", *TINY_TRAIN, env=env), "no space left")
    assert list(d.iterdir()) == []


# ------------------------------------------------------------------------------------- interruptions

@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_export_interrupted(art, place, sig):
    out = place.path / "x"
    p = interrupt(["export", "--edge", art / "edge", "--out", out, "--formats", "onnx,onnx-fp16,coreml-fp16",
                    "--check-samples", "50", "--quiet"],
                   lambda: any(q.name.startswith(".x.tmp-") for q in place.path.iterdir()), getattr(signal, sig))
    code = {"SIGINT": 130, "SIGTERM": 143}[sig]
    fails_cleanly(p, "interrupted" if sig == "SIGINT" else "terminated (SIGTERM)", "discarded", code=code)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_training_interrupted(art, tmp_path, place, sig):
    """Interrupted once the first optimizer step ran: --out is not written; the resume state
    (``<out>.resume``, kept on purpose) is the only thing allowed beside it."""
    place.allow = {"c.resume"}
    mark = tmp_path / "stepped"
    env = child_env({"HETERO_TEST_MARK": str(mark)}, shim=art / "shim")
    p = interrupt(["train-cloud", "--out", place.path / "c", "--data", "synthetic", "--model", "test_resnet",
                    "--epochs", "200", "--limit", "256", "--batch-size", "32", "--dim", "8", "--quiet"],
                   mark.exists, getattr(signal, sig), env=env)
    code = {"SIGINT": 130, "SIGTERM": 143}[sig]
    fails_cleanly(p, "interrupted" if sig == "SIGINT" else "terminated (SIGTERM)", code=code, allow=place.allow)
    assert not (place.path / "c").exists()


def test_the_watch_sees_a_user_file_changed_added_or_removed(tmp_path):
    """The matrix's byte-identical check itself: a changed byte, a new file and a removed one are seen."""
    import badinput

    (tmp_path / "keep.txt").write_text("precious")
    (tmp_path / "gone.txt").write_text("x")
    before = badinput.snapshot()
    (tmp_path / "keep.txt").write_text("precioux")
    (tmp_path / "new.txt").write_text("")
    (tmp_path / "gone.txt").unlink()
    assert [Path(p).name for p in badinput.changes(before)] == ["gone.txt", "keep.txt", "new.txt"]


@pytest.mark.parametrize("flag", ["--query-limit", "--gallery-limit", "--train-limit"])
def test_demo_limit_of_zero_is_refused_before_any_work(place, flag):
    """0 is not "every image": refused at once, not after the demo has trained (verify refused it then)."""
    fails_cleanly(cli("demo", "--out", place.path / "d", flag, "0", "--quiet"), flag, ">= 1")

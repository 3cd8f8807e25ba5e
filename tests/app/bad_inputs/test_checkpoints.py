"""Bad input, continued: forged and damaged checkpoints, BYO models that would allocate absurdly, a
trust list where it no longer counts, and a Fashion-MNIST download that is not what was published.
Same rules as test_handed_over.py: one ``error:`` line, no traceback, exit 2, every user file as it was."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from badinput import TINY_TRAIN, cli, copy_tree, fails_cleanly, resave_meta
from mirror import Server, isolate

BYO = ["import-cloud", "--factory", "tinybyo:make", "--dim", "8", "--size", "16"]


def _space(ckpt: Path) -> str:
    return json.loads((ckpt / "hetero.json").read_text())["space"]


def _rehash(ckpt: Path) -> None:
    """Record the damaged weights' sha256 in hetero.json: the damage is then past the hash check."""
    digest = hashlib.sha256((ckpt / "weights.safetensors").read_bytes()).hexdigest()
    resave_meta(ckpt, lambda m: m.update(weights_sha256=digest))


def _byo_checkpoint(art: Path, dest: Path, factory: str = "tinybyo:make", path: Path | None = None) -> Path:
    """A BYO cloud checkpoint imported here (so its factory is trusted on this machine)."""
    p = cli("import-cloud", "--factory", factory, "--dim", "8", "--size", "16", "--weights",
            art / "byo" / "good.safetensors", "--out", dest, path=[path or art / "byo"])
    assert p.returncode == 0, p.stderr
    return dest


# ------------------------------------------------------------------------------- forged space fingerprint

FORGED = {
    "train-edge": lambda c, a, out: ["train-edge", "--cloud", c, "--out", out / "e", "--data", "synthetic",
                                     "--model", "test_mobilenet", "--dim", "16", "--epochs", "1", "--limit", "64",
                                     "--quiet"],
    "evaluate": lambda c, a, out: ["evaluate", "--cloud", c, "--edge", a / "edge", "--data", "synthetic",
                                   "--query-limit", "20", "--gallery-limit", "40", "--out", out / "r", "--quiet"],
    "verify": lambda c, a, out: ["verify", "--manifest", a / "export", "--cloud", c, "--edge", a / "edge", "--data",
                                 "synthetic", "--out", out / "rep", "--quiet", "--no-latency", "--no-html"],
}


@pytest.mark.parametrize("command", sorted(FORGED))
def test_cloud_claiming_another_clouds_space(art, tmp_path, place, command):
    """Cloud B with cloud A's space copied into its hetero.json: B's weights say otherwise, so it is
    refused on load; train-edge cannot reuse A's cached targets, evaluate and verify cannot pass A's edge."""
    forged = copy_tree(art / "cloud2", tmp_path / "b")
    resave_meta(forged, lambda m: m.update(space=_space(art / "cloud")))
    fails_cleanly(cli(*FORGED[command](forged, art, place.path)), "claims space", "copied from another checkpoint")


def test_cloud_claiming_another_clouds_space_and_fingerprint(art, tmp_path, place):
    forged = copy_tree(art / "cloud2", tmp_path / "b")
    a = json.loads((art / "cloud" / "hetero.json").read_text())
    resave_meta(forged, lambda m: m.update(space=a["space"], fingerprint=a["fingerprint"]))
    fails_cleanly(cli(*FORGED["evaluate"](forged, art, place.path)), "fingerprint differs")


# ------------------------------------------------------------------------------------- non-finite weights

def test_byo_weights_with_inf(art, tmp_path, place):
    from safetensors.torch import load_file, save_file

    state = load_file(str(art / "byo" / "good.safetensors"))
    state["3.bias"][0] = float("inf")
    save_file(state, str(tmp_path / "inf.safetensors"))
    fails_cleanly(cli(*BYO, "--weights", tmp_path / "inf.safetensors", "--out", place.path / "c", path=[art / "byo"]),
                  "'3.bias' holds Inf")


# -------------------------------------------------------------------------------- absurd BYO allocations

def test_byo_import_with_absurd_kwargs(art, place):
    """dim=10**9 would make a 4e9-weight Linear: counted on the meta device, refused before allocation."""
    fails_cleanly(cli(*BYO, "--model-kwargs", f"dim={10**9}", "--weights", art / "byo" / "good.safetensors",
                      "--out", place.path / "c", path=[art / "byo"]), "5,000,000,112 weights", "do not fit")


@pytest.mark.parametrize("edit", ["backbone-dim", "classifier-classes"])
def test_byo_checkpoint_with_absurd_kwargs(art, tmp_path, place, edit):
    """A BYO checkpoint's hetero.json edited to allocate tens of GB (its factory trusted here): the
    model is built on the meta device and does not fit the weights file, so nothing is allocated."""
    ckpt = _byo_checkpoint(art, tmp_path / "byo")
    if edit == "backbone-dim":
        resave_meta(ckpt, lambda m: m["model"].update(backbone_kwargs={"dim": 10**9}))
    else:
        resave_meta(ckpt, lambda m: m.update(classifier={"num_classes": 50_000_000, "scale": 16.0, "margin": 0.0}))
    fails_cleanly(cli("export", "--edge", ckpt, "--out", place.path / "x", "--quiet", path=[art / "byo"]),
                  "does not fit the model hetero.json describes")


def test_byo_checkpoint_with_absurd_kwargs_of_a_factory_that_needs_real_tensors(art, tmp_path, place):
    """A trusted factory that cannot build on the meta device: its integer options are bounded by the
    number of weights in the file instead."""
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "realonly.py").write_text(
        "import torch\n\ndef make(dim=8):\n    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),"
        " torch.nn.Flatten(), torch.nn.Linear(4, dim))\n    float(net[3].weight.detach().sum())  # needs real numbers\n"
        "    return net\n")
    ckpt = _byo_checkpoint(art, tmp_path / "byo", "realonly:make", mods)
    resave_meta(ckpt, lambda m: m["model"].update(backbone_kwargs={"dim": 10**9}))
    fails_cleanly(cli("export", "--edge", ckpt, "--out", place.path / "x", "--quiet", path=[mods]),
                  "dim=1000000000", "more than the 65536 weights")


# ------------------------------------------------------------------ safetensors header damaged, hash re-recorded

def _damage_header(w: Path, how: str) -> None:
    data = w.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    if how == "dtype":  # an unknown element type, same header length
        header = data[8:8 + n].replace(b'"F32"', b'"Q99"', 1)
        assert header != data[8:8 + n]
        w.write_bytes(data[:8] + header + data[8 + n:])
    elif how == "length":  # a header length past the end of the file
        w.write_bytes(struct.pack("<Q", len(data) * 4) + data[8:])
    else:  # offsets that overlap: two tensors claim the same bytes
        hdr = json.loads(data[8:8 + n])
        first, second = [k for k in hdr if k != "__metadata__"][:2]
        hdr[second]["data_offsets"] = hdr[first]["data_offsets"]
        new = json.dumps(hdr).encode().ljust(n)
        w.write_bytes(data[:8] + new[:n] + data[8 + n:])


@pytest.mark.parametrize("how", ["dtype", "length", "offsets"])
def test_checkpoint_header_damaged_with_a_matching_hash(art, tmp_path, place, how):
    edge = copy_tree(art / "edge", tmp_path / "edge")
    _damage_header(edge / "weights.safetensors", how)
    _rehash(edge)
    fails_cleanly(cli("export", "--edge", edge, "--out", place.path / "x", "--quiet"), "the checkpoint is corrupt")


def test_byo_checkpoint_header_damaged_with_a_matching_hash(art, tmp_path, place):
    ckpt = _byo_checkpoint(art, tmp_path / "byo")
    _damage_header(ckpt / "weights.safetensors", "dtype")
    _rehash(ckpt)
    fails_cleanly(cli("export", "--edge", ckpt, "--out", place.path / "x", "--quiet", path=[art / "byo"]),
                  "the checkpoint is corrupt")


def test_byo_weights_with_a_damaged_header(art, tmp_path, place):
    w = tmp_path / "w.safetensors"
    w.write_bytes((art / "byo" / "good.safetensors").read_bytes())
    _damage_header(w, "dtype")
    fails_cleanly(cli(*BYO, "--weights", w, "--out", place.path / "c", path=[art / "byo"]),
                  "not a readable safetensors file", "Q99")


# ---------------------------------------------------------------------------------------- the trust list

def test_trust_list_left_in_the_cache_is_not_honoured(art, tmp_path, place, monkeypatch):
    """A trusted-factories.json in the (shared) cache, where earlier versions kept it, trusts nothing:
    the refusal says so and how to trust the factory again. The factory is never imported."""
    mods = tmp_path / "mods"
    mods.mkdir()
    marker = tmp_path / "RAN"
    (mods / "cached_trust.py").write_text(f"def build(**kw):\n    open({str(marker)!r}, 'w').close()\n")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "trusted-factories.json").write_text(json.dumps({"factories": ["cached_trust:build"]}))
    monkeypatch.setenv("HETERO_CACHE", str(cache))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    ckpt = copy_tree(art / "cloud", tmp_path / "c")
    resave_meta(ckpt, lambda m: m.update(model={"backbone": "cached_trust:build", "dim": 16, "kind": "factory",
                                                 "backbone_kwargs": {}}))
    fails_cleanly(cli("export", "--edge", ckpt, "--out", place.path / "x", "--quiet", path=[mods]),
                  "cached_trust:build", "no longer honoured", "re-run import-cloud", str(tmp_path / "config"))
    assert not marker.exists() and not (tmp_path / "config").exists()


# ------------------------------------------------------------------------------------ Fashion-MNIST download

def test_download_that_is_not_the_published_file(art, tmp_path, place, monkeypatch):
    """No Fashion-MNIST here, so `train-cloud` downloads it, from a mirror on 127.0.0.1 serving files of
    the published sizes but other bytes: refused by the pinned sha256, nothing left in HOME."""
    from hetero.data import fashion_mnist as fm

    mirror = Server()
    mirror.files = {f"/fm/{name}.gz": b"\0" * size for name, (_, size, _) in fm.SHA256.items()}
    try:
        home = isolate(monkeypatch, tmp_path, mirror.url)
        fails_cleanly(cli("train-cloud", "--out", place.path / "c", *TINY_TRAIN),
                      "train-images-idx3-ubyte.gz has sha256", "not the published 3aede38d61863908")
    finally:
        mirror.close()
    assert not home.exists()

"""Bad input, as a user types it: every case runs ``hetero ...`` (or the torch-free ``python -m devices
run``) and must print exactly one ``error: ...`` line on stderr, no traceback, exit non-zero, and leave
nothing behind (``--out`` absent or unchanged, no temp directory beside it). A few inputs must *work*
(mixed image sizes and modes).

Cases run in this process through the CLI's ``main(argv)`` (a traceback there is an exception the test
sees) unless they need a real process: signals, the full-disk shim where tmpfs cannot be mounted, a
module that must not be imported into the test process (an untrusted factory). The expensive artifacts
(two clouds, an edge, an ONNX + Core ML export) are built once per module.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from clitest import other_space_cloud

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["--model", "test_resnet", "--epochs", "1", "--batch-size", "16", "--dim", "8", "--limit", "64", "--quiet"]

# Injected into the child processes through PYTHONPATH: a marker file on the first optimizer step (so
# a signal is sent once training really runs) and, where tmpfs cannot be mounted, ENOSPC on writes.
SHIM = r'''
import os
if os.environ.get("HETERO_TEST_MARK"):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    def _mark(opt, args, kwargs):
        open(os.environ["HETERO_TEST_MARK"], "a").close()

    register_optimizer_step_pre_hook(_mark)
if os.environ.get("HETERO_TEST_ENOSPC"):
    import builtins, errno
    _root, _open, _osopen = os.environ["HETERO_TEST_ENOSPC"], builtins.open, os.open

    def _full(path):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def _under(path):
        return not isinstance(path, int) and os.path.abspath(os.fspath(path)).startswith(_root)

    def open_(file, mode="r", *a, **k):
        if _under(file) and any(c in mode for c in "wax+"):
            raise _full(file)
        return _open(file, mode, *a, **k)

    def osopen(path, flags, *a, **k):
        if _under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise _full(path)
        return _osopen(path, flags, *a, **k)

    builtins.open, os.open = open_, osopen
    import safetensors.torch as _st
    _save = _st.save_file

    def save_file(tensors, filename, *a, **k):
        if _under(filename):
            raise _full(filename)
        return _save(tensors, filename, *a, **k)

    _st.save_file = save_file
'''


# ------------------------------------------------------------------------------------------- helpers

def _env(extra: dict[str, str] | None = None, shim: Path | None = None) -> dict[str, str]:
    path = [str(shim)] if shim else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([*path, str(REPO)])}
    env.pop("HETERO_TEST_MARK", None)
    env.pop("HETERO_TEST_ENOSPC", None)
    return {**env, **(extra or {})}


def cli(*argv, module: str = "hetero", cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 120, path: Sequence[Path] = ()) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGV``: in this process through ``main(argv)``, with ``path`` on sys.path,
    or in a child process when it needs its own environment (``env``) or working directory."""
    if env is not None or cwd is not None:
        return subprocess.run([sys.executable, "-m", module, *map(str, argv)], capture_output=True, text=True,
                              cwd=cwd, env=env, timeout=timeout)
    if module == "hetero":
        from hetero.cli import main
    else:
        from devices.__main__ import main
    out, err = io.StringIO(), io.StringIO()
    sys.path[:0] = map(str, path)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 2
    finally:
        del sys.path[:len(path)]
    return subprocess.CompletedProcess([module, *map(str, argv)], code, out.getvalue(), err.getvalue())


def listing(d: Path) -> dict[str, str]:
    """Every path under ``d`` with a digest of its content: 'unchanged' means byte for byte."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "other"
    return out


def fails_cleanly(p: subprocess.CompletedProcess, *words: str, code: int = 2) -> str:
    """Exactly one ``error:`` line on stderr, no traceback, the expected exit status."""
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert p.returncode == code, (p.returncode, p.stderr)
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def place(tmp_path):
    """A directory for one case's output; on exit, nothing may have appeared in it but what the
    case declared (``place.allow``)."""
    d = tmp_path / "place"
    d.mkdir()

    class Place:
        path = d
        allow: set[str] = set()

    before = listing(d)
    yield Place
    after = {k: v for k, v in listing(d).items() if k.split("/")[0] not in Place.allow}
    assert after == before, f"left behind: {sorted(set(after) - set(before))}"


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def art(saved, tmp_path_factory):
    """The conftest's tiny cloud and edge, another cloud (its own space), an export with ONNX and
    Core ML FP16, data folders, BYO weights and the child-process shim."""
    from export import export_checkpoint
    from hetero.checkpoint import load_checkpoint

    root = tmp_path_factory.mktemp("bad-inputs")
    for name in ("cloud", "edge"):
        shutil.copytree(saved / name, root / name)
    other_space_cloud(root / "cloud", root / "cloud2")
    export_checkpoint(load_checkpoint(root / "edge"), root / "export", name="edge", formats=("onnx", "coreml-fp16"))
    (root / "shim").mkdir()
    (root / "shim" / "sitecustomize.py").write_text(SHIM)
    _image_folders(root)
    _byo_files(root)
    return root


def _image_folders(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    modes = ["RGB", "L", "P", "RGBA", "LA", "1", "I;16", "CMYK"]
    for split, n in (("train", 12), ("test", 4)):
        for c in range(2):
            d = root / "mixed" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                w, h = (int(v) for v in rng.integers(12, 48, 2))
                rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                mode = modes[(i + c) % len(modes)]
                im = Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 250) if mode == "I;16" else rgb.convert(mode)
                im.save(d / f"{i}.{'jpg' if mode == 'CMYK' else 'png'}")
            (d / "README.txt").write_text("not an image: ignored")  # non-image files are skipped
    (root / "mixed" / "train" / "class1" / ".DS_Store").write_bytes(b"\0\1\2")
    shutil.copytree(root / "mixed", root / "truncated")
    png = (root / "mixed" / "train" / "class0" / "0.png").read_bytes()
    (root / "truncated" / "train" / "class0" / "0.png").write_bytes(png[: len(png) // 2])
    shutil.copytree(root / "mixed", root / "textjpg")
    (root / "textjpg" / "train" / "class1" / "photo.jpg").write_text("this is a text file, not a JPEG")
    (root / "empty").mkdir()


class _Evil:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _byo_files(root: Path) -> None:
    import pickle

    import torch
    from safetensors.torch import save_file

    (root / "byo").mkdir()
    (root / "byo" / "tinybyo.py").write_text(
        "import torch\n\ndef make(dim=8):\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), "
        "torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, dim))\n")
    sys.path.insert(0, str(root / "byo"))
    try:
        import tinybyo
    finally:
        sys.path.remove(str(root / "byo"))
    state = {k: v.contiguous() for k, v in tinybyo.make().state_dict().items()}
    save_file(state, str(root / "byo" / "good.safetensors"))
    good = (root / "byo" / "good.safetensors").read_bytes()
    (root / "byo" / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    nan = {k: v.clone() for k, v in state.items()}
    nan["0.weight"][0, 0, 0, 0] = float("nan")
    save_file(nan, str(root / "byo" / "nan.safetensors"))
    marker = root / "byo" / "PWNED"
    torch.save({**state, "extra": _Evil(marker)}, root / "byo" / "evil.pt")  # torch zip format
    with open(root / "byo" / "evil_legacy.pt", "wb") as f:  # a bare pickle stream
        pickle.dump(_Evil(marker), f)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _edit_json(path: Path, fn) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def _rehash(export: Path, name: str) -> None:
    """Record the current sha256 of ``name`` in the manifest: the damage is then past the hash check."""
    from devices.artifact import sha256_path

    _edit_json(export / "manifest.json",
               lambda m: [a.update(sha256=sha256_path(export / name)) for a in m["artifacts"] if a.get("file") == name])


def _resave_meta(ckpt: Path, fn) -> None:
    _edit_json(ckpt / "hetero.json", fn)


# --------------------------------------------------------------------------------------- checkpoints

def test_truncated_weights(art, tmp_path, place):
    edge = _copy(art / "edge", tmp_path / "edge")
    w = (edge / "weights.safetensors").read_bytes()
    (edge / "weights.safetensors").write_bytes(w[: len(w) // 3])
    fails_cleanly(cli("export", "--edge", edge, "--out", place.path / "x", "--quiet"), "sha256")


def test_truncated_weights_with_a_matching_hash(art, tmp_path, place):
    """Damage past the hash check (someone re-recorded it): safetensors refuses, one line."""
    edge = _copy(art / "edge", tmp_path / "edge")
    w = (edge / "weights.safetensors").read_bytes()
    (edge / "weights.safetensors").write_bytes(w[: len(w) // 3])
    _resave_meta(edge, lambda m: m.update(weights_sha256=hashlib.sha256(w[: len(w) // 3]).hexdigest()))
    fails_cleanly(cli("export", "--edge", edge, "--out", place.path / "x", "--quiet"), "corrupt")


def test_truncated_checkpoint_json(art, tmp_path, place):
    edge = _copy(art / "edge", tmp_path / "edge")
    (edge / "hetero.json").write_text((edge / "hetero.json").read_text()[:150])
    fails_cleanly(cli("export", "--edge", edge, "--out", place.path / "x", "--quiet"), "not valid JSON")


def test_checkpoint_json_of_wrong_types(art, tmp_path, place):
    edge = _copy(art / "edge", tmp_path / "edge")
    _resave_meta(edge, lambda m: m.update(model="resnet", preprocess={"size": "big"}))
    fails_cleanly(cli("export", "--edge", edge, "--out", place.path / "x", "--quiet"))


def test_checkpoint_weights_with_nan(art, tmp_path, place):
    """Consistent hashes and fingerprint, but a NaN weight (a diverged run): refused on load."""
    import torch

    from hetero.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(art / "edge")
    with torch.no_grad():
        next(ckpt.model.parameters()).view(-1)[0] = float("nan")
    save_checkpoint(ckpt, tmp_path / "edge")
    fails_cleanly(cli("export", "--edge", tmp_path / "edge", "--out", place.path / "x", "--quiet"), "NaN")


@pytest.mark.parametrize("factory, kwargs", [("os:system", "command"), ("subprocess:getoutput", "cmd")])
def test_checkpoint_naming_a_dangerous_factory(art, tmp_path, place, factory, kwargs):
    """A BYO checkpoint's hetero.json names module:callable(**kwargs); one handed over must not get
    to run a shell command when loaded (the weights hash is the attacker's to re-record)."""
    ckpt = _copy(art / "cloud", tmp_path / "c")
    marker = tmp_path / "PWNED"
    _resave_meta(ckpt, lambda m: m.update(model={"backbone": factory, "dim": 16, "kind": "factory",
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
    ckpt = _copy(art / "cloud", tmp_path / "c")
    _resave_meta(ckpt, lambda m: m.update(model={"backbone": "sender_models:build", "dim": 16, "kind": "factory",
                                                 "backbone_kwargs": {}}))
    env = _env({"PYTHONPATH": os.pathsep.join([str(mod), str(REPO)])})
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
    x = _copy(art / "export", tmp_path / "x")
    (x / "edge.onnx").write_bytes((x / "edge.onnx").read_bytes()[:3000])
    fails_cleanly(_bench(x), "sha256")
    _rehash(x, "edge.onnx")  # past the hash: onnxruntime cannot parse it
    fails_cleanly(_bench(x), "cannot load")


def test_corrupt_mlpackage(art, tmp_path):
    x = _copy(art / "export", tmp_path / "x")
    model = next((x / "edge.fp16.mlpackage").rglob("model.mlmodel"))
    model.write_bytes(b"\x08\x07garbage" * 10)
    coreml = ("--runtime", "coreml-interp", "--format", "coreml")
    fails_cleanly(_bench(x, *coreml), "sha256")
    _rehash(x, "edge.fp16.mlpackage")
    fails_cleanly(_bench(x, *coreml), "edge.fp16.mlpackage")


def test_mlpackage_with_a_link_out_of_the_export(art, tmp_path):
    """A symlink inside the package, hash re-recorded by whoever planted it: refused before reading."""
    x = _copy(art / "export", tmp_path / "x")
    weight = next((x / "edge.fp16.mlpackage").rglob("weight.bin"))
    (tmp_path / "elsewhere.bin").write_bytes(weight.read_bytes())
    weight.unlink()
    weight.symlink_to(tmp_path / "elsewhere.bin")
    _rehash(x, "edge.fp16.mlpackage")
    fails_cleanly(_bench(x, "--runtime", "coreml-interp", "--format", "coreml"), "links outside the export directory")


def test_truncated_manifest(art, tmp_path):
    x = _copy(art / "export", tmp_path / "x")
    (x / "manifest.json").write_text((x / "manifest.json").read_text()[:200])
    fails_cleanly(_bench(x), "not valid JSON")


@pytest.mark.parametrize("where", ["dotdot", "absolute", "symlink"])
def test_manifest_path_outside_its_directory(art, tmp_path, where):
    x = _copy(art / "export", tmp_path / "x")
    secret = tmp_path / "secret.onnx"
    shutil.copy(x / "edge.onnx", secret)
    name = {"dotdot": "../secret.onnx", "absolute": str(secret), "symlink": "link.onnx"}[where]
    if where == "symlink":
        (x / "link.onnx").symlink_to(secret)
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    _edit_json(x / "manifest.json", lambda m: m["artifacts"][0].update(file=name, sha256=digest))
    fails_cleanly(_bench(x), "escapes" if where != "absolute" else "invalid artifact path")


@pytest.mark.parametrize("damage, words", [
    (lambda m: m["artifacts"][0].pop("input"), "no input name"),
    (lambda m: m["artifacts"][0]["input"].update(shape=["batch", "one", 28, 28]), "input shape"),
    (lambda m: m.update(dim="big"), "dim"),
    (lambda m: m["artifacts"][0].update(format=["onnx"]), "no format"),
], ids=["no-input", "shape", "dim", "format"])
def test_manifest_of_wrong_structure(art, tmp_path, damage, words):
    x = _copy(art / "export", tmp_path / "x")
    _edit_json(x / "manifest.json", damage)
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


# ------------------------------------------------------------------------------------------ full disk

@pytest.fixture
def full_disk(tmp_path, art):
    """Factory: a directory on a tiny tmpfs (root can mount one here), else one whose writes fail with
    ENOSPC through the child shim. Yields (dir, env)."""
    mounted: list[Path] = []

    def make(size: str) -> tuple[Path, dict[str, str] | None]:
        d = tmp_path / f"full-{size}"
        d.mkdir()
        if os.geteuid() == 0 and shutil.which("mount") and not os.environ.get("HETERO_TEST_NO_TMPFS"):
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
            if r.returncode == 0:
                mounted.append(d)
                return d, None  # a real full disk: the case runs in this process
        return d, _env({"HETERO_TEST_ENOSPC": str(d)}, shim=art / "shim")

    yield make
    for d in mounted:
        subprocess.run(["umount", str(d)], capture_output=True)


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

def _interrupt(argv, started, sig, *, env=None, timeout=120):
    """Run ``hetero argv``, wait until ``started()`` says real work is under way, send ``sig``."""
    # SIGINT at its default in the child, as in a terminal: a shell running the suite in the background
    # (`make test &`) starts it ignored, and Python then never raises KeyboardInterrupt
    p = subprocess.Popen([sys.executable, "-m", "hetero", *map(str, argv)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env or _env(),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + timeout
    while not started() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, f"finished before it could be interrupted: {p.stderr.read()}"
    time.sleep(0.3)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_export_interrupted(art, place, sig):
    out = place.path / "x"
    p = _interrupt(["export", "--edge", art / "edge", "--out", out, "--formats", "onnx,onnx-fp16,coreml-fp16",
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
    env = _env({"HETERO_TEST_MARK": str(mark)}, shim=art / "shim")
    p = _interrupt(["train-cloud", "--out", place.path / "c", "--data", "synthetic", "--model", "test_resnet",
                    "--epochs", "200", "--limit", "256", "--batch-size", "32", "--dim", "8", "--quiet"],
                   mark.exists, getattr(signal, sig), env=env)
    code = {"SIGINT": 130, "SIGTERM": 143}[sig]
    fails_cleanly(p, "interrupted" if sig == "SIGINT" else "terminated (SIGTERM)", code=code)
    assert not (place.path / "c").exists()

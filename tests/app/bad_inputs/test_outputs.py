"""Bad input for outputs: single-file outputs (``bench --json``, ``pack-runner``, the standalone runner's
``--out`` and ``--json``) written over what is not theirs, the caches under ``$HETERO_CACHE`` (a user's
file there, a damaged entry, a planted link, a full disk) and file names no text line can hold.

A single file is written only to a new path or, with ``--overwrite``, over an earlier hetero output of
the same kind, recognised by its content (``devices/outputs.py``); everything else fails in one line
with every user file byte-identical (``fails_cleanly``). The cases that must *work* say what they
leave.
"""
from __future__ import annotations

import errno
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from badinput import cli, fails_cleanly

BENCH = ["--iters", "2", "--warmup", "0", "--batch", "1", "--quiet"]
DEVICES_BENCH = ["--iters", "2", "--warmup", "0", "--batch", "1"]


def bench(art: Path, *extra):
    return cli("bench", art / "export", *BENCH, *extra)


def run(art: Path, *extra):
    return cli("run", art / "export", *extra, module="devices")


def ok(p) -> None:
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr


def fill(d: Path) -> None:
    """Use up every free byte of the (tmpfs) file system at ``d``."""
    with open(d / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


@pytest.fixture
def images(tmp_path) -> Path:
    """A folder of four small images."""
    from PIL import Image

    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return d


# ------------------------------------------------------------------------------ hetero bench --json

@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_bench_json_over_a_users_file(art, tmp_path, overwrite):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    fails_cleanly(bench(art, "--json", notes, *overwrite), str(notes), "holds a file hetero did not write")


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_bench_json_over_a_directory(art, tmp_path, overwrite):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "keep.txt").write_text("precious")
    fails_cleanly(bench(art, "--json", tmp_path / "results", *overwrite), "results is a directory")


def test_bench_json_over_another_kind_of_hetero_json(art, tmp_path):
    """A latency comparison is not a latency JSON, nor the other way round, --overwrite or not."""
    cmp = tmp_path / "cmp.json"
    cmp.write_text(json.dumps({"schema": "hetero-latency-compare/1", "a": {}, "b": {}}))
    fails_cleanly(bench(art, "--json", cmp, "--overwrite"), "holds a hetero latency comparison",
                  "--overwrite replaces only an earlier hetero latency JSON")
    lat = tmp_path / "lat.json"
    lat.write_text(json.dumps({"schema": "hetero-latency/1", "results": []}))
    fails_cleanly(cli("bench", "--compare", art / "export", art / "export", *BENCH, "--json", lat, "--overwrite"),
                  "holds a hetero latency JSON")


def test_bench_json_through_a_link(art, tmp_path):
    (tmp_path / "mine.json").write_text(json.dumps({"schema": "hetero-latency/1"}))
    (tmp_path / "link.json").symlink_to(tmp_path / "mine.json")
    fails_cleanly(bench(art, "--json", tmp_path / "link.json", "--overwrite"), "link.json is a link")


def test_bench_json_replaces_an_earlier_one_only_with_overwrite(art, place):
    lat = place.path / "lat.json"
    ok(bench(art, "--json", lat))
    first = lat.read_bytes()
    fails_cleanly(bench(art, "--json", lat), "already holds a hetero latency JSON; pass --overwrite")
    assert lat.read_bytes() == first
    ok(bench(art, "--json", lat, "--overwrite"))
    assert json.loads(lat.read_text())["schema"] == "hetero-latency/1"
    assert sorted(p.name for p in place.path.iterdir()) == ["lat.json"]  # no temp file left
    place.allow = {"lat.json"}


def test_bench_json_on_a_full_disk(art, full_disk):
    d, env = full_disk("16k")
    if env is None:
        fill(d)
    fails_cleanly(cli("bench", art / "export", *BENCH, "--json", d / "lat.json", env=env), "no space left")
    assert sorted(p.name for p in d.iterdir()) == (["filler"] if env is None else [])  # no temp file left


# ------------------------------------------------------------------------------------- pack-runner

@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_pack_runner_over_a_users_zip(tmp_path, overwrite):
    mine = tmp_path / "photos.zip"
    with zipfile.ZipFile(mine, "w") as z:
        z.writestr("__main__.py", "print('my own app')\n")
    fails_cleanly(cli("pack-runner", mine, *overwrite), "photos.zip holds a file hetero did not write")


def test_pack_runner_replaces_only_its_own_zip(place):
    z = place.path / "runner.zip"
    ok(cli("pack-runner", z))
    assert zipfile.ZipFile(z).comment == b"hetero-runner/1"
    fails_cleanly(cli("pack-runner", z), "already holds a hetero runner zip; pass --overwrite")
    # one packed before the comment existed is still recognised by its __main__.py
    with zipfile.ZipFile(z, "a") as zz:
        zz.comment = b""
    ok(cli("pack-runner", z, "--overwrite"))
    assert zipfile.ZipFile(z).comment == b"hetero-runner/1"
    assert sorted(p.name for p in place.path.iterdir()) == ["runner.zip"]
    place.allow = {"runner.zip"}


# --------------------------------------------------------------------- python -m devices run / bench

@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_devices_run_over_a_users_npy(art, tmp_path, overwrite):
    x = np.zeros((2, 1, 28, 28), np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "features.npy", np.full((2, 16), 3.0, np.float32))  # float32 [N, dim], but not embeddings
    fails_cleanly(run(art, "--input", tmp_path / "x.npy", "--out", tmp_path / "features.npy", *overwrite),
                  "features.npy holds a file hetero did not write")
    fails_cleanly(run(art, "--input", tmp_path / "x.npy", "--out", tmp_path / "x.npy", *overwrite),  # its own input
                  "x.npy holds a file hetero did not write")


def test_devices_run_beside_a_users_txt(art, tmp_path, images):
    (tmp_path / "emb.txt").write_text("my notes\n")
    fails_cleanly(run(art, "--input", images, "--out", tmp_path / "emb.npy", "--overwrite"),
                  "emb.txt holds a file hetero did not write", "not the image list of an earlier run's emb.npy")


def test_devices_run_replaces_its_own_pair_only_with_overwrite(art, images, place):
    out = place.path / "emb.npy"
    ok(run(art, "--input", images, "--out", out))
    assert len((place.path / "emb.txt").read_text().splitlines()) == len(np.load(out)) == 4
    fails_cleanly(run(art, "--input", images, "--out", out), "already holds a hetero runner embeddings")
    ok(run(art, "--input", images, "--out", out, "--overwrite"))
    # a .npy batch in: no image list; the earlier run's list would describe rows that are gone, so it goes
    np.save(images / "x.npy", np.zeros((3, 1, 28, 28), np.float32))
    ok(run(art, "--input", images / "x.npy", "--out", out, "--overwrite"))
    assert np.load(out).shape == (3, 16) and sorted(p.name for p in place.path.iterdir()) == ["emb.npy"]
    place.allow = {"emb.npy"}


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_devices_bench_json_over_a_users_file(art, tmp_path, overwrite):
    (tmp_path / "lat.json").write_text("my latency notes\n")
    fails_cleanly(cli("bench", art / "export", *DEVICES_BENCH, "--json", tmp_path / "lat.json", *overwrite,
                      module="devices"), "lat.json holds a file hetero did not write")


def test_devices_run_names_with_newlines_and_bytes_that_are_not_utf8(art, tmp_path, images, place):
    """Each image name on one line of the .txt (quoted where it must be), aligned with the rows; the
    .txt reads back as a list file naming the same images in the same order."""
    names = ["a\nb.png", os.fsdecode(b"caf\xe9.png"), ' "quoted".png', "plain.png"]
    for i, name in enumerate(names):
        os.replace(images / f"{i}.png", images / name)
    out = place.path / "emb.npy"
    ok(run(art, "--input", images, "--out", out))
    lines = (place.path / "emb.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(np.load(out)) == 4
    order = sorted(names)  # directory order: sorted relative paths
    assert lines[order.index("plain.png")] == str(images / "plain.png")  # an ordinary name is written as it is
    assert lines[order.index("a\nb.png")] == '"' + str(images) + '/a\\nb.png"'
    assert lines[order.index(os.fsdecode(b"caf\xe9.png"))] == '"' + str(images) + '/caf\\xe9.png"'
    again = tmp_path / "again.npy"
    ok(run(art, "--input", place.path / "emb.txt", "--out", again))
    np.testing.assert_allclose(np.load(again), np.load(out), rtol=0, atol=1e-6)
    assert (tmp_path / "again.txt").read_bytes() == (place.path / "emb.txt").read_bytes()
    place.allow = {"emb.npy", "emb.txt"}


# ---------------------------------------------------------------------------------------- the caches

def _image_cache_run(folder: Path) -> object:
    return cli("data", "--data", folder)


def test_cache_clear_deletes_only_what_hetero_names(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HETERO_CACHE", str(cache))
    images = cache / "images"
    images.mkdir(parents=True)
    entry = "0123456789abcdef01234567-12x28x28x1-L.npy"
    (images / entry).write_bytes(b"x" * 10)
    (images / "0123456789abcdef01234567.sha256").write_bytes(b"y" * 32)
    live = images / f".{entry}.k2j4x9qa.tmp"  # another run, maybe on another host, still writing
    dead = images / f".{entry}.p0q1r2s3.tmp"
    for f in (live, dead):
        f.write_bytes(b"z")
    old = time.time() - 2 * 3600
    os.utime(dead, (old, old))
    mine = {"notes.npy": b"precious", "photos.sha256": b"mine", "scratch.tmp": b"mine", ".notes.npy.abc.tmp": b"mine"}
    for name, data in mine.items():
        (images / name).write_bytes(data)
        os.utime(images / name, (old, old))
    p = cli("cache", "--clear")
    ok(p)
    assert "deleted 3 decoded-image cache file(s)" in p.stdout
    assert sorted(f.name for f in images.iterdir()) == sorted([*mine, live.name])
    assert all((images / name).read_bytes() == data for name, data in mine.items())


def test_damaged_image_cache_entries_are_rebuilt(art, tmp_path, monkeypatch):
    """A zero-byte decoded-image cache and a cut-short one: one warning line each, deleted, built
    again; the command succeeds."""
    monkeypatch.setenv("HETERO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HETERO_IMAGE_CACHE", "1")
    ok(_image_cache_run(art / "mixed"))
    images = tmp_path / "cache" / "images"
    good = {f.name: f.read_bytes() for f in images.iterdir()}
    npys = sorted(good)
    assert len(npys) == 2 and all(n.endswith(".npy") for n in npys)  # train and test
    (images / npys[0]).write_bytes(b"")
    (images / npys[1]).write_bytes(good[npys[1]][:-7])
    p = _image_cache_run(art / "mixed")
    ok(p)
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2 and npys[0] in warnings[0] + warnings[1] and "zero bytes" in warnings[0] + warnings[1], \
        p.stderr
    assert {f.name: f.read_bytes() for f in images.iterdir()} == good  # rebuilt: the same pixels and hashes


def test_zero_byte_target_cache_entry_is_rebuilt(art, tmp_path, monkeypatch, place):
    """evaluate's cached embeddings: a zero-byte entry (a power cut before the data reached the disk)
    and a cut-short one are deleted with a warning and computed again."""
    monkeypatch.setenv("HETERO_CACHE", str(tmp_path / "cache"))
    common = ["evaluate", "--cloud", art / "cloud", "--edge", art / "edge", "--data", "synthetic", "--quiet"]
    ok(cli(*common, "--out", place.path / "r1"))
    targets = sorted((tmp_path / "cache" / "targets").iterdir())
    good = {f: np.load(f) for f in targets}
    targets[0].write_bytes(b"")
    targets[1].write_bytes(targets[1].read_bytes()[:200])
    p = cli(*common, "--out", place.path / "r2")
    ok(p)
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2 and "zero bytes" in warnings[0] + warnings[1], p.stderr
    assert sorted((tmp_path / "cache" / "targets").iterdir()) == targets
    for f, emb in good.items():
        np.testing.assert_allclose(np.load(f), emb, rtol=0, atol=1e-5)
    place.allow = {"r1", "r2"}


def test_a_link_planted_at_a_temp_path_is_never_followed(art, tmp_path, monkeypatch):
    """Temp files were named by PID, so anyone who could write the cache could plant a link there and
    have the next run truncate the file it points to. They are unique and exclusive now."""
    monkeypatch.setenv("HETERO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HETERO_IMAGE_CACHE", "1")
    ok(_image_cache_run(art / "mixed"))
    images = tmp_path / "cache" / "images"
    names = sorted(f.name for f in images.iterdir())
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    ok(cli("cache", "--clear"))
    for name in names:  # the names the old writer would have opened, following the link
        (images / f".{name}.{os.getpid()}.tmp").symlink_to(victim)
    ok(_image_cache_run(art / "mixed"))
    assert victim.read_text() == "precious"
    assert sorted(f.name for f in images.iterdir() if not f.is_symlink()) == names


def test_full_disk_while_caching_embeddings(art, full_disk, monkeypatch, place):
    """The cached embeddings cannot be written: one line, and no temp file left in the cache."""
    d, env = full_disk("64k")
    (d / "targets").mkdir()
    if env is None:
        fill(d)
        monkeypatch.setenv("HETERO_CACHE", str(d))
    else:
        env = {**env, "HETERO_CACHE": str(d)}
    fails_cleanly(cli("evaluate", "--cloud", art / "cloud", "--edge", art / "edge", "--data", "synthetic",
                      "--out", place.path / "rep", "--quiet", env=env), "no space left")
    assert list((d / "targets").iterdir()) == []

"""Streamed ImageFolders: decoded per batch (in workers or not), cached decoded images, digests, errors."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hetero.data import ImageSet, Preprocess, iterate_batches, load_image_folder
from hetero.data import folder_images as lazy_mod
from hetero.data._decode import load_one
from hetero.data.folder_images import FolderImages
from hetero.data.image_folder import _images_in
from hetero.errors import HeteroError

ROOT = Path(__file__).resolve().parents[2]
RGB3 = Preprocess(12, 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def make_folder(root: Path, n: int = 11, seed: int = 0) -> Path:
    """Three classes of mixed sizes, modes and formats (PNG L/RGB/RGBA/P/LA, JPEG, BMP)."""
    rng = np.random.default_rng(seed)
    modes = ["RGB", "L", "RGBA", "P", "LA", "RGB"]
    for c in range(3):
        for i in range(n):
            h, w = rng.integers(5, 30, 2)
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            im = Image.fromarray(arr)
            mode = modes[(c + i) % len(modes)]
            im = im.convert(mode) if mode != "P" else im.quantize(16)
            ext = ".jpg" if i % 4 == 3 and mode in ("RGB", "L") else ".bmp" if i % 7 == 6 and mode == "RGB" else ".png"
            p = root / f"class{c}" / f"{i:02d}{ext}"
            p.parent.mkdir(parents=True, exist_ok=True)
            im.save(p)
    return root


def eager_reference(root: Path, split: str, size: int, channels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The pre-streaming loader, brute force: decode every file of the split, then pick channels."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    arrays, labels, colour = [], [], False
    for k, c in enumerate(classes):
        files = _images_in(root / c)
        for i, f in enumerate(files):
            if (i % 5 == 4) == (split == "test"):
                arr, col = load_one(f, size, channels)
                arrays.append(arr)
                labels.append(k)
                colour |= col
    images = np.stack(arrays)
    if channels is None and not colour:
        images = np.ascontiguousarray(images[..., :1])
    return images, np.array(labels)


@pytest.fixture()
def folder(tmp_path):
    return make_folder(tmp_path / "imgs")


@pytest.fixture()
def no_decode(monkeypatch):
    """Make any decode of an image file fail, to prove a path reads none."""
    def boom(*a, **k):
        raise AssertionError("decoded an image")
    monkeypatch.setattr(lazy_mod, "load_one", boom)


@pytest.mark.parametrize("size,channels", [(12, None), (7, 1), (16, 3)])
def test_lazy_set_is_byte_identical_to_eager_loader(folder, size, channels):
    for split in ("train", "test"):
        ref, labels = eager_reference(folder, split, size, channels)
        ds = load_image_folder(folder, split, size=size, channels=channels, progress=False)
        assert ds.lazy and isinstance(ds.images, FolderImages) and ds.images.shape == ref.shape
        assert ds.labels.tolist() == labels.tolist() and ds.classes == ("class0", "class1", "class2")
        np.testing.assert_array_equal(np.asarray(ds.images), ref)
        np.testing.assert_array_equal(ds.images[2], ref[2])
        np.testing.assert_array_equal(ds.images[-1, 3, :, 0], ref[-1, 3, :, 0])
        np.testing.assert_array_equal(ds.images[1:5, ..., 0], ref[1:5, ..., 0])
        np.testing.assert_array_equal(ds.images[[4, 0, 4]], ref[[4, 0, 4]])
        np.testing.assert_array_equal(ds.subset([5, 1]).images[1], ref[1])
        eager = load_image_folder(folder, split, size=size, channels=channels, progress=False, lazy=False)
        assert not eager.lazy and np.array_equal(eager.images, ref)


def test_auto_channels_reads_headers_and_decodes_only_until_colour(tmp_path, monkeypatch):
    grey = tmp_path / "grey"
    for i in range(4):  # grey content in RGB mode: must be decoded to know, and stays 1 channel as before
        (grey / "a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 6), (i * 9,) * 3).save(grey / "a" / f"{i}.png")
    ds = load_image_folder(grey, "train", size=4, progress=False)
    assert ds.channels == 1 and np.array_equal(np.asarray(ds.images), eager_reference(grey, "train", 4, None)[0])
    calls = []
    real = load_one
    monkeypatch.setattr("hetero.data.image_folder.load_one", lambda *a: calls.append(a[0]) or real(*a))
    mixed = tmp_path / "mixed"
    for i in range(8):
        (mixed / "a").mkdir(parents=True, exist_ok=True)
        Image.new("L" if i < 3 else "RGB", (5, 5), 7 if i < 3 else (200, 10, 10)).save(mixed / "a" / f"{i}.png")
    assert load_image_folder(mixed, "train", size=4, progress=False).channels == 3
    assert [Path(p).name for p in calls] == ["3.png"]  # L files by header, then the first RGB file


def test_embeddings_and_batches_identical_to_in_memory(folder):
    from hetero.embed import embed_images
    from hetero.models import ModelSpec, create_embedding_model

    torch.manual_seed(0)
    model = create_embedding_model(ModelSpec("test_mobilenet", 8), 3)
    lazy = load_image_folder(folder, "train", size=12, channels=3, progress=False)
    mem = ImageSet(np.asarray(lazy.images), lazy.labels, lazy.classes, "mem")
    ref = embed_images(model, mem, RGB3, batch_size=5, progress=False)
    for workers in (0, 2):
        got = embed_images(model, lazy, RGB3, batch_size=5, progress=False, num_workers=workers)
        np.testing.assert_array_equal(got, ref)
    # shuffled + augmented, and explicit indices: the same batches whatever the number of workers
    idx = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5])
    for kw in ({"shuffle": True, "seed": 3, "augment": True, "drop_last": True}, {"indices": idx}):
        want = list(iterate_batches(mem, RGB3, 4, **kw))
        for workers in (0, 1, 2):
            got = list(iterate_batches(lazy, RGB3, 4, num_workers=workers, **kw))
            assert len(got) == len(want)
            for (x, y, i), (x2, y2, i2) in zip(got, want):
                assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(i, i2)
    with pytest.raises(HeteroError, match="num_workers"):
        iterate_batches(lazy, RGB3, 4, num_workers=-1)


def test_lazy_conform_decodes_originals_and_subsets_compose(folder):
    ds = load_image_folder(folder, "train", size=20, progress=False)
    small = ds.conform(Preprocess(9, 1, (0.5,), (0.5,)))
    assert small.lazy and small.images.shape == (len(ds), 9, 9, 1) and small.labels is ds.labels
    np.testing.assert_array_equal(np.asarray(small.images), eager_reference(folder, "train", 9, 1)[0])
    sub = ds.subset(np.array([7, 2, 5])).subset([2, 0])
    np.testing.assert_array_equal(np.asarray(sub.images), np.asarray(ds.images)[[5, 7]])
    assert sub.labels.tolist() == ds.labels[[5, 7]].tolist()
    assert ds.subset(4).images.shape[0] == 4 and ds.conform(Preprocess(20, ds.channels, (0.5,) * ds.channels,
                                                                       (0.5,) * ds.channels)) is ds


def test_digest_is_content_based_and_cheap(tmp_path, folder, no_decode, monkeypatch):
    from hetero.data import _image_cache

    def tree(root):
        return load_image_folder(root, "train", size=12, channels=3, progress=False)  # channels given: no decode

    ds = tree(folder)
    d = ds.digest()
    assert ds.digest() == d and tree(folder).digest() == d  # memoised, and stable across loads
    # the per-file hashes are kept on disk: a reload of the same files reads no image file
    with monkeypatch.context() as m:
        m.setattr(_image_cache, "_sha256_file", lambda p: (_ for _ in ()).throw(AssertionError("hashed")))
        assert tree(folder).digest() == d
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)  # new paths and mtimes, same bytes: same digest (cached targets still apply)
    for p in moved.rglob("*.png"):
        os.utime(p, ns=(1, 1))
    assert tree(moved).digest() == d
    assert load_image_folder(folder, "train", size=13, channels=3, progress=False).digest() != d
    assert ds.subset([0, 1]).digest() == tree(folder).subset(2).digest() != ds.subset([1, 0]).digest()
    victim = sorted((moved / "class1").glob("*.png"))[0]
    Image.new("RGB", (5, 5), (1, 2, 3)).save(victim)
    assert tree(moved).digest() != d


def cache_files() -> list[Path]:
    from hetero.data._image_cache import images_dir

    return sorted(images_dir().glob("*.npy")) if images_dir().is_dir() else []


def test_image_cache_hit_miss_and_invalidation(tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_CACHE", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "imgs")
    ref = eager_reference(root, "train", 10, None)[0]
    ds = load_image_folder(root, "train", size=10, cache=True, progress=False)  # miss: decodes and writes
    (path,) = cache_files()
    assert ds.images.cache_path == path and np.array_equal(np.asarray(ds.images), ref)
    assert path.stat().st_size == 128 + ref.size and np.array_equal(np.load(path), ref)  # a plain .npy
    with monkeypatch.context() as m:  # hit: nothing decoded, rows read from the file, in any order
        m.setattr(lazy_mod, "load_one", lambda *a: (_ for _ in ()).throw(AssertionError("decoded")))
        hit = load_image_folder(root, "train", size=10, cache=True, progress=False)
        assert hit.images.cache_path == path
        np.testing.assert_array_equal(hit.images[[6, 2, 3, 4, 0]], ref[[6, 2, 3, 4, 0]])
        x = torch.cat([b[0] for b in iterate_batches(hit, Preprocess(10, 3, (0,) * 3, (1,) * 3), 4, num_workers=2)])
        np.testing.assert_allclose(x.numpy(), ref.transpose(0, 3, 1, 2) / np.float32(255))
    monkeypatch.setenv("HETERO_IMAGE_CACHE", "1")  # the env switch; conform caches the new size as well
    small = load_image_folder(root, "train", size=10, progress=False).conform(Preprocess(6, 3, (0,) * 3, (1,) * 3))
    assert len(cache_files()) == 2 and small.images.cache_path in cache_files()
    np.testing.assert_array_equal(np.asarray(small.images), eager_reference(root, "train", 6, 3)[0])
    monkeypatch.delenv("HETERO_IMAGE_CACHE")
    victim = sorted((root / "class2").glob("*.png"))[0]  # a changed file: new key, a new cache with its pixels
    Image.new("RGB", (3, 3), (250, 0, 0)).save(victim)
    changed = load_image_folder(root, "train", size=10, cache=True, progress=False)
    assert changed.images.cache_path not in (path, small.images.cache_path)
    np.testing.assert_array_equal(np.asarray(changed.images), eager_reference(root, "train", 10, None)[0])
    assert not load_image_folder(root, "train", size=10, progress=False).images.cache_path  # off by default


def test_half_written_cache_is_never_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_CACHE", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "imgs")
    ref = eager_reference(root, "train", 10, None)[0]
    # an exception mid-write (^C): no file under the final name, no temp left behind
    with monkeypatch.context() as m:
        real, n = lazy_mod.load_one, [0]

        def interrupted(*a):
            n[0] += 1
            if n[0] > 5:
                raise KeyboardInterrupt
            return real(*a)

        m.setattr(lazy_mod, "load_one", interrupted)
        with pytest.raises(KeyboardInterrupt):
            load_image_folder(root, "train", size=10, cache=True, num_workers=0, progress=False)
    from hetero.data._image_cache import images_dir

    assert list(images_dir().iterdir()) == []
    # a truncated file under the final name (a copy cut short): rejected by its length, rebuilt
    ds = load_image_folder(root, "train", size=10, cache=True, progress=False)
    path = ds.images.cache_path
    path.write_bytes(path.read_bytes()[:-100])
    again = load_image_folder(root, "train", size=10, cache=True, progress=False)
    assert again.images.cache_path == path and np.array_equal(np.asarray(again.images), ref)
    assert path.stat().st_size == 128 + ref.size


def test_cache_writer_killed_by_sigkill_is_not_trusted(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    root = make_folder(tmp_path / "imgs")
    script = (
        "import time, hetero.data.folder_images as L\n"
        "real = L.load_one\n"
        "L.load_one = lambda *a: (time.sleep(0.05), real(*a))[1]\n"
        "from hetero.data import load_image_folder\n"
        f"load_image_folder({str(root)!r}, 'train', size=10, cache=True, num_workers=0, progress=False)\n"
    )
    env = {**os.environ, "HETERO_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.time() + 60
        while not list((cache / "images").glob(".*.tmp")) and time.time() < deadline:
            assert proc.poll() is None, "the writer finished before it could be killed"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert list((cache / "images").glob("*.npy")) == []  # only the temp file, which no reader looks at
    (dead,) = (cache / "images").glob(".*.tmp")
    monkeypatch.setenv("HETERO_CACHE", str(cache))
    ds = load_image_folder(root, "train", size=10, cache=True, progress=False)
    np.testing.assert_array_equal(np.asarray(ds.images), eager_reference(root, "train", 10, None)[0])
    # a young temp file may be another host's live writer (the cache can be shared): it stays, whatever
    # its name says; once an hour old it is a dead writer's and goes with the next write
    assert sorted(p.name for p in (cache / "images").iterdir()) == sorted([dead.name, ds.images.cache_path.name])
    old = time.time() - 2 * 3600
    os.utime(dead, (old, old))
    ds.images.cache_path.unlink()
    ds = load_image_folder(root, "train", size=10, cache=True, progress=False)
    assert [p.name for p in (cache / "images").iterdir()] == [ds.images.cache_path.name]  # the dead temp is gone


def test_damaged_file_hash_memo_is_deleted_with_a_warning_and_rebuilt(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HETERO_CACHE", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "imgs")
    d = load_image_folder(root, "train", size=10, channels=3, progress=False).digest()
    (memo,) = (tmp_path / "cache" / "images").glob("*.sha256")
    good = memo.read_bytes()
    capsys.readouterr()
    for damaged in (b"", good[:-5]):  # zero bytes (a power cut), cut short
        memo.write_bytes(damaged)
        assert load_image_folder(root, "train", size=10, channels=3, progress=False).digest() == d
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("warning: file-hash cache") and memo.name in line and "damaged" in line
        assert memo.read_bytes() == good


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_file_is_one_line_error_naming_it(tmp_path, workers):
    from hetero.embed import embed_images
    from hetero.models import ModelSpec, create_embedding_model

    root = make_folder(tmp_path / "imgs")
    junk = root / "class1" / "zz_junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(HeteroError, match=r"zz_junk\.png: cannot read image") as e:  # found when indexing
        load_image_folder(root, "train", progress=False)
    assert "\n" not in str(e.value)
    junk.unlink()
    cut = root / "class2" / "00_cut.png"  # a valid header with the pixel data cut short: found when decoding
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:300])
    ds = load_image_folder(root, "train", size=12, channels=3, progress=False)
    for attempt in (lambda: list(iterate_batches(ds, RGB3, 4, num_workers=workers)),
                    lambda: embed_images(create_embedding_model(ModelSpec("test_mobilenet", 8), 3), ds, RGB3,
                                         batch_size=4, progress=False, num_workers=workers)):
        with pytest.raises(HeteroError, match=r"00_cut\.png: cannot read image .*fix or remove the file") as e:
            attempt()
        assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_loading_everything_into_memory_has_a_limit(folder, monkeypatch):
    ds = load_image_folder(folder, "train", size=12, progress=False)
    monkeypatch.setenv("HETERO_MAX_EAGER_GB", "0.000001")
    with pytest.raises(HeteroError, match=r"too many to load into memory at once; .*HETERO_MAX_EAGER_GB") as e:
        RGB3.apply(ds.images)
    assert "\n" not in str(e.value)
    assert sum(len(b[0]) for b in iterate_batches(ds, RGB3, 4)) == len(ds)  # streaming is not limited
    monkeypatch.setenv("HETERO_NUM_WORKERS", "3")
    assert lazy_mod.default_workers() == 3
    monkeypatch.setenv("HETERO_NUM_WORKERS", "many")
    with pytest.raises(HeteroError, match="HETERO_NUM_WORKERS must be a non-negative integer"):
        lazy_mod.default_workers()


def test_cli_train_export_evaluate_verify_on_streamed_folder(tmp_path, monkeypatch, capsys):
    """The CLI end to end on a streamed ImageFolder, decoded in a worker and cached."""
    from hetero.app.cli import main

    monkeypatch.setenv("HETERO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HETERO_IMAGE_CACHE", "1")
    monkeypatch.setenv("HETERO_NUM_WORKERS", "1")
    rng = np.random.default_rng(0)
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]
    for split, n in (("train", 24), ("test", 8)):
        for c, colour in enumerate(colours):
            d = tmp_path / "folder" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = (rng.integers(0, 60, (18, 22, 3)) + np.array(colour) * rng.uniform(0.6, 1.0)).clip(0, 255)
                Image.fromarray(img.astype(np.uint8)).save(d / f"{i}.{'jpg' if i % 3 else 'png'}")
    data = ["--data", str(tmp_path / "folder")]
    small = ["--epochs", "1", "--batch-size", "16", "--dim", "8", "--quiet"]

    def run(*argv):
        code = main([str(a) for a in argv])
        out = capsys.readouterr()
        assert "Traceback" not in out.err, out.err
        return code, out.out

    assert run("train-cloud", "--out", tmp_path / "c", "--model", "test_resnet", *data, *small)[0] == 0
    assert run("train-edge", "--cloud", tmp_path / "c", "--out", tmp_path / "e", "--model", "test_mobilenet",
               *data, *small)[0] == 0
    assert run("export", "--edge", tmp_path / "e", "--out", tmp_path / "x", "--formats", "onnx", *data, "--quiet")[0] == 0
    code, out = run("evaluate", "--cloud", tmp_path / "c", "--edge", tmp_path / "e", "--artifact", tmp_path / "x",
                    *data, "--quiet")
    assert code == 0 and "onnxruntime" in out
    (tmp_path / "gates.toml").write_text("[all]\ncompatibility_criterion = false\nmax_gap_to_paragon = 1.0\n"
                                         "max_negative_flip_rate = 1.0\n")
    code, out = run("verify", "--manifest", tmp_path / "x", "--cloud", tmp_path / "c", "--edge", tmp_path / "e",
                    *data, "--gates", tmp_path / "gates.toml", "--out", tmp_path / "rep", "--no-latency", "--quiet")
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert code == 0 and rep["verdict"]["passed"] and (tmp_path / "rep" / "report.html").is_file()
    assert len(cache_files()) == 2  # train and test split, decoded once each at 32 px


def test_pixel_stats_streams_and_matches_numpy(folder):
    from hetero.data import pixel_stats

    ds = load_image_folder(folder, "train", size=12, progress=False)
    x = np.asarray(ds.images).reshape(-1, 3).astype("float64") / 255.0
    mean, std = pixel_stats(ds, batch_size=7)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(0), rtol=1e-12)
    mem = ImageSet(np.asarray(ds.images), ds.labels, ds.classes, "mem")
    assert pixel_stats(mem) == pixel_stats(ds)

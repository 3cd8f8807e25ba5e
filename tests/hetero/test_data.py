"""Tests for hetero.data: IDX parsing, preprocessing, ImageFolder, Fashion-MNIST lookup, batching."""
from __future__ import annotations

import gzip
import shutil
import struct
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hetero.data import (
    FASHION_MNIST_PREPROCESS,
    ImageSet,
    Preprocess,
    find_fashion_mnist,
    iterate_batches,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    read_idx,
    synthetic_dataset,
)
from hetero.data import fashion_mnist as fm
from hetero.data.image_folder import split_dirs
from hetero.errors import HeteroError

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")
FM = FASHION_MNIST_PREPROCESS
raises = partial(pytest.raises, HeteroError)


def idx_bytes(arr: np.ndarray, code: int, be: str) -> bytes:
    """Hand-built IDX: magic 00 00 <code> <ndim>, big-endian int32 dims, big-endian data."""
    return struct.pack(f">BBBB{arr.ndim}i", 0, 0, code, arr.ndim, *arr.shape) + arr.astype(be).tobytes()


def write(path: Path, data: bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


CASES = [  # (IDX type code, big-endian dtype, values)
    (0x08, ">u1", np.array([[0, 1, 255], [7, 128, 3]], np.uint8)),
    (0x09, ">i1", np.array([-128, -1, 0, 127], np.int8)),
    (0x0B, ">i2", np.array([[-300, 2], [32767, -32768]], np.int16)),
    (0x0C, ">i4", np.arange(24, dtype=np.int32).reshape(2, 3, 4) * -70001),
    (0x0D, ">f4", np.array([1.5, -2.25, 3e10], np.float32)),
    (0x0E, ">f8", np.array([[np.pi], [-1e-300]])),
]


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("code,be,arr", CASES, ids=[hex(c[0]) for c in CASES])
def test_read_idx_values(tmp_path, code, be, arr, gz):
    out = read_idx(write(tmp_path / "x.idx", idx_bytes(arr, code, be), gz))
    assert out.shape == arr.shape and out.dtype == arr.dtype and out.dtype.byteorder in ("=", "|")
    np.testing.assert_array_equal(out, arr)


def test_read_idx_by_hand_empty_missing(tmp_path):
    raw = b"\x00\x00\x0b\x01" + b"\x00\x00\x00\x02" + b"\x01\x02" + b"\xff\xfe"
    np.testing.assert_array_equal(read_idx(write(tmp_path / "s", raw)), [0x0102, -2])
    empty = idx_bytes(np.zeros((0, 28, 28), np.uint8), 0x08, ">u1")
    assert read_idx(write(tmp_path / "e", empty)).shape == (0, 28, 28)
    with raises(match="no such IDX file"):
        read_idx(tmp_path / "nope")


GOOD = idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4), 0x08, ">u1")
BLOB = gzip.compress(GOOD)


@pytest.mark.parametrize("data,match", [
    (b"\x01\x00" + GOOD[2:], "bad magic"), (b"", "bad magic"),
    (GOOD[:2] + b"\x07" + GOOD[3:], "unknown IDX data type code 0x07"), (GOOD[:10], "truncated IDX header"),
    (GOOD[:-1], "need 12"), (GOOD + b"\x00", "need 12"),
    (gzip.compress(GOOD[:-1]), "need 12"), (BLOB[: len(BLOB) // 2], "truncated gzip"),
], ids=["magic", "empty", "dtype", "header", "short", "long", "gz-short-data", "gz-truncated"])
def test_read_idx_corrupt(tmp_path, data, match):
    p = write(tmp_path / "bad.idx", data)
    with raises(match=match) as e:
        read_idx(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_preprocess_apply_by_hand_and_dict():
    prep = Preprocess(2, 3, (0.5, 0.25, 0.0), (0.5, 2.0, 1.0))
    img = np.array([[[0, 255, 51], [255, 0, 102]], [[51, 51, 51], [204, 153, 0]]], dtype=np.uint8)[None]
    out = prep.apply(img)
    assert out.shape == (1, 3, 2, 2) and out.dtype == np.float32
    for c, y, x in np.ndindex(3, 2, 2):
        assert out[0, c, y, x] == pytest.approx((img[0, y, x, c] / 255.0 - prep.mean[c]) / prep.std[c], abs=1e-6)
    with raises(match=r"\[N, 28, 28, 1\]"):
        FM.apply(np.zeros((2, 28, 28, 3), np.uint8))
    for bad in (np.zeros((2, 28, 28, 1), np.float32), np.zeros((28, 28, 1), np.uint8)):
        with raises(match="uint8"):
            FM.apply(bad)
    p = Preprocess(32, 3, (0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    assert Preprocess.from_dict(p.to_dict()) == p and Preprocess.from_dict(FM.to_dict()) == FM
    for bad in ({"size": 0}, {"channels": 2, "mean": [0, 0], "std": [1, 1]}, {"channels": 3}, {"std": [0]},
                {"mean": ["a"]}, {"extra": 1}):
        with raises():
            Preprocess.from_dict({**FM.to_dict(), **bad})
    with raises():
        Preprocess.from_dict([28, 1])


def test_imageset_subset_digest_conform():
    ds = synthetic_dataset(30, num_classes=3, size=10)
    sub, picked = ds.subset(5), ds.subset([3, 1])
    assert len(ds) == 30 and len(sub) == 5 and sub.name == "synthetic[:5]" and picked.labels.tolist() == [0, 1]
    assert ds.digest() == ds.digest() == synthetic_dataset(30, num_classes=3, size=10).digest()
    assert ds.digest() != sub.digest() and len(ds.digest()) == 64
    rgb = ds.conform(Preprocess(16, 3, (0.5,) * 3, (0.5,) * 3))
    assert ds.conform(Preprocess(10, 1, (0.5,), (0.5,))) is ds and rgb.images.shape == (30, 16, 16, 3)
    np.testing.assert_array_equal(rgb.images[..., 0], rgb.images[..., 2])
    back = rgb.conform(Preprocess(16, 1, (0.5,), (0.5,)))
    np.testing.assert_array_equal(back.images[..., 0], rgb.images[..., 0])  # luma of grey is grey
    red = ImageSet(np.array([[[[255, 0, 0]]]], np.uint8), np.array([0]), ("a",), "c")
    assert red.conform(Preprocess(1, 1, (0.0,), (1.0,))).images[0, 0, 0, 0] == 76  # 0.299 * 255
    with raises(match="labels"):
        ImageSet(np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 5]), ("a", "b"), "x")


def test_synthetic_determinism_balance_and_shared_templates():
    a, b, c = (synthetic_dataset(100, seed=s) for s in (3, 3, 4))
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    assert a.images.shape == (100, 28, 28, 1) and a.images.dtype == np.uint8 and np.bincount(a.labels).min() == 10
    # different seeds share class templates: nearest class mean from one set classifies the other
    tr, te = synthetic_dataset(300, seed=0), synthetic_dataset(100, seed=1)
    means = np.stack([tr.images[tr.labels == k].reshape(-1, 784).mean(0) for k in range(10)])
    d = ((te.images.reshape(-1, 1, 784).astype(float) - means[None]) ** 2).sum(-1)
    assert (d.argmin(1) == te.labels).mean() > 0.9
    assert synthetic_dataset(7, num_classes=3, size=12, channels=3).images.shape == (7, 12, 12, 3)


def save(path: Path, mode: str = "L", size: tuple[int, int] = (4, 4), color=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_image_folder_layouts_modes_and_sizes(tmp_path):
    save(tmp_path / "train/cat/a.png", "L", (20, 10), 100)
    save(tmp_path / "train/cat/b.PNG", "RGB", (7, 7), (10, 20, 30))
    save(tmp_path / "train/dog/c.png", "RGBA", (40, 40), (200, 0, 0, 128))
    (tmp_path / "train/dog/notes.txt").write_text("ignored")
    save(tmp_path / "test/dog/d.png", "L", (5, 5), 50)
    save(tmp_path / "test/emu/e.png", "L", (5, 5), 60)
    tr = load_image_folder(tmp_path, "train", size=8)
    assert tr.images.shape == (3, 8, 8, 3) and tr.images.dtype == np.uint8
    assert tr.classes == ("cat", "dog", "emu") and tr.labels.tolist() == [0, 0, 1]
    assert (tr.images[0] == 100).all() and tr.name == f"folder:{tmp_path.resolve()}/train"
    assert tr.images[1, 0, 0].tolist() == [10, 20, 30] and tr.images[2, 3, 3].tolist() == [200, 0, 0]
    te = load_image_folder(tmp_path, "test", size=8)
    assert te.images.shape == (2, 8, 8, 1)  # all grey -> one channel by default
    assert te.classes == tr.classes and te.labels.tolist() == [1, 2] and (te.images[0] == 50).all()
    grey = load_image_folder(tmp_path, "train", size=4, channels=1)
    assert grey.images.shape == (3, 4, 4, 1) and grey.images[2, 0, 0, 0] == 60  # luma(200, 0, 0)
    assert load_image_folder(tmp_path, "test").images.shape == (2, 32, 32, 1)  # default size
    save(tmp_path / "sv/train/a/x.png", "L", (4, 4), 1)
    save(tmp_path / "sv/val/a/y.jpg", "L", (4, 4), 2)
    assert len(load_image_folder(tmp_path / "sv", "test", size=4)) == 1
    flat = tmp_path / "flat"  # no train/test sub-folders: every 5th sorted file per class is "test"
    for k in range(12):
        save(flat / "a" / f"{k:02d}.png", "L", (6, 6), k)
    for k in range(5):
        save(flat / "b" / f"{k}.bmp", "RGB", (3, 9), (k, 0, 0))
    ftr, fte = load_image_folder(flat, "train", size=6), load_image_folder(flat, "test", size=6)
    assert ftr.classes == fte.classes == ("a", "b") and fte.labels.tolist() == [0, 0, 1] and len(ftr) == 14
    assert fte.images[:2, 0, 0, 0].tolist() == [4, 9]  # files 04 and 09
    assert fte.images.shape[-1] == ftr.images.shape[-1] == 3  # class b has colour


@pytest.mark.parametrize("files,split,match", [
    ({}, "train", "no class sub-folders"),
    ({"c/readme.txt": b"x"}, "train", "holds no images"),
    ({"c/ok.png": None, "c/broken.png": b"not a png"}, "train", "broken.png: cannot read image"),
    ({"c/only.png": None}, "test", "split .test. has no images; every 5th file"),
], ids=["no-classes", "empty-class", "unreadable", "empty-split"])
def test_image_folder_errors(tmp_path, files, split, match):
    (tmp_path / "d").mkdir()
    for name, data in files.items():
        save(tmp_path / "d" / name) if data is None else write(tmp_path / "d" / name, data)
    with raises(match=match) as e:
        load_image_folder(tmp_path / "d", split)
    assert "\n" not in str(e.value)
    with raises(match="no such directory"):
        load_image_folder(tmp_path / "missing", "train")


# ------------------------------------------------------------------------------ high bit depths

def test_16bit_grey_is_scaled_to_8_bits_not_clipped(tmp_path):
    """round(v * 255 / 65535) for every 16-bit value, through the file decoder and the folder loader,
    grey and as RGB; never the old clip to 255 of every value above 255."""
    from hetero.data._decode import load_one, scale_to_8bit

    v = np.arange(65536, dtype=np.int64)
    want = (v * 255 * 2 + 65535) // (2 * 65535)  # round half up, by hand in integers
    assert np.array_equal(scale_to_8bit(v.astype(np.uint16), 0, 65535), want)
    assert [int(want[x]) for x in (0, 128, 129, 257, 385, 386, 32767, 32768, 65406, 65407, 65535)] == \
        [0, 0, 1, 1, 1, 2, 127, 128, 254, 255, 255]
    vals = np.array([[0, 1, 128, 129], [257, 1000, 32767, 32768], [40000, 65407, 65408, 65535],
                     [255, 256, 12345, 54321]], dtype=np.uint16)
    expect = np.array([[round(int(x) * 255 / 65535) for x in row] for row in vals], dtype=np.uint8)
    im = Image.fromarray(vals)
    assert im.mode == "I;16"
    im.save(tmp_path / "g16.png")
    grey, colour = load_one(tmp_path / "g16.png", 4, 1)
    assert grey.shape == (4, 4, 1) and not colour and np.array_equal(grey[..., 0], expect)
    rgb, colour = load_one(tmp_path / "g16.png", 4, 3)
    assert not colour and all(np.array_equal(rgb[..., k], expect) for k in range(3))
    (tmp_path / "f/a").mkdir(parents=True)
    shutil.copy(tmp_path / "g16.png", tmp_path / "f/a/x.png")
    ds = load_image_folder(tmp_path / "f", "train", size=4, progress=False)
    assert ds.channels == 1 and np.array_equal(ds.images[0][..., 0], expect)


def test_32bit_integer_images_scale_by_their_type_and_float_images_are_refused(tmp_path):
    from hetero.data._decode import int_range, load_one, probe_mode

    vals = np.array([[-(2**31), -1, 0, 2**31 - 1]], dtype=np.int32)
    Image.fromarray(vals).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    # (v + 2**31) * 255 / (2**32 - 1), rounded
    assert load_one(tmp_path / "i32.tif", 4, 1)[0][0, :, 0].tolist() == [0, 127, 128, 255]
    # Pillow < 10 opens a 16-bit PNG as "I" with the raw mode I;16B: 16 bits, not 32
    assert int_range("I", "I;16B") == int_range("I;16", None) == (0, 65535)
    assert int_range("I", "I;32S") == int_range("I", None) == (-(2**31), 2**31 - 1)
    assert int_range("I;16S", None) == (-32768, 32767) and int_range("L", None) is None
    Image.fromarray(np.array([[0.0, 0.5, 1.0, 300.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    for call in (lambda: probe_mode(tmp_path / "f.tif"), lambda: load_one(tmp_path / "f.tif", 4, 1)):
        with raises(match=r"f\.tif: a floating-point image \(mode F\) has no fixed range.*convert it") as e:
            call()
        assert "\n" not in str(e.value)
    save(tmp_path / "d/a/ok.png")
    shutil.copy(tmp_path / "f.tif", tmp_path / "d/a/f.png")  # PIL reads by content, not by extension
    with raises(match=r"a/f\.png: a floating-point image"):  # refused when indexed, before any training
        load_image_folder(tmp_path / "d", "train", progress=False)


# -------------------------------------------------------------------------------- file names

def test_file_and_class_names_not_utf8_or_with_newlines_load_and_show_escaped(tmp_path):
    import os

    from hetero.data._decode import shown

    root = os.fsencode(tmp_path / "names")
    for split, n in ((b"train", 4), (b"test", 2)):
        for c, cls in enumerate((b"caf\xe9", b"new\nline", b"plain")):  # latin-1 bytes: not UTF-8
            d = os.path.join(root, split, cls)
            os.makedirs(d)
            for i in range(n):
                name = (b"\xff\xfe%d.png", b"a\nb%d.png", b"%d.png")[i % 3] % i
                Image.new("L", (3, 3), 10 * c + i).save(os.fsdecode(os.path.join(d, name)))
    tr = load_image_folder(os.fsdecode(root), "train", size=3, progress=False)
    assert tr.classes == ("caf\\xe9", "new\\nline", "plain") and len(tr) == 12
    assert tr.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # sorted by name within a class: "2.png", "a\nb1.png", "\xff\xfe0.png", "\xff\xfe3.png"
    assert tr.images[:4, 0, 0, 0].tolist() == [2, 1, 0, 3] and tr.images[8, 0, 0, 0] == 22
    assert any(f.endswith("\udcff\udcfe0.png") for f in tr.images.files)  # the real name, surrogate-escaped
    assert tr.name.isprintable() and all(c.isprintable() for c in tr.classes)
    assert load_image_folder(os.fsdecode(root), "test", size=3, progress=False).classes == tr.classes
    assert shown(b"/x/\xff\n\t.png") == "/x/\\xff\\n\\t.png" and shown("/ok/é.png") == "/ok/é.png"
    broken = os.path.join(root, b"train", b"plain", b"bad\n\xff.png")
    with open(broken, "wb") as f:
        f.write(b"not a png")
    with raises(match=r"plain/bad\\n\\xff\.png: cannot read image") as e:
        load_image_folder(os.fsdecode(root), "train", progress=False)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------- split folders

def tree(root: Path, spec: str) -> Path:
    """Folders of one grey image each, from ``"train/a train/b validation/a"``."""
    for k, rel in enumerate(spec.split()):
        save(root / rel / f"{k}.png", "L", (2, 2), k)
    return root


@pytest.mark.parametrize("evaluation", ["validation", "val", "valid", "test", "Validation"])
def test_split_folders_are_splits_not_classes(tmp_path, evaluation):
    root = tree(tmp_path, f"train/a train/b {evaluation}/a {evaluation}/b")
    tr, te = load_image_folder(root, "train", progress=False), load_image_folder(root, "test", progress=False)
    assert tr.classes == te.classes == ("a", "b") and (len(tr), len(te)) == (2, 2)
    assert te.images[:, 0, 0, 0].tolist() == [2, 3]  # the evaluation folder's own images
    assert split_dirs(root)["test"] == split_dirs(root)["val"] == root / evaluation
    assert load_dataset(str(root), "test", progress=False).classes == ("a", "b")


def test_three_way_split_and_folders_without_images_beside_the_splits(tmp_path):
    root = tree(tmp_path, "train/a test/a val/a")
    (root / "annotations").mkdir()
    (root / "annotations" / "labels.csv").write_text("x")
    assert split_dirs(root) == {"train": root / "train", "test": root / "test", "val": root / "val"}
    assert load_image_folder(root, "test", progress=False).images[0, 0, 0, 0] == 1
    assert load_image_folder(root, "val", progress=False).images[0, 0, 0, 0] == 2


@pytest.mark.parametrize("spec, match", [
    ("train/a val/a validation/a", r"val/, validation/ all name the val split; keep one"),
    ("train/a test/a Test/a", r"Test/, test/ all name the test split"),
    ("cat/x dog/x validation/x", r"split folders \(validation/\) beside folders of images \(cat/, dog/\).*rename"),
    ("train/a test/a extra/a", r"beside folders of images \(extra/\)"),
    ("train/a train/b", r"a train/ split but no evaluation split.*pass --data .*/train to split"),
    ("validation/a", r"no train/ beside it"),
], ids=["val-twice", "test-twice-by-case", "class-named-validation", "class-beside-splits", "train-alone",
        "validation-alone"])
def test_ambiguous_split_folders_are_refused_in_one_line(tmp_path, spec, match):
    root = tree(tmp_path / "root", spec)
    if spec == "train/a test/a Test/a" and (root / "test").samefile(root / "Test"):
        pytest.skip("case-insensitive file system")
    for split in ("train", "test"):
        with raises(match=match) as e:
            load_image_folder(root, split, progress=False)
        assert "\n" not in str(e.value) and str(root) in str(e.value)


# ---------------------------------------------------------------------------------- synthetic

def test_is_synthetic_and_a_folder_named_synthetic(tmp_path, monkeypatch):
    from hetero._resume import _same, absolute
    from hetero.data import SYNTHETIC_SPEC, data_source, is_synthetic

    monkeypatch.chdir(tmp_path)
    assert is_synthetic("synthetic") and is_synthetic("synthetic:") and SYNTHETIC_SPEC == "synthetic:"
    assert not any(is_synthetic(d) for d in (None, Path("synthetic"), "./synthetic", "synthetic:x", "Synthetic"))
    assert data_source("synthetic") == data_source("synthetic:") == "synthetic:" and data_source(None) is None
    assert absolute("synthetic:") == "synthetic:" and _same("synthetic", "synthetic:")  # --resume round trip
    assert len(load_dataset("synthetic:", "train")) == 2000
    (tmp_path / "synthetic").mkdir()  # the user's own folder: no longer the built-in set
    with raises(match=r"--data synthetic: neither .*the path synthetic here is used.*pass --data synthetic:"):
        load_dataset("synthetic", "train")
    assert not is_synthetic("synthetic") and is_synthetic("synthetic:")
    assert data_source("synthetic") == absolute("synthetic") == str(tmp_path / "synthetic")
    assert not _same("synthetic", "synthetic:")
    tree(tmp_path / "synthetic", "train/x train/y test/x test/y")
    ds = load_dataset("synthetic", "train", progress=False)
    assert ds.classes == ("x", "y") and len(ds) == 2 and ds.name.startswith("folder:")
    builtin = load_dataset("synthetic:", "test")
    assert len(builtin) == 500 and builtin.name == "synthetic/test"


def make_fmnist(root: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> Path:
    rng, sfx = np.random.default_rng(0), ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        write(root / f"{prefix}-images-idx3-ubyte{sfx}", idx_bytes(imgs, 0x08, ">u1"), gz)
        write(root / f"{prefix}-labels-idx1-ubyte{sfx}", idx_bytes(np.arange(n) % 10, 0x08, ">u1"), gz)
    return root


@pytest.fixture
def isolated(tmp_path, monkeypatch):  # lookups see an empty HOME and cache, no HETERO_DATA, no system dataset
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HETERO_CACHE", str(tmp_path / "home" / ".cache" / "hetero"))
    monkeypatch.delenv("HETERO_DATA", raising=False)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system")


def test_find_and_load_fashion_mnist(tmp_path, monkeypatch, isolated):
    with raises(match="Fashion-MNIST not found .*apt-get install dataset-fashion-mnist.*HETERO_DATA") as e:
        find_fashion_mnist(None, download=False)
    assert "\n" not in str(e.value)
    raw, root = make_fmnist(tmp_path / "raw", gz=False), make_fmnist(tmp_path / "fm")
    assert find_fashion_mnist(str(raw), download=False) == raw and len(load_fashion_mnist(raw, "test")) == 5
    monkeypatch.setenv("HETERO_DATA", str(root))
    assert find_fashion_mnist(None, download=False) == root
    monkeypatch.delenv("HETERO_DATA")
    cache = make_fmnist(fm.download_dir())
    assert find_fashion_mnist(None, download=False) == cache
    tr = load_fashion_mnist(root, "train")
    assert tr.images.shape == (12, 28, 28, 1) and tr.labels.dtype == np.int64 and tr.name == "fashion-mnist/train"
    assert tr.classes[0] == "T-shirt/top" and tr.classes[9] == "Ankle boot" and len(tr.classes) == 10
    assert len(load_dataset(str(root), "test")) == 5
    (next(root.glob("t10k-labels-idx1-ubyte*"))).unlink()
    with raises(match=r"--data .*: Fashion-MNIST files not found \(t10k-labels-idx1-ubyte\[\.gz\] missing\)"):
        find_fashion_mnist(str(root), download=False)
    for labels, match in ((np.zeros(4), "5 images but 4 labels"), (np.full(5, 10), "labels span 10..10")):
        write(raw / "t10k-labels-idx1-ubyte", idx_bytes(labels, 0x08, ">u1"))
        with raises(match=match):
            load_fashion_mnist(raw, "test")
    write(raw / "t10k-images-idx3-ubyte", idx_bytes(np.zeros((5, 784)), 0x08, ">u1"))
    with raises(match="3-D unsigned-byte"):
        load_fashion_mnist(raw, "test")
    with raises(match="unknown Fashion-MNIST split"):
        load_fashion_mnist(raw, "val")


@pytest.mark.skipif(not SYSTEM_FMNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_test_split():
    ds = load_fashion_mnist(SYSTEM_FMNIST, "test")
    assert ds.images.shape == (10000, 28, 28, 1) and ds.images.dtype == np.uint8
    assert ds.labels.min() == 0 and ds.labels.max() == 9 and np.bincount(ds.labels).tolist() == [1000] * 10


def test_load_dataset_dispatch(tmp_path):
    tr, te = load_dataset("synthetic", "train"), load_dataset("synthetic", "test")
    assert (len(tr), len(te)) == (2000, 500) and tr.name == "synthetic/train" and tr.digest() != te.digest()
    save(tmp_path / "folder/a/x.png", "RGB", (9, 9), (1, 2, 3))
    assert load_dataset(str(tmp_path / "folder"), "train", size=5).images.shape == (1, 5, 5, 3)
    with raises(match="no such directory; pass a folder with the Fashion-MNIST"):
        load_dataset(str(tmp_path / "nope"), "train")
    write(tmp_path / "plain/readme.txt", b"x")
    with raises(match="neither"):
        load_dataset(str(tmp_path / "plain"), "train")
    with raises(match="unknown split"):
        load_dataset("synthetic", "dev")


def test_iterate_batches_shapes_values_order_shuffle():
    ds = synthetic_dataset(50, num_classes=5, size=28)
    batches = list(iterate_batches(ds, FM, 16))
    assert [len(b[0]) for b in batches] == [16, 16, 16, 2]
    x, y, idx = batches[0]
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == idx.dtype == torch.int64
    np.testing.assert_allclose(x.numpy(), FM.apply(ds.images[:16]))
    assert idx.tolist() == list(range(16)) and y.tolist() == ds.labels[:16].tolist()
    assert [len(b[0]) for b in iterate_batches(ds, FM, 16, drop_last=True)] == [16, 16, 16]
    with raises(match=r"20x20x1 .* 28x28x1; call ds.conform\(prep\) first"):
        iterate_batches(synthetic_dataset(10, size=20), FM, 4)
    with raises(match="batch size"):
        iterate_batches(ds, FM, 0)
    ds, orders = synthetic_dataset(53, num_classes=4), []  # shuffling covers each index once per epoch
    for seed in (0, 1, 0):
        got = [(i, yy) for _, y, idx in iterate_batches(ds, FM, 8, shuffle=True, seed=seed)
               for i, yy in zip(idx.tolist(), y.tolist())]
        assert sorted(i for i, _ in got) == list(range(53)) and all(ds.labels[i] == yy for i, yy in got)
        orders.append([i for i, _ in got])
    assert orders[0] != orders[1] and orders[0] != list(range(53)) and orders[0] == orders[2]


def test_iterate_batches_augment():
    ds = synthetic_dataset(40, num_classes=4, size=16, channels=3)
    prep = Preprocess(16, 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    plain = torch.cat([x for x, _, _ in iterate_batches(ds, prep, 16)])
    aug, aug2 = ([x for x, _, _ in iterate_batches(ds, prep, 16, augment=True, seed=5)] for _ in range(2))
    assert [a.shape for a in aug] == [(16, 3, 16, 16), (16, 3, 16, 16), (8, 3, 16, 16)]
    aug = torch.cat(aug)
    assert torch.equal(aug, torch.cat(aug2)) and not torch.equal(aug, plain)
    # each output is one of the 2 x 25 crops of the input or its mirror, padded with 2 px of black
    black = torch.tensor([(0 - m) / s for m, s in zip(prep.mean, prep.std)]).view(3, 1, 1)
    pad = black.expand(len(ds), 2, 3, 20, 20).clone()
    pad[..., 2:18, 2:18] = torch.stack([plain, plain.flip(-1)], 1)
    crops = torch.stack([pad[..., oy:oy + 16, ox:ox + 16] for oy in range(5) for ox in range(5)], 1)
    assert ((crops - aug[:, None, None]).abs().amax((3, 4, 5)) < 1e-5).flatten(1).any(1).all()



@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("augment", [False, True])
def test_batches_have_standard_nchw_strides(channels, augment):
    # not is_contiguous(): a one-channel batch with NHWC strides (HW, 1, W, 1) passes that check, and
    # torch then runs the network channels-last, where oneDNN's AVX2 kernels crashed (issue 7)
    ds = synthetic_dataset(40, num_classes=4, size=12, channels=channels)
    prep = Preprocess(12, channels, (0.5,) * channels, (0.25,) * channels)
    for x, _, _ in iterate_batches(ds, prep, 16, augment=augment, seed=3):
        assert x.stride() == (channels * 144, 144, 12, 1), x.stride()


def test_as_nchw_copies_only_non_standard_strides():
    from hetero.data import as_nchw

    x = torch.randn(4, 1, 5, 5)
    assert as_nchw(x) is x
    nhwc = torch.randn(4, 5, 5, 1).permute(0, 3, 1, 2)  # what the old augmentation produced
    assert nhwc.is_contiguous() and nhwc.stride() == (25, 1, 5, 1)
    fixed = as_nchw(nhwc)
    assert fixed.stride() == (25, 25, 5, 1) and torch.equal(fixed, nhwc)
    rgb = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    assert as_nchw(rgb).stride() == (48, 16, 4, 1) and torch.equal(as_nchw(rgb), rgb)

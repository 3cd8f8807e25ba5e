"""Bad (or odd) data, as a user types it: file names that are not UTF-8 or hold a newline, split folders
beside or instead of class folders, a folder named ``synthetic``, 16-bit and float images.

Odd inputs that mean something load (the names, the splits, 16-bit pixels scaled to 8 bits); ambiguous
or unloadable ones are refused with one ``error:`` line, exit 2, nothing written and every user file
as it was (see tests/support/badinput.py). A case that must see a real terminal's encoding, or run in
its own working directory, runs in a child process.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from badinput import TINY_TRAIN, child_env, cli, fails_cleanly


def folder(root: Path | bytes, spec: str | list[bytes], n: int = 4, value=None) -> Path:
    """One grey 10x10 image per file: ``spec`` lists class folders, relative to ``root``, each given
    ``n`` images named 0.png, 1.png...; bytes paths may be any bytes a file system takes."""
    rng = np.random.default_rng(0)
    for rel in (spec.split() if isinstance(spec, str) else spec):
        d = os.path.join(os.fsencode(root), os.fsencode(rel))
        os.makedirs(d, exist_ok=True)
        for i in range(n):
            px = rng.integers(0, 256, (10, 10), dtype=np.uint8) if value is None else np.full((10, 10), value, np.uint8)
            Image.fromarray(px).save(os.fsdecode(os.path.join(d, b"%d.png" % i)))
    return Path(os.fsdecode(root))


def trained(place, p) -> dict:
    """The checkpoint's hetero.json after a run that must have worked."""
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    return json.loads((place.path / "c" / "hetero.json").read_text())


def described(root: Path, cwd: Path | None = None, data: str | None = None) -> str:
    """``hetero data --data ROOT`` in a child whose stdout takes ASCII only (an old terminal, a pipe
    under a C locale): what it prints about each split."""
    p = cli("data", "--data", data or root, cwd=cwd, env=child_env({"PYTHONIOENCODING": "ascii"}))
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    return p.stdout


# ------------------------------------------------------------------------------------------ file names

def test_image_file_names_not_utf8_work(tmp_path, place):
    """b'\\xff\\xfe.png' (Latin-1 or raw bytes, legal on Linux) in a class folder, under a data folder, both
    also not UTF-8: loaded and counted, the class and the set named with their bytes escaped, printed on
    an ASCII-only terminal."""
    place.allow = {"c"}
    root = folder(os.path.join(os.fsencode(tmp_path), b"d\xffta"), "train/a test/a", n=3)
    folder(root, [b"train/caf\xe9", b"test/caf\xe9"], n=3)
    for split in (b"train", b"test"):
        for cls in (b"a", b"caf\xe9"):
            Image.new("L", (6, 6), 7).save(os.fsdecode(os.path.join(os.fsencode(root), split, cls, b"\xff\xfe.png")))
    out = described(root)
    assert "d\\xffta/train: 8 images" in out and "d\\xffta/test: 8 images" in out
    meta = trained(place, cli("train-cloud", "--out", place.path / "c", "--data", root, *TINY_TRAIN))
    assert meta["classes"] == ["a", "caf\\xe9"] and meta["info"]["dataset"].endswith("d\\xffta/train")


def test_image_file_names_with_newlines_work(tmp_path, place):
    place.allow = {"c"}
    root = folder(tmp_path / "data", "train/a train/b test/a test/b", n=3)
    for rel in ("train/a", "train/b", "test/b"):
        Image.new("L", (6, 6), 9).save(root / rel / "two\nlines.png")
    out = described(root)
    assert "/train: 8 images" in out and "/test: 7 images" in out
    meta = trained(place, cli("train-cloud", "--out", place.path / "c", "--data", root, *TINY_TRAIN))
    assert meta["classes"] == ["a", "b"]


def test_unreadable_image_with_a_newline_and_bad_bytes_in_its_name(tmp_path, place):
    """The one error line names the file with its newline and bytes escaped."""
    root = folder(tmp_path / "data", "train/a test/a", n=2)
    (Path(os.fsdecode(os.path.join(os.fsencode(root), b"train/a/bad\n\xff.png")))).write_bytes(b"not a png")
    fails_cleanly(cli("train-cloud", "--out", place.path / "c", "--data", root, *TINY_TRAIN),
                  "bad\\n\\xff.png: cannot read image")


# --------------------------------------------------------------------------------------- split folders

def test_train_and_validation_folders_are_splits_not_classes(tmp_path, place):
    place.allow = {"c"}
    root = folder(tmp_path / "data", "train/cat train/dog validation/cat validation/dog", n=4)
    folder(root, "validation/dog", n=6)
    out = described(root)  # the test split is the validation folder
    assert "/train: 8 images" in out and "/test: 10 images" in out and "2 classes" in out
    meta = trained(place, cli("train-cloud", "--out", place.path / "c", "--data", root, *TINY_TRAIN))
    assert meta["classes"] == ["cat", "dog"]


def test_train_val_and_test_folders_work(tmp_path):
    """The usual three-way layout: train trains, test is the evaluation split; val/ is left to the user."""
    root = folder(tmp_path / "data", "train/cat train/dog val/cat test/cat test/dog", n=2)
    folder(root, "test/dog", n=3)
    out = described(root)
    assert "/train: 4 images" in out and "/test: 5 images" in out


def test_two_validation_folders_are_refused(tmp_path, place):
    root = folder(tmp_path / "data", "train/a val/a validation/a", n=2)
    fails_cleanly(cli("train-cloud", "--out", place.path / "c", "--data", root, *TINY_TRAIN),
                  "val/, validation/ all name the val split", "keep one")


def test_class_folder_named_validation_beside_class_folders_is_refused(tmp_path, place):
    root = folder(tmp_path / "data", "cat dog validation", n=2)
    fails_cleanly(cli("train-cloud", "--out", place.path / "c", "--data", root, *TINY_TRAIN),
                  "split folders (validation/) beside folders of images (cat/, dog/)", "rename")


def test_class_folders_beside_split_folders_are_refused(tmp_path, place):
    """Images outside the splits would be silently unused: refused, naming the folder."""
    root = folder(tmp_path / "data", "train/a test/a stray", n=2)
    fails_cleanly(cli("train-cloud", "--out", place.path / "c", "--data", root, *TINY_TRAIN),
                  "beside folders of images (stray/)")


def test_a_train_folder_alone_is_refused(tmp_path, place):
    root = folder(tmp_path / "data", "train/a train/b", n=5)
    fails_cleanly(cli("train-cloud", "--out", place.path / "c", "--data", root, *TINY_TRAIN),
                  "no evaluation split", f"--data {root / 'train'}")


# ------------------------------------------------------------------------------ a folder named synthetic

def test_folder_named_synthetic_is_the_users_folder(tmp_path, place):
    place.allow = {"c"}
    work = tmp_path / "work"
    folder(work / "synthetic", "train/x train/y test/x test/y", n=4)
    p = cli("train-cloud", "--out", place.path / "c", "--data", "synthetic", *TINY_TRAIN, cwd=work, env=child_env())
    assert trained(place, p)["classes"] == ["x", "y"]


def test_synthetic_scheme_is_the_builtin_set_even_beside_such_a_folder(tmp_path):
    work = tmp_path / "work"
    folder(work / "synthetic", "train/x test/x", n=2)
    out = described(work, cwd=work, data="synthetic:")
    assert out.startswith("synthetic/train: 2000 images") and "10 classes" in out


def test_folder_named_synthetic_that_holds_no_dataset_names_the_scheme(tmp_path, place):
    """An earlier `--out synthetic` (a checkpoint) now shadows the built-in set: the error says how to reach it."""
    work = tmp_path / "work"
    (work / "synthetic").mkdir(parents=True)
    (work / "synthetic" / "hetero.json").write_text("{}")
    p = cli("train-cloud", "--out", place.path / "c", "--data", "synthetic", *TINY_TRAIN, cwd=work, env=child_env())
    fails_cleanly(p, "--data synthetic: neither", "pass --data synthetic:")


# -------------------------------------------------------------------------------------- pixel formats

def test_16bit_png_folder_is_scaled_not_clipped(tmp_path, place):
    """16-bit grey PNGs of constant 32768 and 16384: 8-bit 128 and 64 (round(v * 255 / 65535)), so the
    recorded training mean is their mean over 255; clipped at 255 they would read as all white (mean 1)."""
    place.allow = {"c"}
    root = tmp_path / "data"
    for split in ("train", "test"):
        for cls, v in (("a", 32768), ("b", 16384)):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                im = Image.fromarray(np.full((12, 12), v, np.uint16))
                assert im.mode == "I;16"
                im.save(d / f"{i}.png")
    meta = trained(place, cli("train-cloud", "--out", place.path / "c", "--data", root, *TINY_TRAIN))
    assert meta["preprocess"]["channels"] == 1
    assert meta["preprocess"]["mean"][0] == pytest.approx((128 + 64) / 2 / 255, abs=1e-9)
    assert meta["preprocess"]["std"][0] == pytest.approx(32 / 255, abs=1e-9)


def test_float_image_is_refused(tmp_path, place):
    """A 32-bit float TIFF (mode F) has no range to map onto 8 bits: refused when the folder is indexed."""
    root = folder(tmp_path / "data", "train/a test/a", n=2)
    Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)).save(root / "train" / "a" / "depth.tif")
    fails_cleanly(cli("train-cloud", "--out", place.path / "c", "--data", root, *TINY_TRAIN),
                  "depth.tif: a floating-point image (mode F)", "convert it")

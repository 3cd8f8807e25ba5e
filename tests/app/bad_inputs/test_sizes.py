"""Bad --size and --augment (issue 23), as a user types them: too small, not a number, an augmentation
hetero does not have. Each: one ``error:`` line naming the fix, exit 2, nothing written. And a
centre-cropped, imagenet-augmented tv: cloud trained from a folder of odd-sized images records its
preprocessing."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from badinput import cli, fails_cleanly

TRAIN = ["--data", "synthetic:", "--epochs", "1", "--batch-size", "16", "--dim", "8", "--limit", "32", "--quiet"]


@pytest.mark.parametrize("size, words", [("4", ("--size must be a whole number of pixels, 8 to",)),
                                         ("100000", ("--size must be a whole number of pixels",)),
                                         ("0", ("--size",))])
def test_a_size_out_of_range(place, size, words):
    fails_cleanly(cli("train-cloud", "--out", place.path / "c", "--model", "test_resnet", "--size", size, *TRAIN), *words)


def test_an_unknown_augmentation(place):
    p = cli("train-cloud", "--out", place.path / "c", "--model", "test_resnet", "--augment", "mixup", *TRAIN)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "invalid choice: 'mixup'" in p.stderr
    assert not (place.path / "c").exists()


def test_a_library_cloud_on_odd_sized_images_records_its_crop_and_augmentation(tmp_path):
    pytest.importorskip("torchvision")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        d = tmp_path / "f" / c
        d.mkdir(parents=True)
        for i, (w, h) in enumerate([(50, 20), (12, 12), (40, 70), (33, 33), (90, 45)]):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    p = cli("train-cloud", "--out", tmp_path / "c", "--model", "tv:mobilenet_v3_small", "--size", "32", "--augment",
            "--data", tmp_path / "f", "--epochs", "1", "--batch-size", "4", "--dim", "8", "--quiet")
    assert p.returncode == 0, p.stderr
    meta = json.loads((tmp_path / "c" / "hetero.json").read_text())
    assert meta["preprocess"] == {"size": 32, "channels": 3, "mean": [0.485, 0.456, 0.406],
                                  "std": [0.229, 0.224, 0.225], "crop": 0.875}
    assert meta["config"]["augment"] is True and meta["config"]["size"] == 32

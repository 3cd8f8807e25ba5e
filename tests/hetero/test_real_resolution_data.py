"""Real-resolution preprocessing: shorter-side resize + centre crop (the decoder, in-memory sets, the
standalone runner, manifests), the ``imagenet`` augmentation in the loader's workers, and an edge's
batch refed to a cloud at another input size."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from devices.artifact import preprocess_problem
from devices.standalone import preprocess_images
from hetero.data import ImageSet, Preprocess, iterate_batches, load_image_folder
from hetero.data.augment import augment_arrays, resolve
from hetero.errors import HeteroError
from hetero.train import TrainConfig, as_input_of

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _folder(root, sizes=((120, 60), (40, 90), (16, 16), (300, 200))):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _reference_crop(path, size, crop):
    """Brute force: the shorter side to round(size / crop), aspect kept, then the centre size x size."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    short = max(size, round(size / crop))
    nw, nh = (short, max(short, round(h * short / w))) if w <= h else (max(short, round(w * short / h)), short)
    im = im.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im)[top:top + size, left:left + size]


def test_folder_decodes_a_centre_crop_and_resizes_small_images_up(tmp_path):
    root = _folder(tmp_path / "f")
    ds = load_image_folder(root, "train", size=32, crop=0.875)
    got = np.asarray(ds.images)
    assert got.shape == (8, 32, 32, 3)
    for i, f in enumerate(ds.images.files):
        assert np.array_equal(got[i], _reference_crop(f, 32, 0.875))
    # the 16x16 image, smaller than the crop, is resized up, not refused
    assert any(Image.open(f).size == (16, 16) for f in ds.images.files)
    squashed = np.asarray(load_image_folder(root, "train", size=32).images)
    assert not np.array_equal(squashed, got)  # the crop is not the squash


def test_conform_crops_in_memory_images_as_the_decoder_does(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 255, (3, 40, 40, 3), dtype=np.uint8)
    ds = ImageSet(imgs, np.array([0, 1, 0]), ("a", "b"), "mem")
    out = ds.conform(Preprocess(24, 3, **IMAGENET, crop=0.75)).images
    for i in range(3):
        Image.fromarray(imgs[i]).save(tmp_path / f"{i}.png")
        assert np.array_equal(out[i], _reference_crop(tmp_path / f"{i}.png", 24, 0.75))


def test_preprocess_crop_round_trips_and_old_blocks_read_unchanged():
    p = Preprocess(224, 3, **IMAGENET, crop=0.875)
    assert Preprocess.from_dict(p.to_dict()) == p and p.to_dict()["crop"] == 0.875
    old = Preprocess(28, 1, (0.286,), (0.353,))
    assert set(old.to_dict()) == {"size", "channels", "mean", "std"}  # a squashing preprocess reads as before
    assert preprocess_problem(p.to_dict()) is None and preprocess_problem(old.to_dict()) is None
    for bad in (0, 1.5, -0.2, True, "x"):
        with pytest.raises(HeteroError, match="crop"):
            Preprocess(224, 3, **IMAGENET, crop=bad)
        assert "crop" in preprocess_problem({**p.to_dict(), "crop": bad})
    assert "exactly" in preprocess_problem({**p.to_dict(), "resize": 256})


def test_standalone_runner_preprocesses_a_cropped_manifest_as_hetero_does(tmp_path):
    root = _folder(tmp_path / "f")
    prep = Preprocess(48, 3, **IMAGENET, crop=0.875)
    ds = load_image_folder(root, "test", size=48, crop=0.875)
    ours = next(iterate_batches(ds, prep, 8))[0].numpy()
    theirs = preprocess_images(ds.images.files, prep.to_dict())
    np.testing.assert_array_equal(ours, theirs)


def test_imagenet_augmentation_is_the_same_in_any_number_of_workers_and_leaves_torch_rng_alone(tmp_path):
    root = _folder(tmp_path / "f")
    prep = Preprocess(32, 3, **IMAGENET, crop=0.875)
    ds = load_image_folder(root, "train", size=32, crop=0.875)
    plain = next(iterate_batches(ds, prep, 8))[0]

    def run(workers, seeds):
        torch.manual_seed(5)
        xs = [x for x, _, _ in iterate_batches(ds, prep, 4, augment="imagenet", batch_seeds=seeds, num_workers=workers)]
        return torch.cat(xs), torch.rand(1)

    a, ra = run(0, [11, 12])
    b, rb = run(2, [11, 12])
    c, _ = run(0, [13, 12])
    torch.manual_seed(5)
    assert torch.equal(a, b) and torch.equal(ra, rb) and torch.equal(ra, torch.rand(1))
    assert not torch.equal(a[:4], c[:4]) and torch.equal(a[4:], c[4:])  # a batch's seed draws that batch
    assert a.shape == plain.shape and not torch.equal(a, plain)
    with pytest.raises(HeteroError, match="seeds"):
        list(iterate_batches(ds, prep, 4, augment="imagenet", batch_seeds=[1]))
    mem = np.asarray(ds.images)
    assert augment_arrays(mem, 3).shape == mem.shape and np.array_equal(augment_arrays(mem, 3), augment_arrays(mem, 3))


def test_augment_option_resolves_per_preprocess_and_refuses_unknown_policies():
    assert resolve(True, 0.875) == "imagenet" and resolve(True, None) == "pad-crop"
    assert resolve("pad-crop", 0.875) == "pad-crop" and resolve(False, 0.875) is None
    TrainConfig(augment="imagenet", size=224)
    for bad in ({"augment": "mixup"}, {"size": 4}, {"size": 224.0}):
        with pytest.raises(HeteroError, match="--augment|--size"):
            TrainConfig(**bad)


def test_an_edge_batch_is_refed_to_the_cloud_at_its_size_and_normalisation():
    edge = Preprocess(16, 3, **IMAGENET, crop=0.875)
    cloud = Preprocess(24, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop=0.875)
    pixels = torch.rand(2, 3, 16, 16)
    x = (pixels - torch.tensor(edge.mean).view(1, 3, 1, 1)) / torch.tensor(edge.std).view(1, 3, 1, 1)
    assert as_input_of(x, edge, edge) is x
    want = (F.interpolate(pixels, size=(24, 24), mode="bilinear", align_corners=False) - 0.5) / 0.25
    torch.testing.assert_close(as_input_of(x, edge, cloud), want, atol=1e-5, rtol=0)
    grey = Preprocess(16, 1, (0.5,), (0.25,))
    g = as_input_of(x, edge, grey)
    luma = (pixels * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    torch.testing.assert_close(g, (luma - 0.5) / 0.25, atol=1e-5, rtol=0)

import numpy as np
import pytest

from hetero.embed import cloud_targets, embed_images
from hetero.errors import HeteroError
from hetero.metrics import retrieval_metrics
from hetero.train import TrainConfig, train_edge


def test_cloud_training_learns(tiny_cloud, synth, prep):
    import torch

    from hetero.models import create_embedding_model

    hist = tiny_cloud.info["history"]
    assert hist[-1]["total"] < hist[0]["total"]

    def map_at_r(model):
        q = embed_images(model, synth[1], prep, progress=False)
        g = embed_images(model, synth[0], prep, progress=False)
        return retrieval_metrics(q, synth[1].labels, g, synth[0].labels)["map_at_r"]

    # the trained model against its own starting weights (train_cloud seeds, then builds the model), not
    # against a fixed mAP: where a tiny run lands differs with the CPU's summation order
    with torch.random.fork_rng():
        torch.manual_seed(tiny_cloud.config["seed"])
        start = create_embedding_model(tiny_cloud.spec, prep.channels)
    assert map_at_r(tiny_cloud.model) > map_at_r(start)


def test_compatible_edge_beats_control_against_the_cloud_gallery(tiny_cloud, tiny_edge, synth, prep):
    control = train_edge(TrainConfig(model="test_mobilenet", dim=16, epochs=5, batch_size=32, compat=False),
                         tiny_cloud, synth[0], progress=False)
    assert control.role == "control" and control.space != tiny_cloud.space
    g = np.asarray(cloud_targets(tiny_cloud, synth[0], progress=False))
    def het(model):
        return retrieval_metrics(embed_images(model, synth[1], prep, progress=False), synth[1].labels, g, synth[0].labels)["map_at_r"]

    assert het(tiny_edge.model) > het(control.model)  # the two runs compared, no margin a tiny run may miss
    assert set(tiny_edge.info["history"][-1]) >= {"influence", "alignment", "total"}


def test_default_recipe(tiny_cloud, synth):
    assert TrainConfig().losses == {"influence": 1.0, "alignment": 1.0, "relational": 1.0}
    edge = train_edge(TrainConfig(model="test_mobilenet", dim=16, epochs=1, batch_size=64, limit=128), tiny_cloud,
                      synth[0], progress=False)
    assert set(edge.info["history"][0]) == {"influence", "alignment", "relational", "total", "epoch", "img_per_s"}


def test_influence_alone_never_runs_the_cloud(tiny_cloud, synth, tmp_path, monkeypatch):
    """Influence (and ce) need only the frozen classifier: no cloud forward pass, no cached targets."""
    monkeypatch.setenv("HETERO_CACHE", str(tmp_path))
    calls = []
    hook = tiny_cloud.model.register_forward_pre_hook(lambda mod, args: calls.append(len(args[0])))
    try:
        for augment in (False, True):
            edge = train_edge(TrainConfig(model="test_mobilenet", dim=16, epochs=1, batch_size=64, limit=128, augment=augment,
                                          losses={"influence": 1.0}), tiny_cloud, synth[0], progress=False)
            assert edge.space == tiny_cloud.space and edge.info["history"][0]["influence"] > 0
        assert calls == [] and not (tmp_path / "targets").exists()
        train_edge(TrainConfig(model="test_mobilenet", dim=16, epochs=1, batch_size=64, limit=128,
                               losses={"influence": 1.0, "alignment": 1.0}), tiny_cloud, synth[0], progress=False)
        assert sum(calls) == 128 and len(list((tmp_path / "targets").iterdir())) == 1  # alignment does read them
    finally:
        hook.remove()


def test_edge_training_leaves_the_frozen_cloud_untouched(tiny_cloud, synth):
    before = tiny_cloud.fingerprint
    train_edge(TrainConfig(model="test_mobilenet", dim=16, epochs=1, batch_size=64, limit=128), tiny_cloud, synth[0], progress=False)
    assert tiny_cloud.fingerprint == before == tiny_cloud.space


def test_cloud_targets_are_cached_by_space_and_data(tmp_path, tiny_cloud, synth, prep):
    a = cloud_targets(tiny_cloud, synth[1], progress=False, directory=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and tiny_cloud.space[:16] in files[0].name
    mtime = files[0].stat().st_mtime_ns
    b = cloud_targets(tiny_cloud, synth[1], progress=False, directory=tmp_path)
    assert files[0].stat().st_mtime_ns == mtime and np.array_equal(a, b)
    assert np.allclose(a, embed_images(tiny_cloud.model, synth[1], prep, progress=False), atol=1e-6)
    cloud_targets(tiny_cloud, synth[0].subset(50), progress=False, directory=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2


def test_bad_training_options(tiny_cloud, tiny_edge, synth):
    with pytest.raises(HeteroError, match="--epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(HeteroError, match="--lr"):
        TrainConfig(lr=-1)
    with pytest.raises(HeteroError, match="--dim 8 differs"):
        train_edge(TrainConfig(model="test_mobilenet", dim=8), tiny_cloud, synth[0], progress=False)
    with pytest.raises(HeteroError, match="must be a cloud checkpoint"):
        train_edge(TrainConfig(model="test_mobilenet", dim=16), tiny_edge, synth[0], progress=False)


def test_divergence_is_reported(tiny_cloud, synth):
    with pytest.raises(HeteroError, match="diverged"):
        train_edge(TrainConfig(model="test_mobilenet", dim=16, epochs=1, lr=1e30, limit=256), tiny_cloud, synth[0], progress=False)


def test_online_targets_follow_the_augmented_batch(tiny_cloud, synth, tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_CACHE", str(tmp_path))
    cfg = TrainConfig(model="test_mobilenet", dim=16, epochs=1, batch_size=64, limit=256, augment=True,
                      losses={"alignment": 1.0})
    assert cfg.online_targets
    edge = train_edge(cfg, tiny_cloud, synth[0], progress=False)
    assert edge.info["history"][0]["alignment"] < 2.0
    assert not (tmp_path / "targets").exists()  # nothing cached: targets came from the frozen cloud per batch
    with pytest.raises(HeteroError, match="--targets online"):
        TrainConfig(augment=True, targets="cached")
    with pytest.raises(HeteroError, match="--targets"):
        TrainConfig(targets="sometimes")



@pytest.mark.parametrize("channels", [1, 3])
def test_resnet_trains_on_augmented_batches_in_nchw(channels, monkeypatch):
    """Issue 7: augmented one-channel batches reached the model with NHWC strides, so the ResNet's
    1x1 stride-2 shortcut ran oneDNN's channels-last AVX2 backward kernel, which corrupted the heap.
    Every convolution must see standard NCHW strides while training."""
    import torch

    import hetero.train as train_mod
    from hetero.data import Preprocess, synthetic_dataset
    from hetero.train import train_cloud

    seen: list[tuple[torch.Size, tuple[int, ...]]] = []
    real_create = train_mod.create_embedding_model

    def create(spec, in_channels):  # the real model, with a hook on every convolution's input
        model = real_create(spec, in_channels)
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_pre_hook(lambda mod, args: seen.append((args[0].shape, args[0].stride())))
        return model

    monkeypatch.setattr(train_mod, "create_embedding_model", create)
    ds = synthetic_dataset(96, num_classes=4, channels=channels)
    prep = Preprocess(28, channels, (0.5,) * channels, (0.25,) * channels)
    ckpt = train_cloud(TrainConfig(model="test_resnet", dim=16, epochs=2, batch_size=32, augment=True), ds, prep,
                       progress=False)
    # 6 steps x 9 convolutions in the ResNet-8 (2 of them 1x1 stride-2 shortcuts), after the one-image input check
    assert len([x for x in seen if x[0][0] > 1]) == 6 * 9 and len(seen) == 7 * 9
    for shape, stride in seen:
        assert stride == torch.empty(shape).stride(), f"conv input {tuple(shape)} has strides {stride}, not NCHW"
    hist = ckpt.info["history"]
    assert all(np.isfinite(h["total"]) for h in hist) and hist[-1]["total"] < hist[0]["total"]


@pytest.mark.slow
def test_augmented_training_survives_onednn_avx2_kernels(tmp_path):
    """The AMD EPYC failure of issue 7, reproduced on any x86 CPU: ``ONEDNN_MAX_CPU_ISA=AVX2`` makes
    oneDNN use the AVX2 kernels an AVX2-only CPU gets. Their channels-last 1x1-conv backward corrupts
    the heap; before the fix this run crashed or spun forever. (A no-op where AVX2 is the best ISA.)"""
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("hetero")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "2"}
    p = subprocess.run([str(exe), "train-cloud", "--out", str(tmp_path / "c"), "--model", "test_resnet", "--augment",
                        "--data", "synthetic", "--limit", "400", "--epochs", "3", "--quiet"],
                       env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-1500:]

"""The CUDA paths: embedding on the model's device, training with HETERO_TRAIN_DEVICE=cuda, and the NAS
search scoring its candidates on the GPU, each against the same thing on the CPU. Skipped where
torch sees no CUDA device (every CPU-only machine, CI's included)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none here)")]


def test_embed_images_runs_a_gpu_model_and_matches_the_cpu(tiny_cloud, synth):
    from hetero.embed import embed_images

    model = tiny_cloud.model
    cpu = embed_images(model, synth[1], tiny_cloud.preprocess, progress=False)
    model.cuda()
    try:
        gpu = embed_images(model, synth[1], tiny_cloud.preprocess, progress=False)
    finally:
        model.cpu()
    assert gpu.dtype == np.float32 and gpu.shape == cpu.shape
    cos = (gpu * cpu).sum(1) / (np.linalg.norm(gpu, axis=1) * np.linalg.norm(cpu, axis=1))
    assert cos.min() > 0.9999, cos.min()


def test_cloud_targets_are_embedded_on_the_training_device_and_the_model_comes_back(tiny_cloud, synth, monkeypatch, tmp_path):
    from hetero.embed import cloud_targets, embed_images

    monkeypatch.setenv("HETERO_TRAIN_DEVICE", "cuda")
    got = np.asarray(cloud_targets(tiny_cloud, synth[1], progress=False, directory=tmp_path))
    assert next(tiny_cloud.model.parameters()).device.type == "cpu"
    want = embed_images(tiny_cloud.model, synth[1], tiny_cloud.preprocess, progress=False)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_train_edge_on_the_gpu_learns_and_returns_a_cpu_model(tiny_cloud, synth, monkeypatch):
    from hetero.metrics import retrieval_metrics
    from hetero.embed import embed_images
    from hetero.models import create_embedding_model
    from hetero.train import TrainConfig, train_edge

    cfg = TrainConfig(model="test_mobilenet", dim=16, epochs=5, batch_size=32, losses={"influence": 1.0, "alignment": 1.0})
    monkeypatch.setenv("HETERO_TRAIN_DEVICE", "cuda")
    gpu = train_edge(cfg, tiny_cloud, synth[0], progress=False)
    monkeypatch.setenv("HETERO_TRAIN_DEVICE", "cpu")
    cpu = train_edge(cfg, tiny_cloud, synth[0], progress=False)
    assert all(p.device.type == "cpu" for p in gpu.model.parameters())
    # the same recipe on either device: GPU kernels differ in the last bits, not in what is learnt. A tiny
    # run amplifies last bits in its mAP@R (this recipe's moves by ~0.07 between two CPU kernel sets alone),
    # far less in its losses: the runs are compared epoch by epoch on those, as test_distributed does
    first = cpu.info["history"][0]["total"]
    for hg, hc in zip(gpu.info["history"], cpu.info["history"], strict=True):
        assert hg["total"] == pytest.approx(hc["total"], abs=0.1 * first), (hg, hc)
    gallery = embed_images(tiny_cloud.model, synth[0], tiny_cloud.preprocess, progress=False)

    def map_at_r(model):
        q = embed_images(model, synth[1], tiny_cloud.preprocess, progress=False)
        return retrieval_metrics(q, synth[1].labels, gallery, synth[0].labels)["map_at_r"]

    with torch.random.fork_rng():  # the weights both runs started from (train_edge seeds, then builds the model)
        torch.manual_seed(cfg.seed)
        start = create_embedding_model(cpu.spec, tiny_cloud.preprocess.channels)
    scores = [map_at_r(gpu.model), map_at_r(cpu.model)]
    assert min(scores) > map_at_r(start), scores  # both learnt, whichever side of a fixed mAP@R they land


def test_search_scores_a_candidate_on_the_gpu_as_on_the_cpu(saved, synth, tmp_path, monkeypatch, small_space):
    from hetero.checkpoint import load_checkpoint
    from hetero.app.search import Evaluator, SearchConfig
    from hetero.nas.space import largest
    from hetero.nas.train import SupernetConfig, load_supernet, train_supernet

    cloud = load_checkpoint(saved / "cloud")
    monkeypatch.setenv("HETERO_TRAIN_DEVICE", "cuda")
    train_supernet(SupernetConfig(epochs=1, batch_size=64, val_size=120, space=small_space), cloud, synth[0],
                   tmp_path / "sn", progress=False)
    net, meta = load_supernet(tmp_path / "sn")
    arch = largest(net.space)
    got = Evaluator(net, meta, cloud, synth[0], SearchConfig(), progress=False).reward(arch)
    assert next(net.parameters()).device.type == "cpu"
    monkeypatch.setenv("HETERO_TRAIN_DEVICE", "cpu")
    want = Evaluator(net, meta, cloud, synth[0], SearchConfig(), progress=False).reward(arch)
    assert abs(got["map_at_r"] - want["map_at_r"]) < 1e-3, (got, want)

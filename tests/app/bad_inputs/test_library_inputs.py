"""Bad input to the library backbones (issue 23), as a user types it: an unknown tv:/timm: name, --pretrained
of another architecture, of a hetero backbone, of weights not in the library's cache, a missing file, timm
absent. Each: one ``error:`` line naming the fix, exit 2, nothing written."""
from __future__ import annotations

import pytest

from badinput import child_env, cli, fails_cleanly

LIB_TRAIN = ["--data", "synthetic:", "--size", "32", "--epochs", "1", "--batch-size", "16", "--dim", "8", "--limit", "32",
             "--quiet"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """torchvision's own state dicts, as a user would save them: mobilenet_v3_small, and resnet18 (another
    architecture)."""
    torchvision = pytest.importorskip("torchvision")
    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("library-weights")
    save_file({k: v.contiguous() for k, v in torchvision.models.resnet18().state_dict().items()}, str(d / "r18.safetensors"))
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), d / "mnv3.pt")
    return d


@pytest.mark.parametrize("model, close", [("tv:mobilenet_v3_smal", "tv:mobilenet_v3_small"),
                                          ("timm:fastvit_t9", "timm:fastvit_t8")])
def test_an_unknown_library_model(place, model, close):
    pytest.importorskip("timm")
    fails_cleanly(cli("train-cloud", "--out", place.path / "c", "--model", model, *LIB_TRAIN), "close matches", close)


def test_pretrained_weights_of_another_architecture(place, weights):
    fails_cleanly(cli("train-cloud", "--out", place.path / "c", "--model", "tv:mobilenet_v3_small", "--pretrained",
                      weights / "r18.safetensors", *LIB_TRAIN),
                  "does not fit tv:mobilenet_v3_small", "missing keys features.0.0.weight", "unexpected keys", "conv1.weight")


def test_pretrained_for_a_hetero_backbone(place, weights):
    fails_cleanly(cli("train-cloud", "--out", place.path / "c", "--model", "resnet20", "--pretrained", weights / "mnv3.pt",
                      *LIB_TRAIN), "tv:NAME or timm:NAME", "leave out --pretrained")


def test_pretrained_by_name_not_in_the_library_s_cache(place, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    fails_cleanly(cli("train-cloud", "--out", place.path / "c", "--model", "tv:mobilenet_v3_small", "--pretrained",
                      "DEFAULT", *LIB_TRAIN), "not in torchvision's cache", "--pretrained FILE")


def test_pretrained_file_missing_for_an_edge(place, tmp_path, synth, prep):
    from hetero.checkpoint import save_checkpoint
    from hetero.train import TrainConfig, train_cloud

    cloud = train_cloud(TrainConfig(model="test_resnet", dim=8, epochs=1, batch_size=32, limit=64), synth[0], prep,
                        progress=False)  # any cloud: the edge's --pretrained is refused before it trains
    save_checkpoint(cloud, tmp_path / "cloud")
    fails_cleanly(cli("train-edge", "--cloud", tmp_path / "cloud", "--out", place.path / "e", "--model",
                      "tv:mobilenet_v3_small", "--pretrained", tmp_path / "nope.safetensors", "--epochs", "1",
                      "--limit", "32", "--quiet"), "no such file")


def test_timm_absent_names_the_extra(place, tmp_path):
    """A real process in which ``import timm`` fails, as where the extra is not installed."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['timm'] = None\n")
    fails_cleanly(cli("train-cloud", "--out", place.path / "c", "--model", "timm:fastvit_t8", *LIB_TRAIN,
                      env=child_env(shim=shim)), "timm is not installed", "pip install 'hetero[timm]'")

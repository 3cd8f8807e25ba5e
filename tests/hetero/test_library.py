"""Library backbones (issue 23): timm:NAME beside tv:NAME in the one registry, their native preprocessing,
the input check, --pretrained from a file or the library's cache, and `hetero models`' table."""
from __future__ import annotations

import hashlib
import sys

import pytest
import torch
from safetensors.torch import save_file

from hetero.errors import HeteroError, MissingDependencyError
from hetero.models import ModelSpec, create_backbone, create_embedding_model
from hetero.models.library import CURATED, library_defaults
from hetero.models.library_flops import count_native, curated, read_table
from hetero.models.library_weights import find_pretrained, load_pretrained
from hetero.models.registry import check_input

timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install 'hetero[timm]')")
torchvision = pytest.importorskip("torchvision", reason="torchvision is an optional extra")


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.parametrize("name", CURATED["timm:"])
def test_timm_backbones_embed_at_their_native_channels_and_at_one(name):
    """Headless (timm's num_classes=0, no 1000-way layer left), hetero's projection + L2 head on the pooled
    features, for RGB and grey images at 64 px."""
    torch.manual_seed(0)
    for channels in (3, 1):
        m = create_embedding_model(ModelSpec(f"timm:{name}", 16), channels).eval()
        ref = timm.create_model(name, num_classes=0)
        assert m.backbone.out_features == ref.head_hidden_size
        assert not any(isinstance(x, torch.nn.Linear) and x.out_features == 1000 for x in m.modules())
        with torch.no_grad():
            y = m(torch.randn(2, channels, 64, 64))
        assert y.shape == (2, 16) and torch.allclose(y.norm(dim=1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("name, close", [("tv:mobilenet_v3_smal", "tv:mobilenet_v3_small"),
                                         ("tv:resnet_18", "tv:resnet18"),
                                         ("timm:fastvit_t9", "timm:fastvit_t8"),
                                         ("timm:mobilenetv4_small", "timm:mobilenetv4_conv_small")])
def test_an_unknown_library_name_lists_the_close_matches(name, close):
    with pytest.raises(HeteroError) as e:
        create_backbone(name)
    assert "close matches" in _one_line(e) and close in str(e.value)
    with pytest.raises(HeteroError, match="close matches"):
        library_defaults(name)


def test_native_defaults_come_from_the_library_s_recipe_without_building_the_model():
    assert library_defaults("tv:mobilenet_v3_small") == {"size": 224, "mean": (0.485, 0.456, 0.406),
                                                         "std": (0.229, 0.224, 0.225), "crop": 224 / 256, "min_size": 1}
    assert library_defaults("tv:vit_b_16")["min_size"] == 224  # a fixed-size model says so
    fv = library_defaults("timm:fastvit_t8")
    assert (fv["size"], fv["crop"]) == (256, 0.9)
    assert library_defaults("timm:mobilevit_xs")["std"] == (1.0, 1.0, 1.0)  # timm's own per-model numbers
    assert library_defaults("timm:mobilenetv4_conv_small.e3600_r256_in1k")["size"] == 256  # a tag's own
    assert library_defaults("resnet20") is None


def test_check_input_turns_the_library_s_error_into_what_to_change():
    check_input("tv:mobilenet_v3_small", 3, 64)  # takes it: nothing raised
    with pytest.raises(HeteroError) as e:
        check_input("timm:vit_tiny_patch16_224", 1, 64)  # a ViT's fixed size
    assert "cannot take 1x64x64" in _one_line(e) and "--size 224" in str(e.value) and "img_size=64" in str(e.value)
    check_input("timm:vit_tiny_patch16_224", 1, 64, img_size=64)  # ... which its option changes
    with pytest.raises(HeteroError) as e:
        check_input("tv:alexnet", 3, 32)  # too small for its strides
    assert "Output size is too small" in _one_line(e) and "at least 63" in str(e.value)
    rgb = create_backbone("tv:resnet18", in_channels=3)
    with pytest.raises(HeteroError) as e:
        check_input(rgb, 1, 64)
    assert "tv:resnet18 takes 3-channel images, not 1" in _one_line(e)
    assert rgb.training  # its mode is left as it was


def test_without_timm_a_timm_name_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` meets where timm is not installed
    for call in (lambda: create_backbone("timm:fastvit_t8"), lambda: library_defaults("timm:fastvit_t8")):
        with pytest.raises(MissingDependencyError) as e:
            call()
        assert "pip install 'hetero[timm]'" in _one_line(e)


# ----------------------------------------------------------------------------------------- pretrained

def _save(state: dict[str, torch.Tensor], path) -> str:
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name, make, head", [
    ("tv:mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(), "classifier.3"),
    ("timm:mobilenetv4_conv_small", lambda: timm.create_model("mobilenetv4_conv_small"), "classifier")])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_pretrained_from_a_file_of_the_library_s_own_keys(tmp_path, name, make, head, suffix):
    """The classifier the headless model lacks is left out, a grey model's first convolution gets the RGB
    filters summed, every other tensor is the file's."""
    torch.manual_seed(1)
    state = make().state_dict()
    sha = _save(state, tmp_path / f"w{suffix}")
    for channels in (3, 1):
        m = create_embedding_model(ModelSpec(name, 16), channels)
        rec = load_pretrained(m, name, str(tmp_path / f"w{suffix}"))
        assert rec["sha256"] == sha and rec["file"] == f"w{suffix}" and rec["left_out"] == [f"{head}.bias", f"{head}.weight"]
        own = m.backbone.net.state_dict()
        for k, v in own.items():
            if k in rec["adapted"]:
                assert torch.allclose(v, state[k].sum(1, keepdim=True))
            else:
                assert torch.equal(v, state[k]), k
        assert (rec["adapted"] != []) == (channels == 1)


def test_a_file_for_another_architecture_names_missing_and_unexpected_keys(tmp_path):
    _save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.safetensors")
    m = create_embedding_model(ModelSpec("tv:mobilenet_v3_small", 16), 3)
    with pytest.raises(HeteroError) as e:
        load_pretrained(m, "tv:mobilenet_v3_small", str(tmp_path / "r18.safetensors"))
    msg = _one_line(e)
    assert "does not fit tv:mobilenet_v3_small" in msg and "missing keys features.0.0.weight" in msg
    unexpected = msg.split("unexpected keys ")[1]
    assert "conv1.weight" in unexpected and " more;" in unexpected and msg.count(",") < 20  # five of each, not 300


def test_pretrained_is_for_library_backbones_only_and_refuses_a_missing_file(tmp_path):
    with pytest.raises(HeteroError, match="tv:NAME or timm:NAME") as e:
        find_pretrained("resnet20", str(tmp_path / "w.pt"))
    _one_line(e)
    with pytest.raises(HeteroError, match="no such file") as e:
        find_pretrained("tv:resnet18", str(tmp_path / "nope.safetensors"))
    _one_line(e)


def test_torchvision_weights_by_name_come_from_its_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(HeteroError) as e:
        find_pretrained("tv:mobilenet_v3_small", "DEFAULT")
    msg = _one_line(e)
    assert "not in torchvision's cache" in msg and "--pretrained FILE" in msg and str(tmp_path) in msg
    with pytest.raises(HeteroError, match="IMAGENET1K_V1"):
        find_pretrained("tv:mobilenet_v3_small", "IMAGENET9K_V9")
    cached = tmp_path / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"  # where torchvision keeps it
    cached.parent.mkdir(parents=True)
    sha = _save(torchvision.models.mobilenet_v3_small().state_dict(), cached)
    m = create_embedding_model(ModelSpec("tv:mobilenet_v3_small", 16), 3)
    rec = load_pretrained(m, "tv:mobilenet_v3_small", "DEFAULT")
    assert rec["weights"] == "torchvision:MobileNet_V3_Small_Weights.IMAGENET1K_V1" and rec["sha256"] == sha


def test_timm_weights_by_name_come_from_the_hugging_face_cache_only(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(HeteroError) as e:
        find_pretrained("timm:fastvit_t8", "true")
    assert "not in the Hugging Face cache" in _one_line(e) and "--pretrained FILE" in str(e.value)
    with pytest.raises(HeteroError, match="apple_in1k"):
        find_pretrained("timm:fastvit_t8", "no_such_tag")
    repo = tmp_path / "models--timm--fastvit_t8.apple_in1k"  # the hub's cache layout: refs/main -> snapshot
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    sha = _save(timm.create_model("fastvit_t8").state_dict(), repo / "snapshots" / ("0" * 40) / "model.safetensors")
    found = find_pretrained("timm:fastvit_t8", "apple_in1k")
    assert found.record == {"source": "apple_in1k", "file": "model.safetensors", "sha256": sha,
                            "weights": "timm:fastvit_t8.apple_in1k"}


def test_a_recorded_source_is_found_again_only_while_the_file_is_unchanged(tmp_path):
    path = tmp_path / "w.safetensors"
    _save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    record = find_pretrained("tv:mobilenet_v3_small", str(path)).record
    assert find_pretrained("tv:mobilenet_v3_small", record).path == path
    _save(torchvision.models.mobilenet_v3_small().state_dict(), path)  # other random weights
    with pytest.raises(HeteroError, match="has changed"):
        find_pretrained("tv:mobilenet_v3_small", record)


def test_training_starts_from_the_file_and_the_checkpoint_records_it(tmp_path, synth, prep):
    from hetero.checkpoint import load_checkpoint, save_checkpoint
    from hetero.train import TrainConfig, train_cloud

    torch.manual_seed(2)
    state = torchvision.models.mobilenet_v3_small().state_dict()
    sha = _save(state, tmp_path / "w.pt")
    cfg = TrainConfig(model="tv:mobilenet_v3_small", dim=16, epochs=1, batch_size=32, limit=32, lr=1e-9,
                      pretrained=str(tmp_path / "w.pt"))
    ckpt = train_cloud(cfg, synth[0], prep, progress=False)  # grey 28-px images: the first conv is adapted
    rec = ckpt.config["pretrained"]
    assert rec["sha256"] == sha and rec["adapted"] == ["features.0.0.weight"]
    params = dict(ckpt.model.backbone.net.named_parameters())
    for k in ("features.1.block.0.0.weight", "features.12.0.weight", "classifier.0.weight"):  # one step at lr 1e-9
        assert torch.allclose(params[k], state[k], atol=1e-6) and not torch.allclose(state[k], 0 * state[k])
    save_checkpoint(ckpt, tmp_path / "cloud")
    assert load_checkpoint(tmp_path / "cloud").config["pretrained"] == rec
    assert "pretrained" not in TrainConfig().to_dict()  # configs (and resume state) without it read as before


# --------------------------------------------------------------------------------------- hetero models

def test_the_models_table_lists_the_curated_names_and_matches_a_fresh_count():
    table = read_table()
    assert list(table["models"]) == curated()
    assert {"tv:mobilenet_v3_small", "tv:vit_b_16", "timm:mobilevit_xs"} <= set(table["models"])
    fresh, stored = count_native("tv:mobilenet_v3_small"), table["models"]["tv:mobilenet_v3_small"]
    assert fresh["params"] == stored["params"] and fresh["size"] == stored["size"] == 224
    assert fresh["mflops"] == pytest.approx(stored["mflops"], rel=0.01)


def test_hetero_models_prints_each_registry(capsys):
    from hetero.app.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "resnet20" in out and "MFLOPs@1x28x28" in out
    for name in curated():
        assert name in out
    assert "tv:mobilenet_v3_small" in out and "MFLOPs@3x224x224    111" in out and "MFLOPs@3x256x256" in out
    assert "any timm model" in out and "hetero[timm]" in out


def test_batch_norm_running_statistics_follow_a_short_training():
    """torchvision's MobileNetV3 keeps batch-norm momentum 0.01: after 30 training steps its running
    mean would be a quarter of the way to the data's, and the eval-mode model would embed every image
    alike. hetero's library backbones track it at torch's 0.1 (within 5% after 30 steps)."""
    torch.manual_seed(0)
    net = create_backbone("tv:mobilenet_v3_small", in_channels=3)
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    net.train()
    with torch.no_grad():
        for _ in range(30):
            net(torch.rand(4, 3, 32, 32) + 2.0)
        target = conv(torch.rand(64, 3, 32, 32) + 2.0).mean((0, 2, 3))
    assert torch.allclose(bn.running_mean, target, rtol=0.05, atol=0.02)

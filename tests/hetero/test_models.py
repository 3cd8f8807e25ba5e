import pytest
import torch
from torch import nn

from hetero.errors import HeteroError
from hetero.models import BACKBONES, CosineClassifier, ModelSpec, create_backbone, create_embedding_model, list_backbones
from hetero.models.complexity import count_flops, count_params
from hetero.registry import Registry


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_embeds_to_unit_norm(name):
    torch.manual_seed(0)
    m = create_embedding_model(ModelSpec(name, 24), in_channels=3).eval()
    with torch.no_grad():
        out = m(torch.randn(3, 3, 28, 28))
    assert out.shape == (3, 24)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_resnet_depths_follow_6n_plus_2():
    r20 = create_backbone("resnet20")
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in r20.modules()) == 19
    with pytest.raises(HeteroError, match="6n\\+2"):
        create_backbone("resnet", depth=21)


def test_registry_refuses_duplicates_and_names_choices():
    reg: Registry[int] = Registry("thing")
    reg.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(lambda: 2)
    with pytest.raises(HeteroError, match="choose one of: a"):
        reg.create("b")
    with pytest.raises(ValueError):
        BACKBONES.register("resnet20")(lambda: None)


def test_bad_backbone_kwargs_are_a_user_error():
    with pytest.raises(HeteroError, match="does not take"):
        create_backbone("mobilenet", colour="red")


def test_flops_of_a_single_conv_match_hand_count():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_flops(conv, (3, 10, 10)) == 2 * 3 * 8 * 9 * 10 * 10
    assert count_params(conv) == 3 * 8 * 9


def test_edge_presets_cut_flops_against_resnet20():
    r20 = count_flops(create_embedding_model(ModelSpec("resnet20"), 1), (1, 28, 28))
    w050 = count_flops(create_embedding_model(ModelSpec("mobilenet_w050"), 1), (1, 28, 28))
    assert 60e6 < r20 < 64e6
    assert r20 / w050 >= 20


def test_cosine_classifier_logits_and_margin():
    c = CosineClassifier(2, 2, scale=10.0, margin=0.5)
    with torch.no_grad():
        c.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
    e = torch.tensor([[2.0, 0.0]])
    assert torch.allclose(c(e), torch.tensor([[10.0, 0.0]]))
    assert torch.allclose(c(e, torch.tensor([0])), torch.tensor([[5.0, 0.0]]))


@pytest.mark.parametrize("name, features", [("tv:mobilenet_v3_small", 1024), ("tv:resnet18", 512),
                                            ("tv:efficientnet_b0", 1280), ("tv:regnet_y_400mf", 440)])
def test_torchvision_backbones_carry_hetero_s_head_and_take_any_channel_count(name, features):
    """tv:NAME through the one registry: the model without its last linear layer, then projection and
    L2 norm; grey images get a new first convolution (issue 23)."""
    import torch

    from hetero.models import ModelSpec, create_embedding_model

    torch.manual_seed(0)
    for channels in (1, 3):
        m = create_embedding_model(ModelSpec(name, 16), channels).eval()
        assert m.backbone.out_features == features and not any(
            isinstance(x, torch.nn.Linear) and x.out_features == 1000 for x in m.modules())  # no ImageNet head left
        with torch.no_grad():
            y = m(torch.randn(3, channels, 32, 32))
        assert y.shape == (3, 16) and torch.allclose(y.norm(dim=1), torch.ones(3), atol=1e-5)


def test_an_unknown_torchvision_model_is_one_line():
    from hetero.models import ModelSpec, create_embedding_model

    with pytest.raises(HeteroError, match="torchvision has no classification model 'resnet_9000'") as e:
        create_embedding_model(ModelSpec("tv:resnet_9000", 16), 3)
    assert "\n" not in str(e.value)


def test_a_torchvision_edge_trains_saves_loads_and_exports(tmp_path, tiny_cloud, synth):
    import numpy as np
    import torch

    from export import export_checkpoint
    from hetero.checkpoint import load_checkpoint, save_checkpoint
    from hetero.train import TrainConfig, train_edge

    cfg = TrainConfig(model="tv:mobilenet_v3_small", dim=16, epochs=1, batch_size=32, limit=64)
    edge = train_edge(cfg, tiny_cloud, synth[0], progress=False)
    save_checkpoint(edge, tmp_path / "edge")
    back = load_checkpoint(tmp_path / "edge")  # rebuilt from its hetero.json, weights checked against it
    x = torch.from_numpy(back.preprocess.apply(synth[1].images[:8]))
    with torch.no_grad():
        assert torch.allclose(back.model.eval()(x), edge.model.eval()(x), atol=1e-6)
    m = export_checkpoint(back, tmp_path / "export", name="edge")
    assert m["model"]["spec"]["backbone"] == "tv:mobilenet_v3_small"
    assert m["artifacts"][0]["fidelity"]["min_cosine"] > 0.9999 and np.isfinite(m["artifacts"][0]["fidelity"]["max_abs_diff"])

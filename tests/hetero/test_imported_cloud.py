"""Bring-your-own cloud: torchvision (random init) and module:factory models, weights files,
classifier fitting, and training an edge model into such a space."""
import json

import pytest
import torch
from safetensors.torch import save_file

from hetero.imported_cloud import fit_classifier, import_cloud
from hetero.models.external import load_weights_file
from hetero.checkpoint import load_checkpoint, save_checkpoint
from hetero.app.cli import main
from hetero.data import Preprocess, synthetic_dataset
from hetero.errors import HeteroError
from hetero.models import ModelSpec
from hetero.train import TrainConfig, train_edge

PREP = Preprocess(32, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def tv_weights(tmp_path_factory):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=16)
    d = tmp_path_factory.mktemp("byo")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / "r18.safetensors"))
    torch.save(net.state_dict(), d / "r18.pt")
    return d


@pytest.fixture(scope="module")
def rgb_data():
    return synthetic_dataset(300, num_classes=4, size=32, channels=3, seed=0), synthetic_dataset(80, num_classes=4, size=32, channels=3, seed=1)


def test_torchvision_model_imports_frozen_fingerprinted_and_round_trips(tmp_path, tv_weights):
    ckpt = import_cloud("torchvision", "resnet18", tv_weights / "r18.safetensors", 16, PREP, model_kwargs={"num_classes": 16})
    assert ckpt.role == "cloud" and ckpt.classifier is None and ckpt.space == ckpt.fingerprint
    assert not any(p.requires_grad for p in ckpt.model.parameters())
    same = import_cloud("torchvision", "resnet18", tv_weights / "r18.pt", 16, PREP, model_kwargs={"num_classes": 16})
    assert same.space == ckpt.space  # .pt state dict and safetensors give the same space
    save_checkpoint(ckpt, tmp_path / "c")
    back = load_checkpoint(tmp_path / "c")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = back.model(x)
        assert torch.allclose(out, ckpt.model(x), atol=1e-6)
    assert out.shape == (3, 16) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert json.loads((tmp_path / "c" / "hetero.json").read_text())["model"]["kind"] == "torchvision"


def test_declared_dim_and_input_are_checked(tv_weights):
    with pytest.raises(HeteroError, match="outputs 16-dim embeddings but --dim says 128"):
        import_cloud("torchvision", "resnet18", tv_weights / "r18.safetensors", 128, PREP, model_kwargs={"num_classes": 16})
    with pytest.raises(HeteroError, match="do not fit"):
        import_cloud("torchvision", "resnet34", tv_weights / "r18.safetensors", 16, PREP, model_kwargs={"num_classes": 16})
    with pytest.raises(HeteroError, match="fails on input"):
        import_cloud("torchvision", "resnet18", tv_weights / "r18.safetensors", 16, Preprocess(32, 1, (0.5,), (0.25,)),
                     model_kwargs={"num_classes": 16})
    with pytest.raises(HeteroError, match="cannot import"):
        import_cloud("factory", "no_such_module:make", tv_weights / "r18.safetensors", 16, PREP)
    with pytest.raises(HeteroError, match="no model 'resnet9000'"):
        import_cloud("torchvision", "resnet9000", tv_weights / "r18.safetensors", 16, PREP)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_objects_are_never_unpickled(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"w": _Evil(str(marker))}))
    with pytest.raises(HeteroError, match="refusing to unpickle"):
        load_weights_file(tmp_path / "evil.pt")
    assert not marker.exists()
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(HeteroError, match="not a readable safetensors"):
        load_weights_file(tmp_path / "bad.safetensors")
    with pytest.raises(HeteroError, match="no such file"):
        load_weights_file(tmp_path / "missing.pt")


def test_factory_model_and_fit_classifier_enable_influence(tmp_path, rgb_data):
    save_file({}, str(tmp_path / "none.safetensors"))
    prep = Preprocess(32, 3, (0.5,) * 3, (0.25,) * 3)
    # a parameter-free "cloud" from a module:callable path: 4x4 average pooling, 3 x 4 x 4 = 48 dims
    cloud = import_cloud("factory", "torch.nn:AdaptiveAvgPool2d", tmp_path / "none.safetensors", 48, prep,
                         model_kwargs={"output_size": 4})
    with pytest.raises(HeteroError, match="no classifier"):
        train_edge(TrainConfig(model="test_mobilenet", dim=48, epochs=1), cloud, rgb_data[0], progress=False)
    plain = train_edge(TrainConfig(model="test_mobilenet", dim=48, epochs=1, losses={"alignment": 1.0}), cloud, rgb_data[0],
                       progress=False)
    assert plain.space == cloud.space
    fitted = fit_classifier(cloud, rgb_data[0], epochs=5, progress=False)
    assert fitted.classifier.num_classes == 4 and fitted.space != cloud.space
    assert fitted.info["classifier_train_accuracy"] > 0.9  # synthetic classes are separable by colour templates
    assert fitted.model is cloud.model
    edge = train_edge(TrainConfig(model="test_mobilenet", dim=48, epochs=1), fitted, rgb_data[0], progress=False)
    assert edge.space == fitted.space and "influence" in edge.info["history"][-1]


def test_cli_import_and_fit(tmp_path, tv_weights, capsys):
    common = ["--torchvision", "resnet18", "--model-kwargs", "num_classes=16", "--dim", "16", "--size", "32"]
    assert main(["import-cloud", "--out", str(tmp_path / "c"), "--weights", str(tv_weights / "r18.safetensors"), *common]) == 0
    assert main(["fit-classifier", "--cloud", str(tmp_path / "c"), "--out", str(tmp_path / "cf"), "--data", "synthetic",
                 "--epochs", "2", "--quiet"]) == 0
    assert load_checkpoint(tmp_path / "cf").classifier.num_classes == 10
    capsys.readouterr()
    import pickle

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(_Evil(str(tmp_path / "pwned"))))
    assert main(["import-cloud", "--out", str(tmp_path / "e"), "--weights", str(tmp_path / "evil.pt"), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "refusing to unpickle" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "e").exists() and not (tmp_path / "pwned").exists()
    assert main(["import-cloud", "--out", str(tmp_path / "d"), "--weights", str(tv_weights / "r18.safetensors"),
                 *common[:-4], "--dim", "64", "--size", "32"]) == 2
    assert "--dim 16" in capsys.readouterr().err


def test_non_finite_weights_are_refused(tmp_path, tv_weights):
    from safetensors.torch import load_file

    for value, word in ((float("inf"), "Inf"), (float("-inf"), "Inf"), (float("nan"), "NaN")):
        state = load_file(str(tv_weights / "r18.safetensors"))
        state["fc.bias"][3] = value
        save_file(state, str(tmp_path / "w.safetensors"))
        with pytest.raises(HeteroError, match=f"tensor 'fc.bias' holds {word} values"):
            import_cloud("torchvision", "resnet18", tmp_path / "w.safetensors", 16, PREP, model_kwargs={"num_classes": 16})


def test_absurd_model_options_are_refused_before_allocation(tv_weights, monkeypatch):
    """num_classes=50000000 would give resnet18 a 25.6e9-weight head (103 GB): counted on the meta
    device and refused, nothing allocated (the test would run out of memory otherwise)."""
    with pytest.raises(HeteroError, match=r"do not fit resnet18 .* has 25,661,186,132 weights, the file 11,194,340"):
        import_cloud("torchvision", "resnet18", tv_weights / "r18.safetensors", 16, PREP,
                     model_kwargs={"num_classes": 50_000_000})
    import hetero.models.external as byo

    monkeypatch.setattr(byo, "MAX_PARAMS", 1_000_000)  # the bound itself, on a model that fits its weights
    with pytest.raises(HeteroError, match="has 11,194,340 weights, more than the 1,000,000 hetero accepts"):
        import_cloud("torchvision", "resnet18", tv_weights / "r18.safetensors", 16, PREP, model_kwargs={"num_classes": 16})


@pytest.mark.parametrize("edit", ["num_classes", "classifier"])
def test_checkpoint_of_absurd_options_is_refused_before_allocation(tmp_path, tv_weights, edit):
    ckpt = import_cloud("torchvision", "resnet18", tv_weights / "r18.safetensors", 16, PREP, model_kwargs={"num_classes": 16})
    save_checkpoint(ckpt, tmp_path / "c")
    meta_path = tmp_path / "c" / "hetero.json"
    meta = json.loads(meta_path.read_text())
    if edit == "num_classes":
        meta["model"]["backbone_kwargs"]["num_classes"] = 50_000_000
    else:
        meta["classifier"] = {"num_classes": 50_000_000, "scale": 16.0, "margin": 0.0}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(HeteroError, match="does not fit the model hetero.json describes"):
        load_checkpoint(tmp_path / "c")


def test_trust_list_lives_in_the_users_config_directory(tmp_path, monkeypatch):
    import hetero.models.external as byo

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("HETERO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(byo.TRUST_ENV, raising=False)
    assert byo.trust_file() == tmp_path / "config" / "hetero" / "trusted-factories.json"
    byo.trust_factory("mine:make")
    byo.trust_factory("mine:make")  # once
    assert json.loads(byo.trust_file().read_text())["factories"] == ["mine:make"]
    assert byo.trusted_factories() == {"mine:make"}
    assert (byo.trust_file().parent.stat().st_mode & 0o777) == 0o700
    monkeypatch.setenv(byo.TRUST_ENV, "a:b, c:d")
    assert byo.trusted_factories() == {"mine:make", "a:b", "c:d"}
    # the cache, where earlier versions kept it, is not read; a refusal says so
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "trusted-factories.json").write_text(json.dumps({"factories": ["old:make"]}))
    assert "old:make" not in byo.trusted_factories()
    spec = ModelSpec("old:make", 8, {}, kind="factory")
    with pytest.raises(HeteroError, match=r"not imported on this machine.* is no longer honoured .*re-run import-cloud "
                                          r"to record it in .*config/hetero/trusted-factories.json"):
        byo.create_external(spec)
    # XDG_CONFIG_HOME unset or relative: ~/.config
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for value in ("", "relative/dir"):
        monkeypatch.setenv("XDG_CONFIG_HOME", value)
        assert byo.trust_file() == tmp_path / "home" / ".config" / "hetero" / "trusted-factories.json"


def test_pt_files_are_refused_on_a_torch_that_cannot_read_them_safely(tv_weights, monkeypatch):
    """CVE-2025-32434: torch < 2.6 runs code in a crafted .pt despite weights_only=True (pyproject
    pins torch >= 2.6; this guards an older torch installed by hand). Safetensors are still read."""
    import hetero.models.external as byo

    monkeypatch.setattr(byo, "_torch_version", lambda: (2, 5))
    with pytest.raises(HeteroError, match=r"cannot read a \.pt file safely .*upgrade torch, or pass \.safetensors"):
        load_weights_file(tv_weights / "r18.pt")
    assert load_weights_file(tv_weights / "r18.safetensors")

"""The shipped pretrained cloud: a verified checkpoint with its provenance, used only on its own data."""
import json

import pytest

from hetero.data import FASHION_MNIST_CLASSES, FASHION_MNIST_PREPROCESS, synthetic_dataset
from hetero.errors import HeteroError
from hetero.pretrained import PRETRAINED, load_pretrained, pretrained_path


def test_shipped_cloud_loads_verified_with_provenance():
    assert list(PRETRAINED) == ["fmnist-resnet20"]
    cloud = load_pretrained("fmnist-resnet20")  # sha256 of the weights and the fingerprint are checked on load
    assert cloud.role == "cloud" and cloud.space == cloud.fingerprint and cloud.classifier is not None
    assert cloud.spec.backbone == "resnet20" and cloud.spec.dim == 128
    assert cloud.preprocess == FASHION_MNIST_PREPROCESS and cloud.classes == tuple(FASHION_MNIST_CLASSES)
    assert cloud.config["epochs"] == 10 and cloud.config["augment"] and cloud.config["margin"] == 0.2
    prov = cloud.info["provenance"]
    assert prov["command"].startswith("hetero train-cloud ") and "--epochs 10" in prov["command"]
    assert prov["label"] == "measured" and 0.8 < prov["paragon"]["map_at_r"] < 1
    assert {"processor", "date", "torch"} <= set(prov["host"])
    meta = json.loads((pretrained_path("fmnist-resnet20") / "hetero.json").read_text())
    assert meta["info"]["dataset"] == "fashion-mnist/train"


def test_unknown_name_and_foreign_data_are_refused():
    from hetero.app.demo import _pretrained_cloud

    with pytest.raises(HeteroError, match="no shipped checkpoint named 'imagenet'"):
        load_pretrained("imagenet")
    with pytest.raises(HeteroError, match="trained on Fashion-MNIST, but --data holds other training images .*--train-cloud"):
        _pretrained_cloud(synthetic_dataset(100), lambda *a: None)

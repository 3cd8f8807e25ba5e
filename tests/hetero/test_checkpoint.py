import json
import pickle

import pytest
import torch

from hetero.checkpoint import check_same_space, fingerprint, load_checkpoint, save_checkpoint
from hetero.errors import HeteroError


def test_round_trip_keeps_outputs_metadata_and_fingerprint(tmp_path, tiny_cloud, prep):
    save_checkpoint(tiny_cloud, tmp_path / "c")
    back = load_checkpoint(tmp_path / "c")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(back.model(x), tiny_cloud.model.eval()(x))
        assert torch.equal(back.classifier.weight, tiny_cloud.classifier.weight)
    assert back.role == "cloud" and back.spec == tiny_cloud.spec and back.preprocess == prep
    assert back.fingerprint == tiny_cloud.fingerprint == back.space
    meta = json.loads((tmp_path / "c" / "hetero.json").read_text())
    assert meta["config"]["model"] == "test_resnet" and meta["classes"] == list(tiny_cloud.classes)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [".hetero-output.json", "hetero.json", "weights.safetensors"]


def test_fingerprint_is_canonical_and_sensitive(tiny_cloud, prep):
    fp = fingerprint(tiny_cloud.model, tiny_cloud.classifier, prep)
    assert len(fp) == 64 and fp == tiny_cloud.space
    model = type(tiny_cloud.model)(tiny_cloud.model.backbone, tiny_cloud.spec.dim)
    model.load_state_dict(dict(reversed(list(tiny_cloud.model.state_dict().items()))))
    assert fingerprint(model, tiny_cloud.classifier, prep) == fp
    with torch.no_grad():
        model.proj.bias[0] += 1e-6
    assert fingerprint(model, tiny_cloud.classifier, prep) != fp
    model.load_state_dict(tiny_cloud.model.state_dict())
    assert fingerprint(model, None, prep) != fp


def test_edge_records_the_cloud_space(tiny_edge, tiny_cloud):
    assert tiny_edge.role == "edge" and tiny_edge.space == tiny_cloud.space
    assert tiny_edge.fingerprint != tiny_cloud.space
    check_same_space(tiny_edge, tiny_cloud)


def test_space_mismatch_is_refused(tiny_edge, tiny_cloud, tmp_path):
    save_checkpoint(tiny_cloud, tmp_path / "c")
    other = load_checkpoint(tmp_path / "c")
    other.space = "f" * 64
    with pytest.raises(HeteroError, match="cloud space"):
        check_same_space(tiny_edge, other)


def test_existing_destination_is_not_overwritten(tmp_path, tiny_cloud):
    dest = tmp_path / "c"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # a directory hetero did not write: never replaced
        with pytest.raises(HeteroError, match="files hetero did not write"):
            save_checkpoint(tiny_cloud, dest, overwrite=overwrite)
        assert [p.name for p in dest.iterdir()] == ["keep.txt"]
        assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temp dir left behind
    save_checkpoint(tiny_cloud, tmp_path / "d")
    with pytest.raises(HeteroError, match="already holds a hetero cloud checkpoint; pass --overwrite"):
        save_checkpoint(tiny_cloud, tmp_path / "d")
    save_checkpoint(tiny_cloud, tmp_path / "d", overwrite=True)  # an earlier checkpoint of the same role
    assert load_checkpoint(tmp_path / "d").space == tiny_cloud.space


@pytest.mark.parametrize("damage", ["flip_byte", "pickle", "truncate"])
def test_damaged_weights_are_refused(tmp_path, tiny_cloud, damage):
    save_checkpoint(tiny_cloud, tmp_path / "c")
    w = tmp_path / "c" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    if damage == "flip_byte":
        data[-1] ^= 0xFF
    elif damage == "pickle":
        data = bytearray(pickle.dumps({"model.x": [1, 2, 3]}))
    else:
        data = data[: len(data) // 2]
    w.write_bytes(bytes(data))
    with pytest.raises(HeteroError, match="sha256"):
        load_checkpoint(tmp_path / "c")


def test_weights_matching_a_forged_hash_still_cannot_smuggle_a_pickle(tmp_path, tiny_cloud):
    from hetero._atomic import sha256_file

    save_checkpoint(tiny_cloud, tmp_path / "c")
    w, meta_path = tmp_path / "c" / "weights.safetensors", tmp_path / "c" / "hetero.json"
    w.write_bytes(pickle.dumps({"boom": 1}))
    meta = json.loads(meta_path.read_text())
    meta["weights_sha256"] = sha256_file(w)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(HeteroError, match="corrupt"):
        load_checkpoint(tmp_path / "c")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(HeteroError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "d").mkdir()
    with pytest.raises(HeteroError, match="not a hetero checkpoint"):
        load_checkpoint(tmp_path / "d")
    (tmp_path / "d" / "hetero.json").write_text("{not json")
    with pytest.raises(HeteroError, match="not valid JSON"):
        load_checkpoint(tmp_path / "d")
    (tmp_path / "d" / "hetero.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(HeteroError, match="not a hetero checkpoint"):
        load_checkpoint(tmp_path / "d")


def test_role_is_checked(tmp_path, tiny_edge):
    save_checkpoint(tiny_edge, tmp_path / "e")
    with pytest.raises(HeteroError, match="is a edge checkpoint, expected cloud"):
        load_checkpoint(tmp_path / "e", role="cloud")

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


def _edit_meta(ckpt_dir, fn):
    path = ckpt_dir / "hetero.json"
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def test_a_clouds_space_is_recomputed_never_read(tmp_path, tiny_cloud, tiny_edge, synth):
    """Cloud B with cloud A's space in its hetero.json is refused on load (one line, naming it and the
    fix); a loaded cloud's space is the fingerprint of its weights, and so is the target cache key."""
    from clitest import other_space_cloud

    from hetero.embed import embeddings_cache_path

    save_checkpoint(tiny_cloud, tmp_path / "a")
    other_space_cloud(tmp_path / "a", tmp_path / "b")
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert a.space == a.fingerprint and b.space == b.fingerprint != a.space
    key = embeddings_cache_path(b, synth[1], key=b.space).name
    assert key.startswith(b.fingerprint[:16])  # what cloud_targets and evaluate key the cache by
    _edit_meta(tmp_path / "b", lambda m: m.update(space=a.space))
    with pytest.raises(HeteroError) as e:
        load_checkpoint(tmp_path / "b")
    msg = str(e.value)
    assert f"claims space {a.space[:12]}, but its weights are space {b.space[:12]}" in msg and "\n" not in msg
    assert str(tmp_path / "b") in msg and "re-copy the original checkpoint or re-train it" in msg
    _edit_meta(tmp_path / "b", lambda m: m.pop("space"))  # no space at all: refused the same way
    with pytest.raises(HeteroError, match="claims space [(]none[)]"):
        load_checkpoint(tmp_path / "b")
    # an edge's space names its cloud and cannot be recomputed from its own weights: kept, and the
    # comparison is with the cloud's recomputed space
    save_checkpoint(tiny_edge, tmp_path / "e")
    edge = load_checkpoint(tmp_path / "e")
    assert edge.space == a.space != edge.fingerprint
    check_same_space(edge, a)
    with pytest.raises(HeteroError, match="cloud space"):
        check_same_space(edge, b)


def test_a_controls_space_is_its_own_fingerprint(tmp_path, tiny_cloud, synth):
    from hetero.train import TrainConfig, train_edge

    control = train_edge(TrainConfig(model="test_mobilenet", dim=16, epochs=1, batch_size=64, compat=False),
                         tiny_cloud, synth[0], progress=False)
    save_checkpoint(control, tmp_path / "k")
    assert load_checkpoint(tmp_path / "k").space == control.fingerprint
    _edit_meta(tmp_path / "k", lambda m: m.update(space=tiny_cloud.space))  # passing as an edge of the cloud
    with pytest.raises(HeteroError, match="claims space"):
        load_checkpoint(tmp_path / "k")


@pytest.mark.parametrize("value, word", [(float("inf"), "Inf"), (float("-inf"), "Inf"), (float("nan"), "NaN")])
def test_non_finite_weights_are_refused(tmp_path, tiny_cloud, value, word):
    ckpt = load_checkpoint(save_checkpoint(tiny_cloud, tmp_path / "c"))
    with torch.no_grad():
        ckpt.classifier.weight[1, 2] = value
    save_checkpoint(ckpt, tmp_path / "bad")
    with pytest.raises(HeteroError, match=f"weight 'classifier.weight' holds {word} values"):
        load_checkpoint(tmp_path / "bad")


@pytest.mark.parametrize("edit", [{"num_classes": 50_000_000}, {"num_classes": 2**62}])
def test_absurd_classifier_is_refused_before_allocation(tmp_path, tiny_cloud, edit):
    save_checkpoint(tiny_cloud, tmp_path / "c")
    _edit_meta(tmp_path / "c", lambda m: m["classifier"].update(edit))
    with pytest.raises(HeteroError, match="does not fit the model hetero.json describes|cannot rebuild the model"):
        load_checkpoint(tmp_path / "c")


def test_damaged_safetensors_header_with_a_matching_hash(tmp_path, tiny_cloud):
    import struct

    from hetero._atomic import sha256_file

    save_checkpoint(tiny_cloud, tmp_path / "c")
    w = tmp_path / "c" / "weights.safetensors"
    data = w.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    w.write_bytes(data[:8] + data[8:8 + n].replace(b'"F32"', b'"Q99"', 1) + data[8 + n:])
    _edit_meta(tmp_path / "c", lambda m: m.update(weights_sha256=sha256_file(w)))
    with pytest.raises(HeteroError) as e:
        load_checkpoint(tmp_path / "c")
    assert "cannot rebuild the model (Error while deserializing header" in str(e.value) and "\n" not in str(e.value)

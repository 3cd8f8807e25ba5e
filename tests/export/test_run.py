"""The export driver: FP32 simplification and checks, top-10 retrieval agreement, ORT Mobile, the
manifest's hashes and paths, and the output-directory rules."""
import json

import numpy as np
import onnx
import pytest

from devices import create_runner
from devices.artifact import load_manifest, open_artifact, sha256_path
from devices.errors import DeviceError
from export import export_checkpoint
from export.formats import ExportJob, retrieval_agreement
from hetero.checkpoint import load_checkpoint
from hetero.errors import HeteroError


def test_fp32_onnx_is_simplified_checked_and_keeps_a_dynamic_batch(saved):
    m = json.loads((saved / "export" / "manifest.json").read_text())
    (a,) = m["artifacts"]
    assert "onnxslim" in a["libraries"] and a["converter"].startswith("onnxslim")
    model = onnx.load(str(saved / "export" / a["file"]))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    out = inferred.graph.output[0].type.tensor_type.shape.dim
    assert out[0].dim_param and out[1].dim_value == 16
    assert not [n for n in model.graph.node if n.op_type in ("Identity", "Constant")]  # folded away
    assert not (saved / "export" / "edge.onnx.data").exists()


def test_a_just_written_artifact_is_checked_through_the_devices_runner(saved):
    """Export measures an artifact before any manifest lists it: the devices runner opens the file with
    its entry alone, and embeds as it does once the export is listed (what verify opens)."""
    d = saved / "export"
    (a,) = json.loads((d / "manifest.json").read_text())["artifacts"]
    assert a["fidelity"]["runtime"].startswith("onnxruntime ") and a["fidelity"]["runtime"].endswith(" CPUExecutionProvider")
    entry = {k: a[k] for k in ("format", "precision", "input", "output")}
    x = np.random.default_rng(3).standard_normal((9, 1, 28, 28)).astype(np.float32)
    with create_runner(d / "edge.onnx", "onnxruntime", entry=entry, batch_size=4) as r:
        got = r.embed(x)
    with create_runner(d, "onnxruntime") as r:
        np.testing.assert_array_equal(got, r.embed(x))
    with pytest.raises(DeviceError, match="runs onnx, ort artifacts, not coreml"):
        create_runner(d / "edge.onnx", "onnxruntime", entry={**entry, "format": "coreml"})
    with pytest.raises(DeviceError, match="lacks a format, an input shape"):
        create_runner(d / "edge.onnx", "onnxruntime", entry={"format": "onnx", "input": entry["input"]})
    with pytest.raises(DeviceError, match="does not exist"):
        create_runner(d / "gone.onnx", "onnxruntime", entry=entry)


def _brute_force_agreement(ref, cand, gallery, k):
    def top(q):
        s = q @ gallery.T
        return [set(np.argsort(-row, kind="stable")[:k].tolist()) for row in s]

    return float(np.mean([len(a & b) / k for a, b in zip(top(ref), top(cand))]))


def test_top10_agreement_matches_brute_force():
    rng = np.random.default_rng(0)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    gallery = unit(rng.standard_normal((500, 8)))
    ref = unit(rng.standard_normal((40, 8)))
    job = ExportJob(None, None, "e", np.zeros((40, 1)), "", ref, gallery=gallery)
    assert retrieval_agreement(job, ref) == 1.0
    for noise in (0.05, 0.3, 3.0):
        cand = unit(ref + noise * rng.standard_normal(ref.shape))
        assert retrieval_agreement(job, cand) == pytest.approx(_brute_force_agreement(ref, cand, gallery, 10))
    assert retrieval_agreement(job, unit(rng.standard_normal(ref.shape))) < 0.2  # unrelated queries disagree
    own = ExportJob(None, None, "e", np.zeros((40, 1)), "", ref)  # no gallery: the other check inputs, self excluded
    assert retrieval_agreement(own, ref) == 1.0
    cand = unit(ref + 0.3 * rng.standard_normal(ref.shape))
    masked = ref @ ref.T - 10 * np.eye(40)  # self excluded from the brute force too
    want = np.mean([len(set(np.argsort(-a, kind="stable")[:10]) & set(np.argsort(-b, kind="stable")[:10])) / 10
                    for a, b in zip(masked, cand @ ref.T - 10 * np.eye(40))])
    assert retrieval_agreement(own, cand) == pytest.approx(want)


def test_ort_mobile_runs_and_names_its_operators(tmp_path, saved, synth, prep):
    import onnxruntime as ort

    edge = load_checkpoint(saved / "edge")
    x = prep.apply(synth[1].images[:64])
    gallery = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    m = export_checkpoint(edge, tmp_path / "o", formats=("ort",), check_inputs=x, check_desc="synthetic (64)",
                          gallery=gallery, gallery_desc="random unit rows")
    assert [a["export_format"] for a in m["artifacts"]] == ["onnx", "ort"]  # made from the FP32 ONNX
    a = m["artifacts"][1]
    assert a["format"] == "ort" and a["file"] == "edge.ort" and a["made_from"] == "edge.onnx"
    # top-10 sets of ORT vs torch embeddings: not == 1.0, since a near-tie at rank 10 (the tiny model's
    # weights differ with the CPU it trained on) may swap under last-bit differences; one swap is 1/640
    assert a["fidelity"]["min_cosine"] >= 0.99999 and a["fidelity"]["top10_agreement"] >= 0.99
    assert a["fidelity"]["top10_gallery"] == "random unit rows"
    config = tmp_path / "o" / a["required_operators_config"]
    text = config.read_text()
    assert sha256_path(config) == a["required_operators_config_sha256"]
    assert "ai.onnx;" in text and "Conv" in text and "/tmp" not in text  # names the shipped file, no temp paths
    sess = ort.InferenceSession(str(tmp_path / "o" / "edge.ort"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x[:5]})[0]
    ref = load_checkpoint(saved / "edge").model(__import__("torch").from_numpy(x[:5])).detach().numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert open_artifact(tmp_path / "o", "ort").path.name == "edge.ort"


def test_overwrite_replaces_only_a_hetero_export(tmp_path, saved):
    edge = load_checkpoint(saved / "edge")
    user = tmp_path / "photos"
    user.mkdir()
    (user / "holiday.jpg").write_bytes(b"not yours")
    with pytest.raises(HeteroError, match="files hetero did not write"):
        export_checkpoint(edge, user, overwrite=True)
    assert (user / "holiday.jpg").read_bytes() == b"not yours"
    export_checkpoint(edge, tmp_path / "e")
    export_checkpoint(edge, tmp_path / "e", overwrite=True)  # an earlier export is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "photos"]


@pytest.mark.parametrize("name", ["../outside.onnx", "/etc/passwd", "sub/../../x.onnx", ""])
def test_manifest_paths_may_not_escape_the_export_dir(tmp_path, saved, name):
    import shutil

    d = tmp_path / "e"
    shutil.copytree(saved / "export", d)
    m = json.loads((d / "manifest.json").read_text())
    m["artifacts"][0]["file"] = name
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DeviceError, match="escapes the export directory|invalid artifact path"):
        load_manifest(d)


def test_manifest_link_out_of_the_dir_is_refused(tmp_path, saved):
    import shutil

    d = tmp_path / "e"
    shutil.copytree(saved / "export", d)
    (tmp_path / "elsewhere.onnx").write_bytes((d / "edge.onnx").read_bytes())
    (d / "edge.onnx").unlink()
    (d / "edge.onnx").symlink_to(tmp_path / "elsewhere.onnx")
    with pytest.raises(DeviceError, match="escapes the export directory"):
        open_artifact(d, "onnx")


def test_directory_hash_sees_edits_renames_and_new_files(tmp_path):
    d = tmp_path / "m.mlpackage"
    (d / "Data").mkdir(parents=True)
    (d / "Data" / "w.bin").write_bytes(b"\0" * 10)
    (d / "Manifest.json").write_text("{}")
    h = sha256_path(d)
    assert sha256_path(d) == h
    (d / "Data" / "w.bin").write_bytes(b"\0" * 9 + b"\1")
    h2 = sha256_path(d)
    assert h2 != h
    (d / "Data" / "w.bin").rename(d / "Data" / "v.bin")
    assert sha256_path(d) not in (h, h2)
    (d / "extra").write_text("")
    assert len({h, h2, sha256_path(d)}) == 3

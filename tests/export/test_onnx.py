import json

import numpy as np
import onnx
import pytest
import torch

from export import export_checkpoint
from hetero._atomic import sha256_file
from hetero.checkpoint import load_checkpoint
from hetero.errors import HeteroError


def test_manifest_lists_a_single_file_dynamic_batch_onnx(saved, tiny_cloud):
    d = saved / "export"
    assert sorted(p.name for p in d.iterdir()) == [".hetero-output.json", "edge.onnx", "manifest.json"]  # no external .data
    m = json.loads((d / "manifest.json").read_text())
    assert m["format"] == "hetero-manifest" and m["space"] == tiny_cloud.space and m["dim"] == 16
    assert m["preprocess"]["size"] == 28 and m["model"]["role"] == "edge"
    (a,) = m["artifacts"]
    assert a["format"] == "onnx" and a["precision"] == "fp32" and a["sha256"] == sha256_file(d / "edge.onnx")
    assert a["input"]["shape"] == ["batch", 1, 28, 28] and a["output"]["shape"] == ["batch", 16]
    assert a["fidelity"]["min_cosine"] >= 0.99999 and a["fidelity"]["max_abs_diff"] < 1e-4
    assert a["fidelity"]["num_inputs"] == 256 and "synthetic" in a["fidelity"]["inputs"]
    model = onnx.load(str(d / "edge.onnx"))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [x.dim_value for x in dims[1:]] == [1, 28, 28]


def test_export_with_real_inputs_records_them(tmp_path, saved, synth, prep):
    edge = load_checkpoint(saved / "edge")
    x = prep.apply(synth[1].images[:50])
    m = export_checkpoint(edge, tmp_path / "x", check_inputs=x, check_desc="synthetic/test (50)")
    f = m["artifacts"][0]["fidelity"]
    assert f["num_inputs"] == 50 and f["inputs"] == "synthetic/test (50)" and f["min_cosine"] >= 0.99999


def test_export_refuses_existing_output_and_leaves_nothing_behind(tmp_path, saved):
    edge = load_checkpoint(saved / "edge")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep").write_text("1")
    with pytest.raises(HeteroError, match="files hetero did not write"):
        export_checkpoint(edge, tmp_path / "x")
    with pytest.raises(HeteroError, match="unknown export format"):
        export_checkpoint(edge, tmp_path / "y", formats=("tflite",))
    with pytest.raises(HeteroError, match="check inputs have shape"):
        export_checkpoint(edge, tmp_path / "z", check_inputs=np.zeros((2, 3, 28, 28), np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_exported_model_is_the_torch_model(saved):
    import onnxruntime as ort

    edge = load_checkpoint(saved / "edge")
    sess = ort.InferenceSession(str(saved / "export" / "edge.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        x = np.random.default_rng(n).standard_normal((n, 1, 28, 28)).astype(np.float32)
        got = sess.run(None, {"input": x})[0]
        with torch.no_grad():
            ref = edge.model(torch.from_numpy(x)).numpy()
        assert got.shape == (n, 16)
        np.testing.assert_allclose(got, ref, atol=1e-5)

"""ONNX FP16 and INT8 made from the FP32 ONNX: fidelity against torch, sizes, sources, bad input."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from devices import create_runner, open_artifact
from export import default_formats, export_checkpoint
from export.onnx import onnx_from_torch
from export.onnx_precision import onnx_int8_from_onnx
from hetero._atomic import sha256_file
from hetero.checkpoint import load_checkpoint
from hetero.errors import HeteroError


@pytest.fixture(scope="module")
def exported(tmp_path_factory, saved, synth, prep):
    edge = load_checkpoint(saved / "edge")
    out = tmp_path_factory.mktemp("prec") / "x"
    m = export_checkpoint(edge, out, formats=("onnx-fp16", "onnx-int8"), name="edge",
                          check_inputs=prep.apply(synth[1].images), check_desc="synthetic/test (200)",
                          calib_inputs=prep.apply(synth[0].images[:250]))  # not a multiple of any batch
    return edge, out, m


def test_fp16_and_int8_are_made_from_the_fp32_onnx(exported):
    edge, out, m = exported
    arts = {a["export_format"]: a for a in m["artifacts"]}
    assert list(arts) == ["onnx", "onnx-fp16", "onnx-int8"]  # the source is built first, even if not asked for
    assert [arts[f]["precision"] for f in arts] == ["fp32", "fp16", "int8"]
    assert arts["onnx-fp16"]["made_from"] == arts["onnx-int8"]["made_from"] == "edge.onnx"
    assert arts["onnx-int8"]["calibration"] == {"images": 250, "source": "training split", "method": "percentile"}
    assert json.loads((out / "manifest.json").read_text())["artifacts"] == m["artifacts"]
    for f, a in arts.items():  # every file verifies against its manifest hash and runs in onnxruntime
        art = open_artifact(out, "onnx", a["precision"])
        assert art.path.name == a["file"] and a["fidelity"]["label"] == "measured"
        with create_runner(out, "onnxruntime") as r:
            assert r.embed(np.zeros((1, *edge.input_shape), np.float32)).shape == (1, 16)


def test_fidelity_and_sizes(exported):
    _, _, m = exported
    arts = {a["export_format"]: a for a in m["artifacts"]}
    assert arts["onnx"]["fidelity"]["min_cosine"] >= 0.99999
    assert arts["onnx-fp16"]["fidelity"]["min_cosine"] >= 0.999
    # INT8 of a 5-epoch toy model on synthetic data: looser than the 0.99 target, which is judged on
    # the Fashion-MNIST edge model; still far above unrelated embeddings (cosine about 0)
    assert arts["onnx-int8"]["fidelity"]["min_cosine"] >= 0.95 and arts["onnx-int8"]["fidelity"]["mean_cosine"] >= 0.99
    fp32 = arts["onnx"]["weight_bytes"]
    assert 0.45 <= arts["onnx-fp16"]["weight_bytes"] / fp32 <= 0.55
    # int8 weights; biases stay int32 and per-channel scales fp32, which weigh a lot in a 1.6k-weight toy
    assert arts["onnx-int8"]["weight_bytes"] / fp32 <= 0.6


def test_fp16_all_zero_image_gives_no_nan(exported):
    import onnx
    import onnxruntime as ort

    edge, out, m = exported
    model = onnx.load(str(out / "edge.fp16.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types
    kept = {n.op_type for n in model.graph.node} & {"ReduceL2", "Div"}
    assert kept  # the normalisation is there, and stays FP32 (block list)
    sess = ort.InferenceSession(str(out / "edge.fp16.onnx"), providers=["CPUExecutionProvider"])
    z = sess.run(None, {"input": np.zeros((3, *edge.input_shape), np.float32)})[0]
    assert z.dtype == np.float32 and np.isfinite(z).all()
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-3)


def test_default_formats_and_bad_input(tmp_path, saved, synth, prep, monkeypatch):
    edge = load_checkpoint(saved / "edge")
    ok, skipped = default_formats(calib=False)
    assert {"onnx", "onnx-fp16", "ort"} <= set(ok) and "onnx-int8" not in ok
    assert "calib" in next(s["reason"] for s in skipped if s["format"] == "onnx-int8")
    assert set(default_formats(calib=True)[0]) == set(ok) | {"onnx-int8"}
    assert "onnx-int8" in default_formats(calib=False, int8_mode="dynamic")[0]  # dynamic needs no calibration
    with pytest.raises(HeteroError, match="onnx-int8 needs calibration images"):
        export_checkpoint(edge, tmp_path / "a", formats=("onnx-int8",))
    with pytest.raises(HeteroError, match="calibration inputs have shape"):
        export_checkpoint(edge, tmp_path / "b", formats=("onnx-int8",), calib_inputs=np.zeros((4, 3, 28, 28), np.float32))

    import export.onnx_precision

    def broken(*a, **k):
        raise HeteroError("INT8 quantisation by onnxruntime failed: injected")

    monkeypatch.setattr(export.onnx_precision, "onnx_int8_from_onnx", broken)  # a failure after two formats were written
    with pytest.raises(HeteroError, match="injected"):
        export_checkpoint(edge, tmp_path / "c", formats=("onnx-fp16", "onnx-int8"),
                          calib_inputs=prep.apply(synth[0].images[:64]))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written


def test_dynamic_int8_needs_no_calibration(tmp_path, saved, synth, prep):
    edge = load_checkpoint(saved / "edge")
    m = export_checkpoint(edge, tmp_path / "d", formats=("onnx-int8",), options={"int8_mode": "dynamic"},
                          check_inputs=prep.apply(synth[1].images), check_desc="synthetic/test (200)")
    a = m["artifacts"][-1]
    assert a["quantization"] == "dynamic" and "calibration" not in a and a["precision"] == "int8"
    assert a["fidelity"]["min_cosine"] >= 0.95 and a["fidelity"]["mean_cosine"] >= 0.99
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "d" / a["file"])).graph.node}
    assert ops & {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}  # really quantised at run time


def test_a_format_that_breaks_the_model_is_refused_or_skipped(tmp_path, saved, synth, prep, monkeypatch):
    """An artifact whose embeddings no longer match torch (mean cosine < 0.9) is never shipped: an
    explicit request fails naming the format and the measured cosine; the default set skips it."""
    import export.onnx as eo

    real = eo.runner_embeddings

    def scrambled(job, path, runtime, entry, **settings):
        got, rt = real(job, path, runtime, entry, **settings)
        return (got[::-1].copy() if str(path).endswith(".fp16.onnx") else got), rt

    monkeypatch.setattr(eo, "runner_embeddings", scrambled)
    edge = load_checkpoint(saved / "edge")
    x = prep.apply(synth[1].images)
    with pytest.raises(HeteroError, match=r"onnx-fp16 breaks this model: mean cosine 0\.\d+"):
        export_checkpoint(edge, tmp_path / "a", formats=("onnx-fp16",), check_inputs=x)
    assert not (tmp_path / "a").exists()
    m = export_checkpoint(edge, tmp_path / "b", formats=None, check_inputs=x,
                          options={"batch_sizes": (1, 2)})
    assert "onnx-fp16" not in [a["export_format"] for a in m["artifacts"]]
    assert any(s["format"] == "onnx-fp16" and "breaks this model" in s["reason"] for s in m["skipped"])


def test_duplicate_casts_from_older_converters_are_dropped():
    """onnxruntime 1.30's FP16 converter writes one FP32 cast twice when a tensor feeds two blocked
    nodes (seen on the GPU host): identical duplicates are dropped, a real clash is an error."""
    from onnx import TensorProto, helper

    from export.onnx_precision import _drop_duplicate_nodes

    cast = helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT, name="c")
    g = helper.make_graph([cast, helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT, name="c"),
                           helper.make_node("Relu", ["x32"], ["y"], name="r")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    m = helper.make_model(g)
    _drop_duplicate_nodes(m)
    assert [n.op_type for n in m.graph.node] == ["Cast", "Relu"]
    onnx.checker.check_model(m)
    m.graph.node.append(helper.make_node("Relu", ["x32"], ["y"], name="other"))
    with pytest.raises(HeteroError, match="'y' twice from different nodes"):
        _drop_duplicate_nodes(m)


def test_every_onnx_file_says_what_it_embeds_and_which_space_it_lives_in(exported):
    """metadata_props on the FP32, FP16 and INT8 files, as the Core ML packages carry (issue 22)."""
    edge, d, m = exported
    for a in m["artifacts"]:
        props = {p.key: p.value for p in onnx.load(str(d / a["file"])).metadata_props}
        assert props["hetero.precision"] == a["precision"] and props["hetero.role"] == "edge"
        assert props["hetero.embedding_dim"] == str(m["dim"]) == "16"
        assert json.loads(props["hetero.preprocessing"]) == m["preprocess"] == edge.preprocess.to_dict()
        assert props["hetero.space_fingerprint"] == m["space"] == edge.space
        assert props["hetero.checkpoint_fingerprint"] == m["model"]["checkpoint_fingerprint"] == edge.fingerprint
        assert a["sha256"] == sha256_file(d / a["file"])  # the manifest hashes the file as written, metadata included


def test_int8_of_a_nearly_constant_tensor_falls_back_to_minmax_calibration(tmp_path):
    """Percentile calibration's 2048-bin histogram cannot split a tensor whose values all lie within a
    few float32 steps (a saturated hard-sigmoid gate, as in a trained MobileNetV3): MinMax calibrates
    it instead, the entry says so, and the INT8 model still runs and follows the FP32 one."""
    class Gate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return torch.flatten(y * (1.0 + 1e-6 * torch.tanh(y)), 1)  # a gate of 1 +- a few float32 steps

    torch.manual_seed(0)
    src = tmp_path / "gate.onnx"
    onnx_from_torch(Gate().eval(), (3, 8, 8), src)
    x = np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32)
    report = {}
    onnx_int8_from_onnx(src, tmp_path / "gate.int8.onnx", x, input_name="input", report=report)
    assert report == {"calibration": "minmax"}
    ref = ort.InferenceSession(str(src)).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(tmp_path / "gate.int8.onnx")).run(None, {"input": x})[0]
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.99

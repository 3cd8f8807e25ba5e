"""Core ML packages (FP32, FP16, int8 weights, 6/4-bit palettes) converted on Linux: manifest entries,
the saved specs (inputs, enumerated batch sizes, iOS 16, metadata, precision), the image input,
compression, and the ops Core ML cannot express. Predictions need macOS: fidelity is emulated by
hetero's Core ML interpreter, never measured."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("coremltools", reason="coremltools is not installed (pip install 'hetero[coreml]')")

import coremltools as ct  # noqa: E402
from coremltools.proto import MIL_pb2  # noqa: E402

from devices.artifact import sha256_path  # noqa: E402
from export import export_checkpoint  # noqa: E402
from export.formats import FormatCannotExpress  # noqa: E402
from hetero.checkpoint import load_checkpoint  # noqa: E402
from hetero.data import Preprocess  # noqa: E402
from hetero.errors import HeteroError  # noqa: E402
from hetero.models import ModelSpec, create_embedding_model  # noqa: E402

pytestmark = pytest.mark.coreml

ALL = ("coreml", "coreml-fp16", "coreml-int8w", "coreml-palette6", "coreml-palette4")


def spec_of(path):
    return ct.models.MLModel(str(path), skip_model_load=True).get_spec()


def ops_of(spec):
    return list(spec.mlProgram.functions["main"].block_specializations.values())[0].operations


def dtype(op):
    return MIL_pb2.DataType.Name(op.outputs[0].type.tensorType.dataType)


def const_value(spec, name):
    (op,) = [o for o in ops_of(spec) if o.type == "const" and o.outputs[0].name == name]
    return list(op.attributes["val"].immediateValue.tensor.floats.values)


@pytest.fixture(scope="module")
def edge(saved):
    return load_checkpoint(saved / "edge")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, edge, synth, prep):
    out = tmp_path_factory.mktemp("coreml") / "x"
    # the tiny model's largest tensors have 512 elements: under coremltools' default threshold (2048)
    m = export_checkpoint(edge, out, formats=ALL[1:], name="edge", check_inputs=prep.apply(synth[1].images[:32]),
                          options={"coreml.weight_threshold": 100})
    return out, m, {a["export_format"]: a for a in m["artifacts"]}


def test_entries_are_built_from_torch_and_from_the_fp32_package(exported):
    out, m, arts = exported
    assert sorted(arts) == sorted(ALL)  # coreml is built too, as the source of the compressed three
    assert list(arts).index("coreml") < list(arts).index("coreml-int8w")
    assert [arts[f]["precision"] for f in ALL] == ["fp32", "fp16", "int8-weights", "palette6", "palette4"]
    assert [arts[f]["file"] for f in ALL] == ["edge.mlpackage", "edge.fp16.mlpackage", "edge.int8w.mlpackage",
                                              "edge.palette6.mlpackage", "edge.palette4.mlpackage"]
    assert arts["coreml"]["made_from"] == arts["coreml-fp16"]["made_from"] == "torch (torch.jit.trace)"
    assert {arts[f]["made_from"] for f in ALL[2:]} == {"edge.mlpackage"}
    assert json.loads((out / "manifest.json").read_text())["artifacts"] == m["artifacts"] and m["skipped"] == []
    for a in arts.values():
        assert a["format"] == "coreml" and a["status"] == "built" and a["runtime"] == "coreml"
        assert (out / a["file"]).is_dir() and a["sha256"] == sha256_path(out / a["file"])
        assert a["fidelity"]["label"] == "emulated" and a["fidelity"]["runtime"].startswith("hetero Core ML interpreter")
        assert a["fidelity"]["min_cosine"] >= (0.99999 if a["precision"] == "fp32" else 0.9)
        assert a["deployment_target"] == "iOS16" and a["spec_version"] >= 7 and a["batch_sizes"] == [1, 8, 32]
        assert a["input_kind"] == "tensor" and a["libraries"]["coremltools"] == ct.__version__
        assert a["input"]["shape"] == ["batch in (1, 8, 32)", 1, 28, 28] and a["input"]["name"] == "input"
        assert a["output"]["shape"] == ["batch in (1, 8, 32)", 16] and a["output"]["name"] == "embedding"
        assert {"conv", "linear", "reduce_l2_norm"} <= set(a["ops"]) and a["ops"] == sorted(a["ops"])
        assert a["weight_bytes"] == (out / a["file"] / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size
    assert arts["coreml"]["compute_precision"] == "fp32" and arts["coreml-fp16"]["compute_precision"] == "fp16"


def test_weights_shrink_and_the_compression_is_recorded(exported):
    _, _, arts = exported
    fp32 = arts["coreml"]["weight_bytes"]
    assert arts["coreml-fp16"]["weight_bytes"] < 0.75 * fp32  # fp16 weights; blob headers weigh in a 1.7k model
    for f, op in (("coreml-int8w", "constexpr_affine_dequantize"), ("coreml-palette6", "constexpr_lut_to_dense"),
                  ("coreml-palette4", "constexpr_lut_to_dense")):
        c = arts[f]["compression"]
        assert arts[f]["weight_bytes"] < fp32 and op in arts[f]["ops"] and c["compressed"]["ops"] == [op]
        assert c["weight_threshold"] == 100
        # the 128-, 144- and 512-element tensors (x2) are compressed; biases and small kernels are not
        assert c["compressed"]["tensors"] == 4 and c["compressed"]["params"] == 128 + 144 + 512 + 512
        assert c["uncompressed"]["tensors"] > 0
    assert arts["coreml-palette6"]["compression"]["nbits"] == 6 and arts["coreml-palette4"]["compression"]["nbits"] == 4
    assert arts["coreml-palette4"]["weight_bytes"] < arts["coreml-palette6"]["weight_bytes"]
    assert arts["coreml-int8w"]["compression"]["dtype"] == "int8"


def test_saved_spec_input_batch_sizes_target_and_metadata(exported, edge, prep):
    out, _, _ = exported
    spec = spec_of(out / "edge.mlpackage")
    assert spec.specificationVersion >= 7 and spec.WhichOneof("Type") == "mlProgram"
    (inp,) = spec.description.input
    assert inp.name == "input" and [o.name for o in spec.description.output] == ["embedding"]
    shapes = [list(s.shape) for s in inp.type.multiArrayType.enumeratedShapes.shapes]
    assert shapes == [[1, 1, 28, 28], [8, 1, 28, 28], [32, 1, 28, 28]]
    assert list(inp.type.multiArrayType.shape) == [1, 1, 28, 28]  # the default: the first batch size
    md = spec.description.metadata
    assert md.author == "hetero" and md.versionString and md.license == "Apache-2.0"
    assert edge.space[:12] in md.shortDescription
    u = md.userDefined
    assert u["hetero.space_fingerprint"] == edge.space and u["hetero.checkpoint_fingerprint"] == edge.fingerprint
    assert json.loads(u["hetero.preprocessing"]) == prep.to_dict() and u["hetero.embedding_dim"] == "16"
    assert json.loads(u["hetero.batch_sizes"]) == [1, 8, 32] and u["hetero.output"] == "L2-normalised embedding"
    assert "NCHW" in u["hetero.input_layout"]


def test_fp16_package_has_fp16_weights_and_fp32_io_and_normalisation(exported):
    out, _, _ = exported
    fp32, fp16 = spec_of(out / "edge.mlpackage"), spec_of(out / "edge.fp16.mlpackage")
    weights = {o.outputs[0].name: dtype(o) for o in ops_of(fp16) if o.type == "const" and "weight" in o.outputs[0].name}
    assert weights and set(weights.values()) == {"FLOAT16"}
    assert {dtype(o) for o in ops_of(fp32) if o.type == "const" and "weight" in o.outputs[0].name} == {"FLOAT32"}
    assert {dtype(o) for o in ops_of(fp16) if o.type == "conv"} == {"FLOAT16"}
    assert {dtype(o) for o in ops_of(fp16) if o.type in ("reduce_l2_norm", "maximum")} == {"FLOAT32"}
    f32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    assert fp16.description.input[0].type.multiArrayType.dataType == f32
    assert fp16.description.output[0].type.multiArrayType.dataType == f32


def test_custom_batch_sizes_and_default_threshold(tmp_path, edge):
    m = export_checkpoint(edge, tmp_path / "x", formats=("coreml-int8w",), options={"batch_sizes": (2, 4)})
    a, q = m["artifacts"]
    shapes = spec_of(tmp_path / "x" / a["file"]).description.input[0].type.multiArrayType.enumeratedShapes.shapes
    assert [s.shape[0] for s in shapes] == [2, 4] and a["batch_sizes"] == q["batch_sizes"] == [2, 4]
    assert a["input"]["shape"][0] == "batch in (2, 4)"
    # coremltools' default threshold (2048 elements) skips every tensor of the tiny model: said so
    assert q["compression"]["compressed"]["tensors"] == 0 and "nothing was compressed" in q["compression"]["note"]
    with pytest.raises(HeteroError, match="batch_sizes must be distinct positive integers"):
        export_checkpoint(edge, tmp_path / "y", formats=("coreml",), options={"batch_sizes": (0, 4)})


def test_image_input_does_the_preprocessing(tmp_path, edge, prep, capfd):
    m = export_checkpoint(edge, tmp_path / "x", formats=("coreml",), options={"coreml.image_input": True})
    assert capfd.readouterr() == ("", "")  # no progress bars, warnings or log lines from coremltools
    (a,) = m["artifacts"]
    assert a["input_kind"] == "image" and a["batch_sizes"] == [1] and a["input"]["shape"] == [1, 1, 28, 28]
    spec = spec_of(tmp_path / "x" / a["file"])
    t = spec.description.input[0].type
    assert t.WhichOneof("Type") == "imageType" and (t.imageType.width, t.imageType.height) == (28, 28)
    assert t.imageType.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.GRAYSCALE
    (scale,), (bias,) = const_value(spec, "input__scaled___y_0"), const_value(spec, "input__biased___y_0")
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    pixels = np.pad(pixels, ((0, 0), (0, 12), (0, 12), (0, 0)))
    want = prep.apply(pixels)
    np.testing.assert_allclose(pixels.transpose(0, 3, 1, 2) * np.float32(scale) + np.float32(bias), want, atol=1e-5)
    assert a["input"]["scale"] == pytest.approx(scale) and a["input"]["bias"] == pytest.approx([bias])
    assert "image" in spec.description.metadata.userDefined["hetero.input_layout"]


def test_rgb_image_input_with_one_std_and_with_per_channel_std(tmp_path, edge):
    rgb = Preprocess(28, 3, (0.5, 0.4, 0.3), (0.25, 0.25, 0.25))
    ck = dataclasses.replace(edge, model=create_embedding_model(ModelSpec("test_mobilenet", 16), 3).eval(), preprocess=rgb)
    m = export_checkpoint(ck, tmp_path / "x", formats=("coreml",), options={"coreml.image_input": True})
    spec = spec_of(tmp_path / "x" / "edge.mlpackage")
    assert spec.description.input[0].type.imageType.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    bias = const_value(spec, "input__biased___y_0")
    assert bias == pytest.approx([-0.5 / 0.25, -0.4 / 0.25, -0.3 / 0.25]) and m["artifacts"][0]["input"]["shape"][1] == 3
    assert m["artifacts"][0]["image_type"]["channel_scale"] is None  # one std: the ImageType alone is exact
    # per-channel std (ImageNet's): the ImageType gives pixel / 255 - mean, then a per-channel multiply by 1 / std
    per_channel = dataclasses.replace(ck, preprocess=Preprocess(28, 3, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)))
    m = export_checkpoint(per_channel, tmp_path / "y", formats=("coreml",), options={"coreml.image_input": True},
                          check_inputs=per_channel.preprocess.apply(
                              np.random.default_rng(0).integers(0, 256, (8, 28, 28, 3), dtype=np.uint8)))
    (a,) = m["artifacts"]
    spec = spec_of(tmp_path / "y" / a["file"])
    assert const_value(spec, "input__biased___y_0") == pytest.approx([-0.5, -0.4, -0.3])
    assert a["image_type"] == {"scale": pytest.approx(1 / 255), "bias": pytest.approx([-0.5, -0.4, -0.3]),
                               "channel_scale": pytest.approx([5.0, 1 / 0.3, 2.5])}
    assert a["input"]["scale"] == pytest.approx([1 / (255 * s) for s in (0.2, 0.3, 0.4)])
    assert a["input"]["bias"] == pytest.approx([-0.5 / 0.2, -0.4 / 0.3, -0.3 / 0.4]) and "per-channel" in a["input"]["normalisation"]
    assert a["fidelity"]["label"] == "emulated" and a["fidelity"]["min_cosine"] > 0.99999
    assert "multiplies channel c by 1 / std_c" in spec.description.metadata.userDefined["hetero.input_layout"]


class _WithFFT(torch.nn.Module):
    """The edge model plus a term coremltools has no conversion for (torch.fft.rfft2)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.dim = inner.dim

    def forward(self, x):
        energy = torch.fft.rfft2(x).abs().mean(dim=(1, 2, 3)).unsqueeze(1)
        return F.normalize(self.inner(x) + 1e-3 * energy, dim=1)


def test_an_op_core_ml_cannot_express(tmp_path, edge):
    ck = dataclasses.replace(edge, model=_WithFFT(edge.model).eval())
    want = r"^coreml cannot express op 'aten::fft_rfft2' \(node .+\): PyTorch .*; export another format or replace the op$"
    with pytest.raises(FormatCannotExpress, match=want) as e:
        export_checkpoint(ck, tmp_path / "x", formats=("coreml",))
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()
    # the default "every format" export lists the Core ML formats as skipped, naming the op, and goes on
    m = export_checkpoint(ck, tmp_path / "all", formats=None)
    built = [a["export_format"] for a in m["artifacts"]]
    assert "onnx" in built and not set(built) & set(ALL)
    why = {s["format"]: s["reason"] for s in m["skipped"]}
    assert why["coreml"].startswith("coreml cannot express op 'aten::fft_rfft2'")
    assert why["coreml-fp16"].startswith("coreml-fp16 cannot express op 'aten::fft_rfft2'")
    for f in ALL[2:]:
        assert "made from coreml, which was skipped" in why[f]

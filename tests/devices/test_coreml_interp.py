"""hetero's Core ML reference interpreter (devices.coreml_interp) and the Core ML runners: packages
exported from every backbone family at FP32, FP16, with compressed weights and with an image input,
run on Linux and compared with torch; the FP16 emulation; ops the interpreter lacks; conv and pool
geometry against torch on hand-built MIL programs."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("coremltools", reason="coremltools is not installed (pip install 'hetero[coreml]')")

import coremltools as ct  # noqa: E402
from coremltools.converters.mil import Builder as mb  # noqa: E402

import devices.coreml_interp as ci  # noqa: E402
from devices import (  # noqa: E402
    DeviceError,
    coreml_runner,  # noqa: E402,F401  (registers the runners)
    create_runner,
)
from devices.coreml_interp import InputSpec, Interpreter, load_program  # noqa: E402
from devices.runner import RUNNERS  # noqa: E402
from export import export_checkpoint  # noqa: E402
from export.formats import FormatBreaksModel  # noqa: E402
from hetero.checkpoint import Checkpoint  # noqa: E402
from hetero.data import Preprocess  # noqa: E402
from hetero.models import ModelSpec, create_backbone, create_embedding_model, list_backbones  # noqa: E402
from hetero.models.mobilenet import MobileNet  # noqa: E402
from hetero.models.resnet import CifarResNet  # noqa: E402
from hetero.nas.subnet import NasMobileNetV3

pytestmark = pytest.mark.coreml

ALL = ("coreml", "coreml-fp16", "coreml-int8w", "coreml-palette6", "coreml-palette4")
# every backbone family and the tiny registered variant that stands in for it here (the benchmark
# benchmarks/coreml_interp.py runs every registered backbone at full size)
FAMILIES = {MobileNet: "test_mobilenet", CifarResNet: "test_resnet", NasMobileNetV3: "test_nas_mbv3"}
# an untrained NAS subnet (squeeze-excite gates) loses too much to 4-bit palettes (mean cosine 0.6-0.8), which
# the export refuses as breaking it; the palette decoding is checked on the other families
FORMATS = {name: tuple(f for f in ALL if not (name == "test_nas_mbv3" and f == "coreml-palette4"))
           for name in FAMILIES.values()}
# compressed weights change the model: their bounds are loose; that the interpreter decompresses them
# exactly as coremltools does is checked separately
MIN_COS = {"fp32": 0.99999, "fp16": 0.999, "int8-weights": 0.999, "palette6": 0.99, "palette4": 0.95}
MIN_COS_FOR = {("test_nas_mbv3", "int8-weights"): 0.998, ("test_nas_mbv3", "palette6"): 0.9}  # untrained NAS stand-in: 0.9983, 0.949 measured
PREP = Preprocess(28, 1, (0.286,), (0.353,))


def cosines(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def checkpoint(backbone: str, seed: int = 0, in_channels: int = 1, prep: Preprocess = PREP) -> Checkpoint:
    """An untrained model whose batch-norm statistics are set from a batch (folded BN is then not
    the identity, and deep ResNets' activations stay in FP16 range)."""
    torch.manual_seed(seed)
    spec = ModelSpec(backbone, 16)
    model = create_embedding_model(spec, in_channels)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    model.train()
    with torch.no_grad():
        model(torch.randn(64, in_channels, 28, 28))
    return Checkpoint(role="edge", spec=spec, model=model.eval(), classifier=None, preprocess=prep,
                      classes=tuple("abcdefghij"), space="0" * 64)


def images(n: int, seed: int = 1, channels: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28, channels), dtype=np.uint8)


def torch_embed(ck, x):
    with torch.no_grad():
        return ck.model(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module", params=sorted(FAMILIES.values()))
def family(request, tmp_path_factory):
    """A stand-in model exported to every Core ML format, the export checked with 64 inputs."""
    ck = checkpoint(request.param)
    out = tmp_path_factory.mktemp("coreml-interp") / request.param
    x = PREP.apply(images(45))
    m = export_checkpoint(ck, out, formats=FORMATS[request.param], name="m", check_inputs=x, options={"coreml.weight_threshold": 100})
    return request.param, ck, out, m, x


def test_every_registered_backbone_belongs_to_a_tested_family():
    for name in list_backbones():
        kind = type(create_backbone(name, in_channels=1))
        assert kind in FAMILIES, f"backbone {name} ({kind.__name__}) has no stand-in in FAMILIES: add one"


def test_every_format_matches_torch(family):
    name, ck, out, m, x = family
    ref = torch_embed(ck, x)
    arts = {a["export_format"]: a for a in m["artifacts"]}
    assert sorted(arts) == sorted(FORMATS[name])
    for fmt, a in arts.items():
        interp = Interpreter.from_package(out / a["file"])
        got = interp.run_batched(x)  # 45 rows: batches of 32, 8, 1 x5
        assert got.dtype == np.float32 and got.shape == ref.shape
        cos = cosines(got, ref)
        assert cos.min() >= MIN_COS_FOR.get((name, a["precision"]), MIN_COS[a["precision"]]), (name, fmt, cos.min())
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        # the export measured the same thing, labelled emulated
        f = a["fidelity"]
        assert f["label"] == "emulated" and f["runtime"].startswith("hetero Core ML interpreter (numpy, emulated)")
        assert f["min_cosine"] == pytest.approx(float(cos.min()), abs=1e-6) and f["num_inputs"] == 45
    # FP32 is exact up to float32 summation order, FP16 is not (it rounds after every op)
    fp32 = Interpreter.from_package(out / arts["coreml"]["file"]).run_batched(x)
    fp16 = Interpreter.from_package(out / arts["coreml-fp16"]["file"]).run_batched(x)
    assert np.abs(fp32 - ref).max() < 1e-5 < np.abs(fp16 - ref).max()


def test_enumerated_batch_sizes(family):
    _, ck, out, _, x = family
    interp = Interpreter.from_package(out / "m.mlpackage")
    assert interp.input_specs["input"].batch_sizes == (1, 8, 32)
    assert interp.chunks(45) == [(0, 32, 32), (32, 8, 8)] + [(40 + i, 1, 1) for i in range(5)]
    with pytest.raises(DeviceError, match=r"shape \[5, 1, 28, 28\]; the package accepts \[1, 1, 28, 28\], "
                                          r"\[8, 1, 28, 28\], \[32, 1, 28, 28\]"):
        interp.run({"input": x[:5]})
    with pytest.raises(DeviceError, match="takes inputs"):
        interp.run({"image": x[:1]})
    one = np.concatenate([interp.run({"input": x[i:i + 1]})["embedding"] for i in range(8)])
    np.testing.assert_allclose(interp.run({"input": x[:8]})["embedding"], one, atol=1e-6)
    # without the package's spec the program takes any batch size
    bare = Interpreter(load_program(out / "m.mlpackage"))
    np.testing.assert_allclose(bare.run({"input": x[:5]})["embedding"], one[:5], atol=1e-6)
    # sizes without 1: the remainder is padded with zero rows, which are dropped
    sizes = InputSpec("input", ((8, 1, 28, 28), (32, 1, 28, 28)))
    padded = Interpreter(load_program(out / "m.mlpackage"), inputs={"input": sizes})
    assert padded.chunks(13) == [(0, 8, 8), (8, 5, 8)]
    np.testing.assert_allclose(padded.run_batched(x[:13]), bare.run({"input": x[:13]})["embedding"], atol=1e-6)


def test_fp16_is_stored_and_rounded_after_every_op(family):
    _, _, out, _, x = family
    prog = load_program(out / "m.fp16.mlpackage")
    ops = list(prog.functions["main"].operations)
    conv = next(op for op in ops if op.op_type == "conv")
    relu = next(op for op in ops if op.op_type == "relu" and op.inputs["x"].name == conv.outputs[0].name)
    interp = Interpreter(prog)
    cast_in = next(op for op in ops if op.op_type == "cast")
    got = interp.run({"input": x[:8]}, keep=(cast_in.outputs[0].name, conv.outputs[0].name, relu.outputs[0].name))
    xin, c, r = got[cast_in.outputs[0].name], got[conv.outputs[0].name], got[relu.outputs[0].name]
    assert xin.dtype == c.dtype == r.dtype == np.float16
    np.testing.assert_array_equal(xin, x[:8].astype(np.float16))
    # the conv: FP16 operands, float32 arithmetic, rounded once to FP16
    w, b = (np.asarray(conv.inputs[k].val, np.float32) for k in ("weight", "bias"))
    want = F.conv2d(torch.from_numpy(xin.astype(np.float32)), torch.from_numpy(w), torch.from_numpy(b), padding=1,
                    stride=tuple(conv.inputs["strides"].val), groups=int(conv.inputs["groups"].val)).numpy()
    np.testing.assert_allclose(c.astype(np.float32), want.astype(np.float16).astype(np.float32), rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(r, np.maximum(c, 0))


def test_compressed_weights_decompress_like_coremltools(family):
    name, _, out, _, _ = family
    for f, kind in (("int8w", "constexpr_affine_dequantize"), ("palette6", "constexpr_lut_to_dense"),
                    ("palette4", "constexpr_lut_to_dense")):
        if f"coreml-{f}" not in FORMATS[name]:
            continue
        prog = load_program(out / f"m.{f}.mlpackage")
        interp = Interpreter(prog)
        ops = [op for op in prog.functions["main"].operations if op.op_type == kind]
        assert len(ops) >= 3
        for op in ops:
            mine = interp._consts[op.outputs[0].name]
            theirs = op.materialized_val_inference()
            np.testing.assert_array_equal(mine, theirs.astype(np.float32))


def test_image_input_takes_pixels(tmp_path):
    for channels, prep in ((1, PREP), (3, Preprocess(28, 3, (0.5, 0.4, 0.3), (0.25, 0.25, 0.25)))):
        ck = checkpoint("test_mobilenet", in_channels=channels, prep=prep)
        out = tmp_path / f"img{channels}"
        pix = images(6, channels=channels)
        m = export_checkpoint(ck, out, formats=("coreml",), name="m", check_inputs=prep.apply(pix),
                              options={"coreml.image_input": True})
        (a,) = m["artifacts"]
        assert a["input_kind"] == "image" and a["fidelity"]["label"] == "emulated"
        assert a["fidelity"]["min_cosine"] >= 0.99999 and "pixel values" in a["fidelity"]["input_note"]
        ref = torch_embed(ck, prep.apply(pix))
        interp = Interpreter.from_package(out / "m.mlpackage")
        spec = interp.input_specs["input"]
        assert spec.kind == "image" and spec.color_layout == ("G" if channels == 1 else "RGB") and spec.batch_sizes == (1,)
        got = interp.run_batched(pix.transpose(0, 3, 1, 2).astype(np.float32))  # pixels, 0..255
        assert cosines(got, ref).min() >= 0.99999
        with create_runner(out, "coreml-interp") as r:  # preprocessed in, like every runner
            assert cosines(r.embed(prep.apply(pix)), ref).min() >= 0.99999


def test_runner_is_emulated_and_matches_the_interpreter(family):
    _, ck, out, _, x = family
    cls = RUNNERS["coreml-interp"]
    assert cls.label == "emulated" and cls.formats == ("coreml",) and cls.extra == "coreml" and cls.unavailable() is None
    with create_runner(out, "coreml-interp", precision="fp16", batch_size=20) as r:
        got = r.embed(x)
        assert r.embed(x[:0]).shape == (0, 16)
        assert r.runtime == f"hetero Core ML interpreter (numpy, emulated) on coremltools {ct.__version__}"
        assert r.versions() == {"coremltools": ct.__version__, "numpy": np.__version__}
        assert r.artifact.entry["precision"] == "fp16"
    # bit for bit against the interpreter run on the runner's own batches (20, 20, 5 rows, each split into the
    # package's sizes): the same computation. One run_batched(x) would split 45 rows as 32 + 8 + 1 x 5, other
    # matmul shapes, whose float32 sums may round differently (BLAS kernels differ by CPU), then to FP16
    interp = Interpreter.from_package(out / "m.fp16.mlpackage")
    np.testing.assert_array_equal(got, np.concatenate([interp.run_batched(x[i:i + 20]) for i in range(0, len(x), 20)]))
    with pytest.raises(DeviceError, match="has no setting compute_units"):
        create_runner(out, "coreml-interp", compute_units="ALL")


@pytest.mark.skipif(sys.platform == "darwin", reason="checks how the coreml runner refuses to run off macOS")
def test_core_ml_runner_refuses_off_macos(family):
    _, _, out, _, _ = family
    cls = RUNNERS["coreml"]
    assert cls.label == "measured" and cls.setting_names() == ("compute_units",)
    assert cls.unavailable() == "Core ML runs only on macOS (this is Linux)"
    with pytest.raises(DeviceError, match=r"^runtime coreml cannot run here: Core ML runs only on macOS"):
        with create_runner(out, "coreml"):
            pass


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML (MLModel.predict) runs only on macOS")
def test_core_ml_runner_on_macos(family):  # pragma: no cover - macOS only
    _, ck, out, _, x = family
    with create_runner(out, "coreml", compute_units="CPU_ONLY") as r:
        got = r.embed(x)
    assert cosines(got, torch_embed(ck, x)).min() >= 0.9999


def test_an_op_the_interpreter_lacks_is_refused_at_load_in_one_line(family, monkeypatch, tmp_path):
    name, ck, out, _, x = family
    monkeypatch.delitem(ci.OPS, "relu")
    with pytest.raises(DeviceError) as e:
        Interpreter.from_package(out / "m.mlpackage")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("the Core ML interpreter has no op 'relu' (op name '") and "in function main)" in msg
    assert msg.endswith("; run it with the coreml runtime on macOS, or export another format")
    monkeypatch.delitem(ci.OPS, "conv")
    assert "has no op 'conv'" in (m := _error(out)) and "(also missing: relu)" in m
    # the export keeps fidelity pending with that reason, and does not fail
    m = export_checkpoint(ck, tmp_path / "x", formats=("coreml",), name="m", check_inputs=x[:8])
    f = m["artifacts"][0]["fidelity"]
    assert f["label"] == "pending" and "min_cosine" not in f
    assert f["reason"].startswith("Core ML runs only on macOS and hetero's Core ML interpreter cannot run this package: "
                                  "the Core ML interpreter has no op 'conv'")


def _error(out) -> str:
    with pytest.raises(DeviceError) as e:
        Interpreter.from_package(out / "m.mlpackage")
    return str(e.value)


def test_fp16_overflow_breaks_the_format(tmp_path):
    ck = checkpoint("test_mobilenet")
    with torch.no_grad():
        ck.model.proj.weight.mul_(1e5)  # projections above 65504: inf in FP16, NaN after the normalisation
    x = PREP.apply(images(8))
    with pytest.raises(FormatBreaksModel, match=r"^coreml-fp16 breaks this model: [1-8] of 8 check inputs give NaN or Inf"):
        export_checkpoint(ck, tmp_path / "x", formats=("coreml-fp16",), name="m", check_inputs=x)
    m = export_checkpoint(ck, tmp_path / "y", formats=("coreml",), name="m", check_inputs=x)
    assert m["artifacts"][0]["fidelity"]["min_cosine"] >= 0.99999  # FP32 is fine


def _program(shape, build):
    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=ct.target.iOS16)
    def prog(x):
        return build(x)

    return prog


def _run(prog, x):
    (out,) = Interpreter(prog).run({"x": x}).values()
    return out


@pytest.mark.parametrize("pad_type,stride,dil,groups", [
    ("valid", 1, 1, 1), ("custom", 2, 1, 1), ("same", 2, 1, 2), ("same_lower", 3, 1, 1), ("same", 1, 2, 4),
    ("custom", 1, 2, 8), ("valid", 2, 1, 8), ("same", 2, 1, 8),
])
def test_conv_geometry_matches_torch(pad_type, stride, dil, groups):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8, 11, 10)).astype(np.float32)
    cout = 16 if groups == 8 else 12
    w = rng.standard_normal((cout, 8 // groups, 3, 3)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    pad = [1, 2, 0, 1]
    prog = _program(x.shape, lambda v: mb.conv(x=v, weight=w, bias=b, strides=[stride, stride], dilations=[dil, dil],
                                               groups=groups, pad_type=pad_type,
                                               **({"pad": pad} if pad_type == "custom" else {})))
    got = _run(prog, x)
    k = 2 * dil + 1
    if pad_type == "custom":
        xp = np.pad(x, ((0, 0), (0, 0), (1, 2), (0, 1)))
    elif pad_type == "valid":
        xp = x
    else:  # coremltools' aggregated_pad; the odd one out after (same) or before (same_lower)
        widths = []
        for size in x.shape[2:]:
            total = max(0, stride * -(-size // stride) - size + k - stride)
            small, big = total // 2, total - total // 2
            widths.append((small, big) if pad_type == "same" else (big, small))
        xp = np.pad(x, ((0, 0), (0, 0), *widths))
    want = F.conv2d(torch.from_numpy(xp), torch.from_numpy(w), torch.from_numpy(b), stride=stride, dilation=dil,
                    groups=groups).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_more_ops_match_torch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 9, 9)).astype(np.float32)
    t = torch.from_numpy(x)
    w1 = rng.standard_normal((6, 4, 3)).astype(np.float32)
    mean, var, gamma, beta = (rng.random(4).astype(np.float32) + 0.5 for _ in range(4))
    cases = {
        "avg_pool": (lambda v: mb.avg_pool(x=v, kernel_sizes=[3, 3], strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1],
                                           exclude_padding_from_average=True),
                     F.avg_pool2d(t, 3, 2, 1, count_include_pad=False)),
        "avg_pool_ceil": (lambda v: mb.avg_pool(x=v, kernel_sizes=[2, 2], strides=[2, 2], pad_type="valid", ceil_mode=True),
                          F.avg_pool2d(t, 2, 2, ceil_mode=True)),
        "max_pool": (lambda v: mb.max_pool(x=v, kernel_sizes=[3, 3], strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1]),
                     F.max_pool2d(t, 3, 2, 1)),
        "batch_norm": (lambda v: mb.batch_norm(x=v, mean=mean, variance=var, gamma=gamma, beta=beta, epsilon=1e-3),
                       F.batch_norm(t, torch.from_numpy(mean), torch.from_numpy(var), torch.from_numpy(gamma),
                                    torch.from_numpy(beta), eps=1e-3)),
        "conv1d": (lambda v: mb.conv(x=mb.reshape(x=v, shape=[2, 4, 81]), weight=w1, pad_type="custom", pad=[1, 1]),
                   F.conv1d(t.reshape(2, 4, 81), torch.from_numpy(w1), padding=1)),
        "matmul": (lambda v: mb.matmul(x=v, y=v, transpose_y=True), t @ t.transpose(-1, -2)),
        "softmax": (lambda v: mb.softmax(x=v, axis=1), F.softmax(t, 1)),
        "sigmoid_tanh": (lambda v: mb.add(x=mb.sigmoid(x=v), y=mb.tanh(x=v)), torch.sigmoid(t) + torch.tanh(t)),
        "clip_sub_mul": (lambda v: mb.mul(x=mb.clip(x=v, alpha=-0.5, beta=0.5), y=mb.sub(x=v, y=1.0)),
                         t.clamp(-0.5, 0.5) * (t - 1)),
        "minimum_sqrt": (lambda v: mb.minimum(x=mb.sqrt(x=mb.abs(x=v)), y=0.7), t.abs().sqrt().clamp(max=0.7)),
        "reduce": (lambda v: mb.concat(values=[mb.reduce_sum(x=v, axes=[1], keep_dims=True),
                                               mb.reduce_max(x=v, axes=[1], keep_dims=True)], axis=1),
                   torch.cat([t.sum(1, keepdim=True), t.amax(1, keepdim=True)], 1)),
        "layout": (lambda v: mb.transpose(x=mb.pad(x=v, pad=[0, 0, 1, 2], mode="reflect"), perm=[0, 2, 3, 1]),
                   F.pad(t, (1, 2, 0, 0), mode="reflect").permute(0, 2, 3, 1)),
        "slice_squeeze": (lambda v: mb.expand_dims(x=mb.squeeze(x=mb.slice_by_index(x=v, begin=[0, 1, 0, 0],
                                                                                      end=[2, 2, 9, 9]), axes=[1]),
                                                   axes=[-1]),
                          t[:, 1:2].squeeze(1).unsqueeze(-1)),
    }
    for name, (build, want) in cases.items():
        got = _run(_program(x.shape, build), x)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)


def test_fp16_arithmetic_on_a_tiny_program():
    x = np.array([1.0, 2049.0, 1e-3, 7e4], np.float32)

    def build(v):
        h = mb.cast(x=v, dtype="fp16")
        s = mb.add(x=h, y=np.float16(1.0))  # 2049 is stored as 2048; 2048 + 1 rounds (to even) back to 2048
        return mb.cast(x=mb.mul(x=s, y=np.float16(3.0)), dtype="fp32")

    got = _run(_program(x.shape, build), x)
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    want = ((h.astype(np.float32) + 1).astype(np.float16).astype(np.float32) * 3).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    assert got[1] == 6144.0 and np.isinf(got[3])  # FP32 would give 6150; 7e4 overflows FP16


def test_modules_import_neither_torch_nor_hetero():
    code = ("import sys; import devices.coreml_interp, devices.coreml_runner; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'hetero', 'export', 'coremltools')]; "
            "print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_package_and_non_program_errors(tmp_path):
    with pytest.raises(DeviceError, match="does not exist"):
        Interpreter.from_package(tmp_path / "nope.mlpackage")
    (tmp_path / "empty.mlpackage").mkdir()
    with pytest.raises(DeviceError, match="not a Core ML package"):
        Interpreter.from_package(tmp_path / "empty.mlpackage")

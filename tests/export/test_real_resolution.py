"""Real-resolution RGB export (issue 23): torchvision MobileNetV3 (squeeze-excite, hard-swish,
hard-sigmoid) and EfficientNet (SiLU, sigmoid squeeze-excite, stochastic depth) through every
format, the Core ML interpreter's ops they need against torch, and the image input with ImageNet's
per-channel std. The mechanics are tested at 64 px (the architectures take it: 2x2 before the
pool); 224-px numbers come from ``benchmarks/export_real_resolution.py``. The kernel tests take
well under a second each. The two full exports are marked ``slow``: about 45 s of CPU each, mostly
ONNX's dynamo export and coremltools' conversion, whatever the resolution."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("coremltools", reason="coremltools is not installed (pip install 'hetero[coreml]')")
pytest.importorskip("torchvision", reason="torchvision is not installed (pip install 'hetero[byo]')")

import coremltools as ct  # noqa: E402
import onnx  # noqa: E402
from coremltools.converters.mil import Builder as mb  # noqa: E402

from devices.coreml_interp import Interpreter  # noqa: E402
from export import export_checkpoint  # noqa: E402
from hetero.checkpoint import Checkpoint  # noqa: E402
from hetero.data import Preprocess  # noqa: E402
from hetero.models import ModelSpec, create_embedding_model  # noqa: E402

pytestmark = pytest.mark.coreml

SIZE = 64
IMAGENET = Preprocess(SIZE, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
FORMATS = ("onnx", "onnx-fp16", "onnx-int8", "ort", "coreml", "coreml-fp16", "tensorrt")
# the targets of issue 23: FP32 and FP16 on these random-weight models; INT8 is looser here, see below
MIN_COS = {"fp32": 0.99999, "fp16": 0.9999}


def cosines(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def pixels(n: int, seed: int) -> np.ndarray:
    """uint8 [n, SIZE, SIZE, 3]: smooth colour blobs plus noise (image-like activation ranges)."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.uniform(0, 255, (n, 3, 4, 4)).astype(np.float32))
    big = F.interpolate(small, size=(SIZE, SIZE), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    return np.clip(np.rint(big + rng.normal(0, 12, big.shape)), 0, 255).astype(np.uint8)


def checkpoint(backbone: str) -> Checkpoint:
    """An untrained ``backbone`` at SIZE px RGB whose batch-norm statistics come from a batch of images."""
    torch.manual_seed(0)
    spec = ModelSpec(backbone, 16)
    model = create_embedding_model(spec, 3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(IMAGENET.apply(pixels(16, seed=1))))
    return Checkpoint(role="edge", spec=spec, model=model.eval(), classifier=None, preprocess=IMAGENET,
                      classes=tuple("abcdef"), space="0" * 64)


def export_all(backbone, tmp_path_factory, formats=FORMATS):
    ck = checkpoint(backbone)
    out = tmp_path_factory.mktemp("rr") / backbone.replace(":", "_")
    m = export_checkpoint(ck, out, formats=formats, name="edge", check_inputs=IMAGENET.apply(pixels(8, seed=2)),
                          calib_inputs=IMAGENET.apply(pixels(8, seed=3)), options={"batch_sizes": (1, 4)})
    return ck, out, {a["export_format"]: a for a in m["artifacts"]}


@pytest.fixture(scope="module")
def mobilenet_v3(tmp_path_factory):
    return export_all("tv:mobilenet_v3_small", tmp_path_factory)


@pytest.fixture(scope="module")
def efficientnet(tmp_path_factory):
    # its own ops (SiLU, sigmoid squeeze-excite, stochastic depth) through ONNX and Core ML FP32; every precision and
    # format is MobileNetV3's test (the suite's time: each format of a 64-px EfficientNet costs seconds here)
    return export_all("tv:efficientnet_b0", tmp_path_factory, formats=("onnx", "coreml"))


def check_every_format(arts):
    assert sorted(arts) == sorted(FORMATS)
    for fmt, a in arts.items():
        f = a["fidelity"]
        if fmt == "tensorrt":  # no TensorRT here: the pre-flight passes and the plan is built on the target
            assert a["status"] == "build-on-target" and a["preflight"]["ok"] and not a["preflight"]["problems"]
            assert f["label"] == "pending"
            continue
        assert a["status"] == "built" and f["label"] == ("emulated" if fmt.startswith("coreml") else "measured")
        assert a["input"]["shape"][1:] == [3, SIZE, SIZE]
        if a["precision"] in MIN_COS:
            # Core ML FP16 rounds every activation to FP16, the reductions and SE gates too (ONNX FP16 keeps them
            # FP32): on these untrained nets, whose depth amplifies noise, 0.99988 is measured (EfficientNet-B0)
            want = 0.9998 if fmt == "coreml-fp16" else MIN_COS[a["precision"]]
            assert f["min_cosine"] >= want, (fmt, f["min_cosine"])
        else:
            # static INT8 of an *untrained* MobileNetV3/EfficientNet: quantisation noise grows through its depth
            # (mean cosine 0.92-0.98 here; 0.9997 min on MobileNetV3-Small after 60 training steps, see
            # benchmarks/export_real_resolution.py). This checks the mechanics: calibrated QDQ, measured by
            # onnxruntime, not broken (the exporter refuses a mean cosine below 0.9)
            assert a["precision"] == "int8" and a["quantization"] == "static" and f["mean_cosine"] > 0.9, f
    # Core ML's fidelity is the interpreter's (not "pending": every op of the program has a kernel)
    assert arts["coreml"]["fidelity"]["runtime"].startswith("hetero Core ML interpreter")
    assert arts["onnx-fp16"]["weight_bytes"] < 0.55 * arts["onnx"]["weight_bytes"]
    assert arts["coreml-fp16"]["weight_bytes"] < 0.55 * arts["coreml"]["weight_bytes"]
    assert arts["onnx-int8"]["weight_bytes"] < 0.35 * arts["onnx"]["weight_bytes"]


@pytest.mark.slow  # one export to every format: about 45 s of CPU (ONNX's dynamo export and coremltools' conversion)
def test_mobilenet_v3_exports_to_every_format(mobilenet_v3):
    """Squeeze-excite, hard-swish and hard-sigmoid: coremltools writes hard-swish as
    thresholded_relu + sigmoid_hard + mul, and the interpreter runs them."""
    _, _, arts = mobilenet_v3
    check_every_format(arts)
    assert {"sigmoid_hard", "thresholded_relu", "reduce_mean", "mul"} <= set(arts["coreml"]["ops"])
    assert {"HardSwish", "HardSigmoid"} <= set(arts["tensorrt"]["preflight"]["op_counts"])


@pytest.mark.slow  # ONNX and Core ML: about 20 s of CPU
def test_efficientnet_exports_without_its_training_only_ops(efficientnet):
    """SiLU and sigmoid squeeze-excite; stochastic depth and dropout are the identity in eval and
    leave nothing in the artifacts."""
    ck, out, arts = efficientnet
    assert sorted(arts) == ["coreml", "onnx"]
    for a in arts.values():
        assert a["status"] == "built" and a["fidelity"]["min_cosine"] >= MIN_COS["fp32"], a["fidelity"]
        assert a["input"]["shape"][1:] == [3, SIZE, SIZE]
    assert {"silu", "sigmoid", "reduce_mean"} <= set(arts["coreml"]["ops"])
    assert any(type(m).__name__ == "StochasticDepth" for m in ck.model.modules())
    kinds = {n.op_type for n in onnx.load(str(out / arts["onnx"]["file"])).graph.node}
    assert not kinds & {"Dropout", "RandomUniform", "RandomUniformLike", "Bernoulli"}, kinds


@pytest.mark.slow  # uses the exported MobileNetV3's checkpoint, then one more Core ML conversion
def test_image_input_with_imagenet_std_is_exact(tmp_path, mobilenet_v3):
    """ImageNet's per-channel std through a Core ML image input: the ImageType gives pixel / 255 - mean,
    the program's first op multiplies by 1 / std per channel; the manifest says so, and raw pixels
    into the interpreter give torch's embeddings of the preprocessed images."""
    ck, _, _ = mobilenet_v3
    pix = pixels(4, seed=5)
    m = export_checkpoint(ck, tmp_path / "img", formats=("coreml",), name="edge", check_inputs=IMAGENET.apply(pix),
                          options={"coreml.image_input": True})
    (a,) = m["artifacts"]
    assert a["input_kind"] == "image" and a["fidelity"]["min_cosine"] >= 0.99999
    assert a["image_type"]["scale"] == pytest.approx(1 / 255) and a["image_type"]["bias"] == pytest.approx([-0.485, -0.456, -0.406])
    assert a["image_type"]["channel_scale"] == pytest.approx([1 / 0.229, 1 / 0.224, 1 / 0.225])
    assert a["input"]["scale"] == pytest.approx([1 / (255 * s) for s in IMAGENET.std])
    assert "multiplies channel c by 1 / std_c" in a["input"]["normalisation"]
    interp = Interpreter.from_package(tmp_path / "img" / a["file"])
    assert [n.op_type for n in interp.ops[:3]] == ["mul", "add", "mul"]  # ImageType scale, bias; then 1 / std
    got = interp.run_batched(pix.transpose(0, 3, 1, 2).astype(np.float32))
    with torch.no_grad():
        ref = ck.model(torch.from_numpy(IMAGENET.apply(pix))).numpy()
    assert cosines(got, ref).min() >= 0.99999


# ---------------------------------------------------------------------------------------------------------
# the interpreter's kernels of these models' ops, against torch, on hand-built MIL programs


def _run(shape, build, x, fp16: bool = False):
    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=ct.target.iOS16)
    def prog(v):
        if fp16:
            return mb.cast(x=build(mb.cast(x=v, dtype="fp16")), dtype="fp32")
        return build(v)

    (out,) = Interpreter(prog).run({"v": x}).values()
    return out


def _run_all(shape, build, x):
    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=ct.target.iOS16)
    def prog(v):
        return build(v)

    return list(Interpreter(prog).run({"v": x}).values())


def _breakpoints():
    """Values around the kinks of hard-swish/-sigmoid (-3, 0, 3) and far out."""
    x = np.concatenate([np.linspace(-8, 8, 161), [-3, 3, -3 - 1e-6, 3 + 1e-6, -1e-7, 0, 50, -50]]).astype(np.float32)
    return x.reshape(1, -1)


def test_hard_swish_and_hard_sigmoid_as_coremltools_writes_them_match_torch():
    x = _breakpoints()
    t = torch.from_numpy(x)

    def hswish(v, f=np.float32):  # coremltools' torch frontend: w * sigmoid_hard(w, 1/6, 1/2), w = thresholded_relu(x, -3)
        w = mb.thresholded_relu(x=v, alpha=f(-3.0))
        return mb.mul(x=w, y=mb.sigmoid_hard(x=w, alpha=f(1.0 / 6), beta=f(0.5)))

    np.testing.assert_allclose(_run(x.shape, hswish, x), F.hardswish(t).numpy(), atol=1e-6)
    np.testing.assert_allclose(_run(x.shape, lambda v: mb.sigmoid_hard(x=v, alpha=1.0 / 6, beta=0.5), x),
                               F.hardsigmoid(t).numpy(), atol=1e-7)
    np.testing.assert_array_equal(_run(x.shape, lambda v: mb.thresholded_relu(x=v, alpha=0.5), x),
                                  np.where(x >= 0.5, x, 0))
    # in FP16 the result is rounded once, after the op
    half = _run(x.shape, lambda v: hswish(v, np.float16), x, fp16=True)
    np.testing.assert_allclose(half, F.hardswish(t.half().float()).numpy(), rtol=2e-3, atol=2e-3)


def test_silu_sigmoid_squeeze_excite_with_broadcast_mul_matches_torch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 5, 5)).astype(np.float32)
    w1, b1 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    w2, b2 = rng.standard_normal((8, 4, 1, 1)).astype(np.float32), rng.standard_normal(8).astype(np.float32)

    def se(v):  # EfficientNet's: x * sigmoid(fc2(silu(fc1(mean(x)))))
        s = mb.reduce_mean(x=v, axes=[2, 3], keep_dims=True)
        s = mb.silu(x=mb.conv(x=s, weight=w1, bias=b1))
        return mb.mul(x=v, y=mb.sigmoid(x=mb.conv(x=s, weight=w2, bias=b2)))

    t = torch.from_numpy(x)
    s = F.silu(F.conv2d(t.mean((2, 3), keepdim=True), torch.from_numpy(w1), torch.from_numpy(b1)))
    want = t * torch.sigmoid(F.conv2d(s, torch.from_numpy(w2), torch.from_numpy(b2)))
    np.testing.assert_allclose(_run(x.shape, se, x), want.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode, approximate", [("EXACT", "none"), ("TANH_APPROXIMATION", "tanh"),
                                               ("SIGMOID_APPROXIMATION", None)])
def test_gelu_matches_torch(mode, approximate):
    x = np.linspace(-7, 7, 281, dtype=np.float32).reshape(1, -1)
    t = torch.from_numpy(x).double()
    want = t * torch.sigmoid(1.702 * t) if approximate is None else F.gelu(t, approximate=approximate)
    # float32: 1 + tanh(a) cancels for x << 0, an absolute error of |x| eps / 2 (as in torch in float32)
    np.testing.assert_allclose(_run(x.shape, lambda v: mb.gelu(x=v, mode=mode), x), want.numpy(), rtol=1e-6, atol=1e-6)


def test_erf_matches_math_erf():
    x = np.concatenate([np.linspace(-6, 6, 2401), [0.0, 1e-8, -1e-8, 1.9999999, 2.0, 2.0000001, 30, -30]])
    x = x.astype(np.float32).reshape(1, -1)
    want = np.array([math.erf(float(v)) for v in x.ravel()]).reshape(x.shape)
    np.testing.assert_allclose(_run(x.shape, lambda v: mb.erf(x=v), x), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("axes", [[-1], [1, 2, 3], [2, 3]])
def test_layer_norm_matches_torch(axes):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 6, 4, 5)) * 3 + 1).astype(np.float32)
    shape = [x.shape[a] for a in axes]
    gamma, beta = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    got = _run(x.shape, lambda v: mb.layer_norm(x=v, axes=axes, gamma=gamma, beta=beta, epsilon=1e-5), x)
    t = torch.from_numpy(x)
    if axes == [2, 3]:  # not trailing-contiguous from dim 1: normalise by hand
        mu, var = t.mean((2, 3), keepdim=True), t.var((2, 3), unbiased=False, keepdim=True)
        want = (t - mu) / torch.sqrt(var + 1e-5) * torch.from_numpy(gamma) + torch.from_numpy(beta)
    else:
        want = F.layer_norm(t, shape, torch.from_numpy(gamma), torch.from_numpy(beta), 1e-5)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [{"num_splits": 3}, {"split_sizes": [1, 4, 1]}])
def test_split_matches_numpy(kw):
    """EfficientViT's attention splits q, k, v (timm:efficientvit_b0's program has split, matmul and layer_norm)."""
    x = np.arange(2 * 6 * 5, dtype=np.float32).reshape(2, 6, 5)
    outs = _run_all(x.shape, lambda v: mb.split(x=v, axis=1, **kw), x)
    bounds = [2, 4] if "num_splits" in kw else [1, 5]
    for got, want in zip(outs, np.split(x, bounds, axis=1)):
        np.testing.assert_array_equal(got, want)
    assert len(outs) == 3


class _ShapeArithmetic(torch.nn.Module):
    """Sizes computed from the input's shape (``c * h * w // 4``), as timm's MobileViT and EfficientViT
    do: the trace has ``aten::Int`` of a one-element tensor, whose coremltools 9 conversion fails
    under NumPy 2 unless hetero's override is in place."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.proj = torch.nn.Linear(4 * 8 * 8 // 4, 16)
        self.dim = 16

    def forward(self, x):
        y = self.conv(x)
        b, c, h, w = y.shape
        return F.normalize(self.proj(y.reshape(b, c * h * w // 4, 4).mean(-1)), dim=1)


def test_shape_arithmetic_converts_to_core_ml(tmp_path):
    torch.manual_seed(0)
    prep = Preprocess(8, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    ck = Checkpoint(role="edge", spec=ModelSpec("test_mobilenet", 16), model=_ShapeArithmetic().eval(), classifier=None,
                    preprocess=prep, classes=("a", "b"), space="0" * 64)
    traced = torch.jit.trace(ck.model, torch.zeros(2, 3, 8, 8), check_trace=False)
    assert "aten::Int" in {n.kind() for n in traced.inlined_graph.nodes()}
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    m = export_checkpoint(ck, tmp_path / "x", formats=("coreml",), check_inputs=x, options={"batch_sizes": (2,)})
    assert m["artifacts"][0]["fidelity"]["min_cosine"] >= 0.99999

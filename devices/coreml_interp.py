"""A reference interpreter for Core ML ML Programs, in numpy: run a saved ``.mlpackage`` on Linux.

Core ML itself (``MLModel.predict``) runs only on macOS. This module reloads a package into
coremltools' MIL program (``milproto.load``, no Core ML framework needed) and evaluates its
operations in order with numpy, so that a package's numerics can be checked anywhere. Its results
are *emulated*, never *measured on device*: Core ML may pick other kernels, fuse ops, or run them
on the GPU or Neural Engine with other rounding.

Use::

    interp = Interpreter.from_package("edge.mlpackage")
    emb = interp.run({"input": batch})["embedding"]   # batch size must be an enumerated one
    emb = interp.run_batched(batch)                     # any batch size, split as below

or ``Interpreter(load_program(path))`` for a bare program (no input-shape checks from the spec).

What it runs (``OPS``, the dispatch table ``op_type -> function``): every op that hetero's
backbones produce at FP32, FP16, with compressed weights and with an image input, plus common
elementwise, reduction, shape and pooling ops (see ``supported_ops()``). A program with any other
op is refused when it is loaded, with a one-line :class:`DeviceError` naming the op, never halfway
through a run. Constant ops (``const``, the ``constexpr_*`` weight decompressions, and every op
whose inputs are all constants) are evaluated once, at load.

Precision (the FP16 emulation): a tensor the program types ``fp16`` is stored as ``np.float16``.
Each op computes in float32 (FP16 inputs widened exactly, FP32 accumulation inside the op: sums
of a conv, matmul or reduction) and its result is rounded to float16 (round to nearest even) when
the op's output is typed ``fp16``. So rounding happens after every op, as on a device that keeps
activations in FP16; inside an op the emulation is more precise than an FP16 unit that
accumulates in FP16. FP32 ops run in float32 throughout. Overflow gives Inf (in FP16: above 65504)
and NaN follows, as on a device, without numpy warnings.

Shapes: a package's input may list enumerated shapes (hetero exports batch sizes 1, 8, 32).
:meth:`Interpreter.run` accepts exactly those shapes, as Core ML does, and refuses others with a
DeviceError naming them. :meth:`Interpreter.run_batched` takes any batch size and runs it as Core
ML would have to be called: in chunks of allowed sizes (the largest that fits first), the last
one padded with zero rows up to the smallest allowed size when nothing fits exactly; padded rows
are dropped from the result.

Image inputs (``ct.ImageType``): the program starts with the image's ``scale``/``bias`` ops, so
the interpreter takes what Core ML gets, pixel values: float [N, C, H, W] in 0..255 (grayscale C=1,
RGB C=3 in R, G, B order). :func:`pixels_from_preprocessed` maps a preprocessed batch back to them.

Speed: convolutions run as matmuls over stride-phase views of a padded copy (im2col), depthwise
ones as one multiply-add per kernel tap over contiguous rows; numpy's BLAS is held to one thread
during runs (``blas_threads``). The demo edge model runs at about 3,400 images/s (FP32) and
1,850 (FP16) on 2 cores (``benchmarks/coreml_interp.py``).

numpy only; coremltools (to read the package) is imported lazily. Not thread-safe: a conv keeps
its padded-input buffers between runs (up to ``CACHE_BYTES`` per interpreter).
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from devices.errors import DeviceError

WEIGHTS_DIR = Path("Data") / "com.apple.CoreML" / "weights"
FIX = "run it with the coreml runtime on macOS, or export another format"


# ----------------------------------------------------------------------------------------------
# loading


@contextlib.contextmanager
def _quiet():
    """No warnings or log lines from coremltools (it logs about untested torch/sklearn versions and
    the macOS-only runtime on import)."""
    log = logging.getLogger("coremltools")
    keep = log.handlers[:], log.propagate, log.level
    log.handlers[:] = [logging.NullHandler()]
    log.propagate = False
    out = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.handlers[:], log.propagate = keep[0], keep[1]
        log.setLevel(keep[2])


def coremltools_module():
    """coremltools, imported quietly, or a DeviceError naming the pip extra."""
    try:
        with _quiet():
            import coremltools
    except ImportError:
        raise DeviceError("coremltools is not installed (pip install 'hetero[coreml]'); the Core ML interpreter "
                          "reads packages with it") from None
    return coremltools


def coremltools_version() -> str:
    return str(coremltools_module().__version__)


def _package(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise DeviceError(f"{p} does not exist; pass a .mlpackage written by `hetero export`")
    if p.is_dir() and not (p / "Manifest.json").is_file():
        raise DeviceError(f"{p} is not a Core ML package (no Manifest.json in it); pass a .mlpackage")
    return p


def load_spec(path: str | Path):
    """The package's protobuf spec (``Model_pb2.Model``)."""
    p = _package(path)
    ct = coremltools_module()
    try:
        with _quiet():
            return ct.utils.load_spec(str(p))
    except Exception as e:
        raise DeviceError(f"coremltools cannot read {p} ({_first_line(e)}); re-run `hetero export`") from None


def load_program(path: str | Path, spec=None):
    """The package's MIL ``Program`` (weights read from the package's weight file)."""
    p = _package(path)
    spec = load_spec(p) if spec is None else spec
    if spec.WhichOneof("Type") != "mlProgram":
        raise DeviceError(f"{p} is a {spec.WhichOneof('Type')} model, not an ML Program; the Core ML interpreter runs "
                          "ML Programs only (convert with convert_to='mlprogram')")
    coremltools_module()
    from coremltools.converters.mil.frontend import milproto

    try:
        with _quiet():
            return milproto.load.load(spec, spec.specificationVersion, str(p / WEIGHTS_DIR))
    except Exception as e:
        raise DeviceError(f"coremltools cannot load the program of {p} ({_first_line(e)}); re-run `hetero export`") from None


@dataclass(frozen=True)
class InputSpec:
    """What a package's input accepts, from its spec: allowed shapes (None: any) and its kind."""

    name: str
    shapes: tuple[tuple[int, ...], ...] | None
    kind: str = "tensor"  # "tensor" or "image"
    color_layout: str | None = None  # image: "G" (grayscale), "RGB", "BGR"

    @property
    def batch_sizes(self) -> tuple[int, ...] | None:
        """The allowed batch sizes when the shapes differ in their first dimension only."""
        if not self.shapes or len({s[1:] for s in self.shapes}) != 1:
            return None
        return tuple(sorted({s[0] for s in self.shapes}))


def input_specs(spec) -> dict[str, InputSpec]:
    """The inputs of a spec with their allowed shapes: enumerated shapes, the fixed shape, or
    None (a shape range: anything the program accepts)."""
    out: dict[str, InputSpec] = {}
    for d in spec.description.input:
        kind = d.type.WhichOneof("Type")
        if kind == "imageType":
            it = d.type.imageType
            from coremltools.proto.FeatureTypes_pb2 import ImageFeatureType

            layout = {ImageFeatureType.GRAYSCALE: "G", ImageFeatureType.RGB: "RGB",
                      ImageFeatureType.BGR: "BGR"}.get(it.colorSpace, str(it.colorSpace))
            c = 1 if layout == "G" else 3
            sizes = [(int(s.height), int(s.width)) for s in it.enumeratedSizes.sizes] or [(int(it.height), int(it.width))]
            ranged = it.WhichOneof("SizeFlexibility") == "imageSizeRange"
            out[d.name] = InputSpec(d.name, None if ranged else tuple((1, c, h, w) for h, w in sizes), "image", layout)
        elif kind == "multiArrayType":
            arr = d.type.multiArrayType
            if arr.WhichOneof("ShapeFlexibility") == "shapeRange":
                shapes = None
            else:
                shapes = tuple(tuple(int(v) for v in s.shape) for s in arr.enumeratedShapes.shapes) or (
                    tuple(int(v) for v in arr.shape),)
            out[d.name] = InputSpec(d.name, shapes)
        else:
            raise DeviceError(f"the Core ML interpreter takes multi-array and image inputs, not {kind} (input "
                              f"'{d.name}'); {FIX}")
    return out


def pixels_from_preprocessed(x: np.ndarray, scale: float, bias: list[float] | tuple[float, ...]) -> np.ndarray:
    """Pixel values (float, 0..255 for images that came from 8-bit pixels) from a preprocessed batch
    ``x = pixel * scale + bias``: the inverse of a Core ML ImageType's preprocessing. Not rounded or
    clipped: a batch made from 8-bit images maps back to its pixels (up to float error)."""
    b = np.asarray(bias, np.float64).reshape(1, -1, 1, 1)
    return ((np.asarray(x, np.float64) - b) / float(scale)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# the ops: each is fn(args: dict[str, value], node: Node) -> array (or a tuple, one per output)


@dataclass
class Node:
    """One op of the program, as the interpreter runs it."""

    name: str
    op_type: str
    out_dtypes: tuple[Any, ...]
    cache: dict[str, Any] = field(default_factory=dict)  # e.g. a conv's transposed weights, buffers
    shared: dict[str, Any] = field(default_factory=dict)  # one dict for all nodes of an interpreter


CACHE_BYTES = 256 << 20  # padded-input buffers kept between runs, per interpreter


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [e.__class__.__name__])[0])[:300]


def _val(a: dict, key: str, default: Any = None) -> Any:
    v = a.get(key)
    return default if v is None else v


def _ints(v) -> list[int]:
    return [int(i) for i in np.asarray(v).reshape(-1)]


def _unary(fn: Callable[[np.ndarray], np.ndarray]):
    return lambda a, n: fn(a["x"])


def _binary(fn: Callable[[Any, Any], np.ndarray]):
    return lambda a, n: fn(a["x"], a["y"])


def _relu(a, n):
    x = a["x"]
    if x.dtype == np.float16:  # exact on FP16 values, no conversion: every value with the sign bit set
        return np.maximum(x.view(np.int16), 0).view(np.float16)  # (negatives, -0, -NaN) becomes +0
    return np.maximum(x, 0)


def _sigmoid(x):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def _real_div(a, n):
    x, y = a["x"], a["y"]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.true_divide(x, y)  # int operands (shape arithmetic): cast back to the output dtype


def _reduce(fn: Callable[..., np.ndarray]):
    def op(a, n):
        axes = a.get("axes")
        axis = None if axes is None else tuple(_ints(axes))
        return fn(a["x"], axis=axis, keepdims=bool(_val(a, "keep_dims", False)))

    return op


def _reduce_l2(x, axis, keepdims):
    return np.sqrt(np.sum(np.square(x), axis=axis, keepdims=keepdims))


def _reduce_log_sum_exp(x, axis, keepdims):
    m = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


def _reduce_arg(fn):
    def op(a, n):
        axis = int(_val(a, "axis", -1))
        out = fn(a["x"], axis=axis)
        return np.expand_dims(out, axis) if bool(_val(a, "keep_dims", False)) else out

    return op


def _reshape(a, n):
    x = a["x"]
    shape = _ints(a["shape"])
    if len(shape) == x.ndim:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _expand_dims(a, n):
    return np.expand_dims(a["x"], tuple(_ints(a["axes"])))


def _squeeze(a, n):
    axes = a.get("axes")
    return np.squeeze(a["x"]) if axes is None else np.squeeze(a["x"], axis=tuple(_ints(axes)))


def _slice_by_index(a, n):
    x = a["x"]
    r = x.ndim
    begin = _ints(_val(a, "begin", [0] * r))
    end = _ints(_val(a, "end", [0] * r))
    stride = _ints(_val(a, "stride", [1] * r))
    bm = [bool(v) for v in np.asarray(_val(a, "begin_mask", [False] * r)).reshape(-1)]
    em = [bool(v) for v in np.asarray(_val(a, "end_mask", [False] * r)).reshape(-1)]
    sm = [bool(v) for v in np.asarray(_val(a, "squeeze_mask", [False] * r)).reshape(-1)]
    idx = []
    for i in range(r):
        if sm[i]:
            idx.append(begin[i])
        else:
            idx.append(slice(None if bm[i] else begin[i], None if em[i] else end[i], stride[i] or 1))
    return x[tuple(idx)]


def _slice_by_size(a, n):
    x = a["x"]
    begin, size = _ints(a["begin"]), _ints(a["size"])
    return x[tuple(slice(b, x.shape[i] if s == -1 else b + s) for i, (b, s) in enumerate(zip(begin, size)))]


def _concat(a, n):
    return np.concatenate(list(a["values"]), axis=int(a["axis"]))


def _stack(a, n):
    return np.stack(list(a["values"]), axis=int(a["axis"]))


def _pad(a, n):
    x = a["x"]
    p = _ints(a["pad"])
    k = len(p) // 2
    width = [(0, 0)] * (x.ndim - k) + [(p[2 * i], p[2 * i + 1]) for i in range(k)]
    mode = str(_val(a, "mode", "constant"))
    if mode == "constant":
        return np.pad(x, width, mode="constant", constant_values=_val(a, "constant_val", 0.0))
    return np.pad(x, width, mode={"reflect": "reflect", "replicate": "edge"}[mode])


def _softmax(a, n):
    x = a["x"]
    axis = int(_val(a, "axis", -1))
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _linear(a, n):
    x, w = a["x"], a["weight"]
    wt = n.cache.get("wt")
    if wt is None or n.cache.get("w") is not w:  # the weight is a constant: transposed once
        wt = n.cache["wt"] = np.ascontiguousarray(w.T)
        n.cache["w"] = w
    out = np.matmul(x, wt)
    b = a.get("bias")
    if b is not None:
        out += b
    return out


def _matmul(a, n):
    x, y = a["x"], a["y"]
    if bool(_val(a, "transpose_x", False)):
        x = np.swapaxes(x, -1, -2)
    if bool(_val(a, "transpose_y", False)):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _batch_norm(a, n):
    x = a["x"]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    eps = np.float32(_val(a, "epsilon", 1e-5))
    scale = 1.0 / np.sqrt(a["variance"].astype(np.float32) + eps)
    g = a.get("gamma")
    if g is not None:
        scale = scale * g
    shift = -a["mean"] * scale
    if a.get("beta") is not None:
        shift = shift + a["beta"]
    return x * scale.reshape(shape).astype(np.float32) + shift.reshape(shape).astype(np.float32)


def _cast(a, n):
    return a["x"]  # the interpreter casts every op's result to its output dtype (fp16: rounded)


# constexpr ops (compile-time weight decompression, iOS 16), evaluated once at load


def _unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Indices packed LSB first, ``nbits`` each (coremltools' ``restore_elements_from_packed_bits``)."""
    bits = np.unpackbits(np.asarray(packed, np.uint8), bitorder="little")[: nbits * count].reshape(count, nbits)
    return (bits.astype(np.uint32) << np.arange(nbits, dtype=np.uint32)).sum(1)


def _constexpr_affine_dequantize(a, n):
    q = a["quantized_data"]
    axis = int(a["axis"]) % q.ndim
    shape = [1] * q.ndim
    shape[axis] = -1

    def bc(v):
        v = np.asarray(v)
        return v.reshape(shape) if v.ndim == 1 else v

    return (q.astype(np.float32) - bc(a["zero_point"]).astype(np.float32)) * bc(a["scale"]).astype(np.float32)


def _constexpr_lut_to_dense(a, n):
    lut, shape = np.asarray(a["lut"]), _ints(a["shape"])
    if lut.ndim != 1:
        raise DeviceError("per-channel lookup tables (iOS 18 constexpr_lut_to_dense) are not supported")
    nbits = int(round(math.log2(lut.size)))
    idx = _unpack_bits(a["indices"], nbits, int(np.prod(shape)))
    return lut[idx].reshape(shape)


def _constexpr_sparse_to_dense(a, n):
    shape = _ints(a["shape"])
    data = np.asarray(a["nonzero_data"])
    out = np.zeros(int(np.prod(shape)), data.dtype)
    out[np.unpackbits(np.asarray(a["mask"], np.uint8), bitorder="little")[: out.size] != 0] = data
    return out.reshape(shape)


def _constexpr_cast(a, n):
    return np.asarray(a["source_val"])


# convolution and pooling (NCHW)


def _spatial_pads(pad_type: str, pad, in_hw, k_eff, strides) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim, as coremltools' ``aggregated_pad`` computes it."""
    if pad_type == "valid":
        return [(0, 0)] * len(in_hw)
    if pad_type == "custom":
        p = _ints(pad) if pad is not None else [0] * 2 * len(in_hw)
        return [(p[2 * i], p[2 * i + 1]) for i in range(len(in_hw))]
    if pad_type in ("same", "same_lower"):
        out = []
        for i, k, s in zip(in_hw, k_eff, strides):
            total = max(0, s * math.ceil(i / s) - i + k - s)
            small, big = total // 2, total - total // 2
            out.append((small, big) if pad_type == "same" else (big, small))
        return out
    raise DeviceError(f"unknown pad_type {pad_type!r}")


def _phase_taps(node: Node, x: np.ndarray, pads, kh: int, kw: int, s: tuple[int, int], d: tuple[int, int],
                ho: int, wo: int, pad_value: float = 0.0, contiguous: bool = True):
    """Contiguous views (N, C, Hq * Wq) of the padded input, one per kernel tap (row-major), such
    that output (r, c) of every image and channel is ``sum_tap w_tap * view_tap[n, ch, r * Wq + c]``
    for r < Ho, c < Wo (the other rows and columns of the Hq x Wq grid are junk, cropped by the
    caller). The padded input is split into its s_h x s_w stride phases, each laid out flat (all
    images and channels one after the other), so a tap is one shifted slice of a phase: every
    multiply-add runs over long contiguous rows. ``contiguous=False``: views of the first Ho rows
    only (N, C, Ho * Wq), less work where the views are copied anyway (im2col). Returns the views
    and the grid's (rows, Wq). Buffers are cached per input shape (their padding never changes)."""
    n, c, h, w = x.shape
    (sh, sw), (dh, dw) = s, d
    (pt, _), (pl, _) = pads
    hq, wq = ho + ((kh - 1) * dh) // sh, wo + ((kw - 1) * dw) // sw
    size = n * c * hq * wq
    taps = [((i * dh) % sh, (j * dw) % sw, ((i * dh) // sh) * wq + (j * dw) // sw) for i in range(kh) for j in range(kw)]
    slack = max(off for _, _, off in taps)
    cache = node.cache.setdefault("phases", {})
    key = (x.shape, pad_value)
    bufs = cache.get(key)
    if bufs is None:
        bufs = {}
        for ph_a, ph_b, _ in taps:
            if (ph_a, ph_b) not in bufs:
                bufs[(ph_a, ph_b)] = np.full(size + slack, pad_value, np.float32)
        # kept for the next run (the border stays padding) within the interpreter's budget, for a
        # few input shapes at a time (a bare program may get any batch size)
        held = node.shared.setdefault("cached_bytes", 0)
        if len(cache) >= 4:
            held -= sum(b.nbytes for b in cache.pop(next(iter(cache))).values())
        nbytes = sum(b.nbytes for b in bufs.values())
        if held + nbytes <= CACHE_BYTES:
            cache[key] = bufs
            held += nbytes
        node.shared["cached_bytes"] = held
    for (ph_a, ph_b), buf in bufs.items():
        grid = buf[:size].reshape(n, c, hq, wq)
        r0 = max(0, -(-(pt - ph_a) // sh))  # first phase row that lies inside x
        c0 = max(0, -(-(pl - ph_b) // sw))
        fr, fc = ph_a + r0 * sh - pt, ph_b + c0 * sw - pl  # the x row/col it holds
        if fr >= h or fc >= w or r0 >= hq or c0 >= wq:
            continue
        src = x[:, :, fr::sh, fc::sw][:, :, : hq - r0, : wq - c0]
        grid[:, :, r0:r0 + src.shape[2], c0:c0 + src.shape[3]] = src
    if contiguous:
        return [bufs[(pa, pb)][off:off + size].reshape(n, c, hq * wq) for pa, pb, off in taps], hq, wq
    return [bufs[(pa, pb)][off:off + size].reshape(n, c, hq * wq)[:, :, :ho * wq] for pa, pb, off in taps], ho, wq


def _conv_geometry(a, x, kh, kw):
    nd = x.ndim - 2
    s = tuple(_ints(_val(a, "strides", [1] * nd)))
    d = tuple(_ints(_val(a, "dilations", [1] * nd)))
    k_eff = ((kh - 1) * d[0] + 1, (kw - 1) * d[1] + 1)
    pads = _spatial_pads(str(_val(a, "pad_type", "valid")), a.get("pad"), x.shape[2:], k_eff, s)
    ho = (x.shape[2] + pads[0][0] + pads[0][1] - k_eff[0]) // s[0] + 1
    wo = (x.shape[3] + pads[1][0] + pads[1][1] - k_eff[1]) // s[1] + 1
    return s, d, pads, ho, wo


def _as_2d(a: dict, keys=("strides", "dilations")) -> dict:
    """A 1-D conv/pool's arguments as a 2-D one's (H = 1)."""
    b = dict(a)
    b["x"] = a["x"][:, :, None, :]
    if "weight" in a:
        b["weight"] = a["weight"][:, :, None, :]
    for k in keys:
        if a.get(k) is not None:
            b[k] = [1] + _ints(a[k])
    if a.get("kernel_sizes") is not None:
        b["kernel_sizes"] = [1] + _ints(a["kernel_sizes"])
    if a.get("pad") is not None:
        b["pad"] = [0, 0] + _ints(a["pad"])
    return b


def _conv(a, n):
    if a["x"].ndim == 3:
        return _conv(_as_2d(a), n)[:, :, 0, :]
    x, w = a["x"], a["weight"]
    groups = int(_val(a, "groups", 1))
    nb, c, _, _ = x.shape
    co, cg, kh, kw = w.shape
    s, d, pads, ho, wo = _conv_geometry(a, x, kh, kw)
    b = a.get("bias")
    if groups == 1 and kh == kw == 1 and not any(p for pp in pads for p in pp):
        xs = x[:, :, ::s[0], ::s[1]][:, :, :ho, :wo] if s != (1, 1) else x
        out = np.matmul(w.reshape(co, c), xs.reshape(nb, c, ho * wo))
        if b is not None:
            out += b[:, None]
        return out.reshape(nb, co, ho, wo)
    if groups == c and cg == 1 and groups > 1:  # depthwise (channel multiplier co // c)
        if co != c:
            x = np.repeat(x, co // c, axis=1)
        views, hq, wq = _phase_taps(n, x, pads, kh, kw, s, d, ho, wo)
        cached = n.cache.get("dw")
        if cached is None or cached[0] is not w or cached[1] != hq * wq:
            # each tap's weights repeated along the grid: both operands of a multiply contiguous
            wf = w.reshape(co, kh * kw)
            cached = n.cache["dw"] = (w, hq * wq, [np.ascontiguousarray(np.broadcast_to(wf[:, t, None], (co, hq * wq)))
                                                   for t in range(kh * kw)])
        tiles = cached[2]
        out = np.multiply(views[0], tiles[0])
        tmp = np.empty_like(out)
        for v, t in zip(views[1:], tiles[1:]):
            np.multiply(v, t, out=tmp)
            out += tmp
        out = out.reshape(nb, co, hq, wq)[:, :, :ho, :wo]
        return out + b[:, None, None] if b is not None else out
    outs = []
    for g in range(groups):
        xg = x[:, g * cg:(g + 1) * cg] if groups > 1 else x
        wg = w[g * (co // groups):(g + 1) * (co // groups)] if groups > 1 else w
        outs.append(_conv_dense(n, xg, wg, pads, s, d, ho, wo))
    out = outs[0] if groups == 1 else np.concatenate(outs, axis=1)
    return out + b[:, None, None] if b is not None else out


def _conv_dense(node: Node, x, w, pads, s, d, ho: int, wo: int):
    """A groups=1 conv as one matmul over the taps' views copied side by side (im2col)."""
    nb, cg = x.shape[:2]
    kh, kw = w.shape[2:]
    views, rows, wq = _phase_taps(node, x, pads, kh, kw, s, d, ho, wo, contiguous=False)
    cols = np.empty((nb, cg, kh * kw, rows * wq), np.float32)
    for t, v in enumerate(views):
        cols[:, :, t] = v
    out = np.matmul(w.reshape(w.shape[0], cg * kh * kw), cols.reshape(nb, cg * kh * kw, rows * wq))
    return out.reshape(nb, -1, rows, wq)[:, :, :ho, :wo]


def _pool(kind: str):
    def op(a, n):
        if a["x"].ndim == 3:
            return op(_as_2d(a), n)[:, :, 0, :]
        x = a["x"]
        kh, kw = _ints(a["kernel_sizes"])
        s = tuple(_ints(_val(a, "strides", [1, 1])))
        pads = _spatial_pads(str(_val(a, "pad_type", "valid")), a.get("pad"), x.shape[2:], (kh, kw), s)
        ceil = bool(_val(a, "ceil_mode", False))
        outs = []
        for dim, (k, st, (pb, pa)) in enumerate(zip((kh, kw), s, pads)):
            size = x.shape[2 + dim]
            span = size + pb + pa - k
            o = (-(-span // st) if ceil else span // st) + 1
            if ceil and (o - 1) * st >= size + pb:
                o -= 1
            outs.append(o)
        ho, wo = outs
        # pad up to what the output grid reads (ceil mode may read past the given padding)
        extra = [max(0, (o - 1) * st + k - (x.shape[2 + i] + pads[i][0] + pads[i][1]))
                 for i, (o, st, k) in enumerate(zip(outs, s, (kh, kw)))]
        width = ((0, 0), (0, 0), (pads[0][0], pads[0][1] + extra[0]), (pads[1][0], pads[1][1] + extra[1]))
        fill = -np.inf if kind == "max" else 0.0
        xp = np.pad(x, width, constant_values=fill)
        win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::s[0], ::s[1]][:, :, :ho, :wo]
        if kind == "max":
            return win.max(axis=(-2, -1))
        total = win.sum(axis=(-2, -1))
        if bool(_val(a, "exclude_padding_from_average", False)):
            ones = np.pad(np.ones(x.shape[2:], np.float32), width[2:])
            cnt = np.lib.stride_tricks.sliding_window_view(ones, (kh, kw))[::s[0], ::s[1]][:ho, :wo].sum(axis=(-2, -1))
        else:  # the window clipped to the input plus its given padding (PyTorch's ceil-mode count)
            lim = [x.shape[2 + i] + pads[i][0] + pads[i][1] for i in range(2)]
            rows = np.minimum(np.arange(ho) * s[0] + kh, lim[0]) - np.arange(ho) * s[0]
            cols = np.minimum(np.arange(wo) * s[1] + kw, lim[1]) - np.arange(wo) * s[1]
            cnt = rows[:, None] * cols[None, :]
        return total / cnt.astype(np.float32)

    return op


OPS: dict[str, Callable[[dict, Node], Any]] = {
    "identity": _unary(lambda x: x),
    "cast": _cast,
    # activations and elementwise unary
    "relu": _relu,
    "relu6": _unary(lambda x: np.clip(x, 0, 6)),
    "sigmoid": _unary(_sigmoid),
    "tanh": _unary(np.tanh),
    "silu": _unary(lambda x: x * _sigmoid(x)),
    "leaky_relu": lambda a, n: np.where(a["x"] >= 0, a["x"], a["x"] * np.float32(_val(a, "alpha", 0.01))),
    "clip": lambda a, n: np.minimum(np.maximum(a["x"], a["alpha"]), a["beta"]),
    "abs": _unary(np.abs),
    "exp": _unary(np.exp),
    "sqrt": _unary(np.sqrt),
    "square": _unary(np.square),
    "rsqrt": lambda a, n: 1.0 / np.sqrt(a["x"] + np.float32(_val(a, "epsilon", 1e-12))),
    "inverse": lambda a, n: 1.0 / (a["x"] + np.float32(_val(a, "epsilon", 1e-4))),
    "log": lambda a, n: np.log(a["x"] + np.float32(_val(a, "epsilon", 1e-45))),
    "floor": _unary(np.floor),
    "ceil": _unary(np.ceil),
    "logical_not": _unary(np.logical_not),
    # elementwise binary (numpy broadcasting is MIL's)
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _real_div,
    "floor_div": _binary(np.floor_divide),
    "pow": _binary(np.power),
    "maximum": _binary(np.maximum),
    "minimum": _binary(np.minimum),
    "equal": _binary(np.equal),
    "not_equal": _binary(np.not_equal),
    "less": _binary(np.less),
    "less_equal": _binary(np.less_equal),
    "greater": _binary(np.greater),
    "greater_equal": _binary(np.greater_equal),
    "logical_and": _binary(np.logical_and),
    "logical_or": _binary(np.logical_or),
    "select": lambda a, n: np.where(a["cond"], a["a"], a["b"]),
    # reductions
    "reduce_mean": _reduce(np.mean),
    "reduce_sum": _reduce(np.sum),
    "reduce_max": _reduce(np.max),
    "reduce_min": _reduce(np.min),
    "reduce_prod": _reduce(np.prod),
    "reduce_l2_norm": _reduce(_reduce_l2),
    "reduce_l1_norm": _reduce(lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims)),
    "reduce_sum_square": _reduce(lambda x, axis, keepdims: np.sum(np.square(x), axis=axis, keepdims=keepdims)),
    "reduce_log_sum_exp": _reduce(_reduce_log_sum_exp),
    "reduce_argmax": _reduce_arg(np.argmax),
    "reduce_argmin": _reduce_arg(np.argmin),
    "softmax": _softmax,
    # shapes and layout
    "shape": lambda a, n: np.array(a["x"].shape, np.int32),
    "reshape": _reshape,
    "tile": lambda a, n: np.tile(a["x"], _ints(a["reps"])),
    "transpose": lambda a, n: np.transpose(a["x"], _ints(a["perm"])),
    "squeeze": _squeeze,
    "expand_dims": _expand_dims,
    "concat": _concat,
    "stack": _stack,
    "pad": _pad,
    "slice_by_index": _slice_by_index,
    "slice_by_size": _slice_by_size,
    # linear algebra, normalisation, convolution, pooling
    "linear": _linear,
    "matmul": _matmul,
    "batch_norm": _batch_norm,
    "conv": _conv,
    "avg_pool": _pool("avg"),
    "max_pool": _pool("max"),
    # compile-time weight decompression (iOS 16 constexpr ops)
    "constexpr_affine_dequantize": _constexpr_affine_dequantize,
    "constexpr_lut_to_dense": _constexpr_lut_to_dense,
    "constexpr_sparse_to_dense": _constexpr_sparse_to_dense,
    "constexpr_cast": _constexpr_cast,
}


# Inputs an op takes as float16 arrays as they are (exact ops, or ops that widen while copying
# anyway); every other float16 input is widened to float32 before the op runs.
F16_INPUTS: dict[str, tuple[str, ...]] = {
    "identity": ("x",), "relu": ("x",), "shape": ("x",), "reshape": ("x",), "tile": ("x",),
    "transpose": ("x",), "squeeze": ("x",), "expand_dims": ("x",), "concat": ("values",), "stack": ("values",),
    "pad": ("x",), "slice_by_index": ("x",), "slice_by_size": ("x",), "select": ("a", "b"),
}


_F16_TABLE: list[np.ndarray] = []


def _widen(x: np.ndarray) -> np.ndarray:
    """float16 -> float32 (exact), by table lookup: faster than numpy's cast."""
    if not _F16_TABLE:
        _F16_TABLE.append(np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32))
    return np.take(_F16_TABLE[0], np.ascontiguousarray(x).view(np.uint16))


def _rank(var) -> int | None:
    try:
        return int(var.rank)
    except Exception:
        return None


def _const_of(op, key):
    v = op.inputs.get(key)
    return None if v is None or isinstance(v, (list, tuple)) else v.val


def _check_op(op) -> str | None:
    """Why the interpreter cannot run this op as parametrised (None: it can); asked at load."""
    t = op.op_type
    if t in ("conv", "avg_pool", "max_pool"):
        r = _rank(op.inputs["x"])
        if r not in (3, 4):
            return f"{t} on rank-{r} input (only 1-D and 2-D {t} are supported)"
    if t == "conv" and _const_of(op, "groups") is None and "groups" in op.inputs:
        return "conv with non-constant groups"
    if t == "concat" and bool(_const_of(op, "interleave") or False):
        return "concat with interleave=True"
    if t == "pad":
        mode = _const_of(op, "mode")
        if mode is not None and str(mode) not in ("constant", "reflect", "replicate"):
            return f"pad mode {mode!r}"
    if t == "constexpr_lut_to_dense":
        lut = _const_of(op, "lut")
        if lut is not None and np.asarray(lut).ndim != 1:
            return "per-channel lookup tables (iOS 18 constexpr_lut_to_dense)"
    return None


def supported_ops() -> list[str]:
    return sorted(set(OPS) | {"const"})


# ----------------------------------------------------------------------------------------------
# the interpreter

_BLAS: list[Any] = []  # [threadpoolctl controller of the loaded BLAS libraries, or None]


def _blas_threads(n: int | None):
    """A context that runs numpy's BLAS with ``n`` threads (None: as it is), through threadpoolctl
    when it is installed (it comes with scikit-learn), else a no-op."""
    if n is None:
        return contextlib.nullcontext()
    if not _BLAS:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS.append(ThreadpoolController().select(user_api="blas"))
        except Exception:
            _BLAS.append(None)
    return _BLAS[0].limit(limits=n) if _BLAS[0] is not None else contextlib.nullcontext()


def _np_dtype(var):
    """The numpy dtype of a MIL var's elements (None for strings and other non-numeric types)."""
    from coremltools.converters.mil.mil import types

    try:
        t = types.nptype_from_builtin(var.dtype)
    except Exception:
        return None
    t = np.dtype(t)
    return None if t.kind in "USO" else t


def _all_ops(block):
    for op in block.operations:
        yield op
        for b in op.blocks:
            yield from _all_ops(b)


class Interpreter:
    """Runs one function of a MIL program with numpy (see the module docstring)."""

    def __init__(self, program, *, function: str = "main", inputs: dict[str, InputSpec] | None = None,
                 blas_threads: int | None = 1):
        """``inputs``: the package's input specs (allowed shapes); ``blas_threads``: numpy's BLAS
        threads while the interpreter runs. One by default: its matmuls are small, and OpenBLAS's
        pool, whose threads spin while they wait, made runs up to 30x slower on a 2-core machine
        whenever another process kept a core busy; None leaves the pool as it is."""
        coremltools_module()
        self.blas_threads = blas_threads
        if function not in program.functions:
            raise DeviceError(f"the program has no function {function!r} (it has: {', '.join(program.functions)})")
        fn = program.functions[function]
        self.function = function
        self._check_supported(fn, function)
        self.input_specs = dict(inputs or {})
        self._compile(fn)

    @classmethod
    def from_package(cls, path: str | Path, function: str = "main", **options: Any) -> "Interpreter":
        """The interpreter of a saved package, with its input specs; ``options`` as the constructor's."""
        spec = load_spec(path)
        return cls(load_program(path, spec), function=function, inputs=input_specs(spec), **options)

    # -- load ----------------------------------------------------------------------------------

    @staticmethod
    def _check_supported(fn, function: str) -> None:
        missing: dict[str, str] = {}
        for op in _all_ops(fn):
            t = op.op_type
            if t == "const":
                continue
            if t not in OPS:
                missing.setdefault(t, op.name)
                continue
            why = _check_op(op)
            if why:
                raise DeviceError(f"the Core ML interpreter cannot run op '{t}' (op name '{op.name}' in function "
                                  f"{function}): {why}; {FIX}")
        if missing:
            (t, name), *more = missing.items()
            also = f" (also missing: {', '.join(sorted(m for m, _ in more))})" if more else ""
            raise DeviceError(f"the Core ML interpreter has no op '{t}' (op name '{name}' in function {function})"
                              f"{also}; {FIX}")

    def _compile(self, fn) -> None:
        slots: dict[str, int] = {}
        consts: dict[str, Any] = {}  # var name -> value as the ops see it (fp16 widened to float32)
        self._inputs: list[tuple[str, int, Any, tuple]] = []  # name, slot, dtype, shape (None: symbolic)
        for name, var in fn.inputs.items():
            slots[name] = len(slots)
            shape = tuple(int(d) if isinstance(d, (int, np.integer)) else None for d in var.shape)
            self._inputs.append((name, slots[name], _np_dtype(var), shape))
        steps: list[tuple] = []
        slot_dtype: dict[int, Any] = {slot: dt for _, slot, dt, _ in self._inputs}
        last_use: dict[int, int] = {}

        def widen(v):
            if isinstance(v, np.ndarray) and v.dtype == np.float16:
                return v.astype(np.float32)
            if isinstance(v, np.float16):
                return np.float32(v)
            return v

        shared: dict[str, Any] = {}
        for op in fn.operations:
            node = Node(op.name, op.op_type, tuple(_np_dtype(o) for o in op.outputs), shared=shared)
            if op.op_type == "const":
                consts[op.outputs[0].name] = widen(op.outputs[0].val)
                continue
            args: list[tuple[str, int, Any]] = []  # key, kind (0 slot / 1 const / 2 list), ref
            is_const = True
            for key, v in op.inputs.items():
                if isinstance(v, (list, tuple)):
                    refs = [(1, consts[x.name]) if x.name in consts else (0, slots[x.name]) for x in v]
                    is_const &= all(k == 1 for k, _ in refs)
                    args.append((key, 2, refs))
                elif v.name in consts:
                    args.append((key, 1, consts[v.name]))
                else:
                    is_const = False
                    args.append((key, 0, slots[v.name]))
            outs = [o.name for o in op.outputs]
            if is_const:  # fold: constexpr ops and ops on constants only
                with np.errstate(all="ignore"):
                    res = self._call(OPS[op.op_type], node, {k: (ref if kind == 1 else [r for _, r in ref])
                                                             for k, kind, ref in args})
                    for o, r, dt in zip(outs, res, node.out_dtypes):
                        consts[o] = widen(_as(r, dt))
                continue
            for o in outs:
                slots[o] = len(slots)
            widen_keys = []
            as_is = F16_INPUTS.get(op.op_type, ())
            for key, kind, ref in args:
                if key in as_is:
                    continue
                if kind == 0 and slot_dtype.get(ref) == np.float16:
                    widen_keys.append(key)
                elif kind == 2:
                    widen_keys.extend(f"{key}#{i}" for i, (k, r) in enumerate(ref)
                                      if k == 0 and slot_dtype.get(r) == np.float16)
            for o, dt in zip(outs, node.out_dtypes):
                slot_dtype[slots[o]] = dt
            for _, kind, ref in args:
                for s in ([ref] if kind == 0 else [r for k, r in ref if k == 0] if kind == 2 else []):
                    last_use[s] = len(steps)
            steps.append((OPS[op.op_type], node, args, frozenset(widen_keys), [slots[o] for o in outs]))
        self._outputs: list[tuple[str, Any, Any]] = []  # name, slot or None, const value
        for o in fn.outputs:
            dt = _np_dtype(o)
            if o.name in consts:
                self._outputs.append((o.name, None, _as(consts[o.name], dt)))
            else:
                self._outputs.append((o.name, slots[o.name], dt))
                last_use[slots[o.name]] = len(steps)  # never freed
        frees: list[list[int]] = [[] for _ in steps]
        for s, i in last_use.items():
            if i < len(steps):
                frees[i].append(s)
        self._steps = [(*st, tuple(f)) for st, f in zip(steps, frees)]
        self._n_slots = len(slots)
        self._slots = slots
        self._consts = consts
        self.ops = [st[1] for st in self._steps]

    # -- run -----------------------------------------------------------------------------------

    @property
    def input_names(self) -> list[str]:
        return [name for name, *_ in self._inputs]

    @property
    def output_names(self) -> list[str]:
        return [name for name, *_ in self._outputs]

    @staticmethod
    def _call(fn, node: Node, a: dict) -> tuple:
        try:
            res = fn(a, node)
        except DeviceError as e:
            raise DeviceError(f"the Core ML interpreter cannot run op '{node.op_type}' (op name '{node.name}'): "
                              f"{e}; {FIX}") from None
        except Exception as e:
            raise DeviceError(f"the Core ML interpreter failed at op '{node.op_type}' (op name '{node.name}'): "
                              f"{e.__class__.__name__}: {_first_line(e)}; report the model") from None
        return res if isinstance(res, tuple) else (res,)

    def _check_input(self, name: str, x: Any, dtype, shape) -> np.ndarray:
        x = np.asarray(x)
        spec = self.input_specs.get(name)
        if spec is not None and spec.shapes is not None and tuple(x.shape) not in spec.shapes:
            allowed = ", ".join(str(list(s)) for s in spec.shapes)
            raise DeviceError(f"input '{name}' has shape {list(x.shape)}; the package accepts {allowed} "
                              "(use run_batched for other batch sizes)")
        if len(shape) != x.ndim or any(d is not None and d != g for d, g in zip(shape, x.shape)):
            want = ", ".join("?" if d is None else str(d) for d in shape)
            raise DeviceError(f"input '{name}' has shape {list(x.shape)}; the program takes [{want}]")
        return x.astype(dtype, copy=False) if dtype is not None else x

    def run(self, inputs: dict[str, Any], keep: tuple[str, ...] | list[str] = ()) -> dict[str, np.ndarray]:
        """Outputs by name for ``inputs`` by name (shapes as the package accepts them). ``keep``:
        names of intermediate vars to return too (as stored: FP16 ones as float16). Overflow to
        Inf and NaN are results, as on a device, not warnings."""
        with _blas_threads(self.blas_threads), np.errstate(all="ignore"):
            return self._run(inputs, keep)

    def _run(self, inputs: dict[str, Any], keep: tuple[str, ...] | list[str] = ()) -> dict[str, np.ndarray]:
        unknown_vars = [k for k in keep if k not in self._slots and k not in self._consts]
        if unknown_vars:
            raise DeviceError(f"the program has no var {unknown_vars[0]!r}")
        kept = {self._slots[k] for k in keep if k in self._slots}
        unknown = sorted(set(inputs) - set(self.input_names))
        missing = [n for n in self.input_names if n not in inputs]
        if unknown or missing:
            raise DeviceError(f"the program takes inputs {self.input_names}, got {sorted(inputs)}")
        env: list[Any] = [None] * self._n_slots
        for name, slot, dtype, shape in self._inputs:
            env[slot] = self._check_input(name, inputs[name], dtype, shape)
        call = self._call
        for fn, node, args, widen, outs, frees in self._steps:
            a = {}
            for key, kind, ref in args:
                if kind == 0:
                    v = env[ref]
                    a[key] = _widen(v) if key in widen else v
                elif kind == 1:
                    a[key] = ref
                else:
                    a[key] = [(_widen(env[r]) if f"{key}#{i}" in widen else env[r]) if k == 0 else r
                              for i, (k, r) in enumerate(ref)]
            res = call(fn, node, a)
            for slot, r, dt in zip(outs, res, node.out_dtypes):
                env[slot] = _as(r, dt)
            for s in frees:
                if s not in kept:
                    env[s] = None
        out = {name: (np.array(ref) if slot is None else env[slot]) for name, slot, ref in self._outputs}
        for k in keep:
            out[k] = env[self._slots[k]] if k in self._slots else np.asarray(self._consts[k])
        return out

    def chunks(self, n: int, input_name: str | None = None) -> list[tuple[int, int, int]]:
        """How :meth:`run_batched` splits ``n`` rows: (start, rows, batch size run)."""
        spec = self.input_specs.get(input_name or self.input_names[0])
        return batch_chunks(n, spec.batch_sizes if spec is not None and spec.shapes is not None else None)

    def run_batched(self, x: np.ndarray, input_name: str | None = None, output_name: str | None = None) -> np.ndarray:
        """One output for a batch of any size, run in chunks of the package's batch sizes."""
        if len(self.input_names) != 1:
            raise DeviceError(f"run_batched needs a one-input program; this one takes {self.input_names}")
        name = input_name or self.input_names[0]
        out_name = output_name or self.output_names[0]
        x = np.asarray(x)
        parts = []
        with _blas_threads(self.blas_threads), np.errstate(all="ignore"):
            for start, rows, size in self.chunks(len(x), name):
                xb = x[start:start + rows]
                if size > rows:
                    xb = np.concatenate([xb, np.zeros((size - rows, *x.shape[1:]), x.dtype)])
                parts.append(self._run({name: xb})[out_name][:rows])
        if not parts:
            raise DeviceError("run_batched got an empty batch")
        return np.concatenate(parts)


def batch_chunks(n: int, sizes: tuple[int, ...] | None) -> list[tuple[int, int, int]]:
    """``n`` rows as Core ML takes them: (start, rows, batch size to run) chunks of the allowed
    ``sizes`` (None: any size, one chunk), the largest that fits first; a remainder smaller than
    every size is padded up to the smallest."""
    if not sizes:
        return [(0, n, n)] if n else []
    sizes = tuple(sorted(sizes))
    out, start = [], 0
    while start < n:
        left = n - start
        fit = [b for b in sizes if b <= left]
        take = fit[-1] if fit else left
        out.append((start, take, fit[-1] if fit else sizes[0]))
        start += take
    return out


def _as(r: Any, dt) -> Any:
    """An op's result as its declared dtype (fp16: rounded to nearest even)."""
    if dt is None:
        return r
    if isinstance(r, np.ndarray):
        return r if r.dtype == dt else r.astype(dt)
    return np.asarray(r).astype(dt)

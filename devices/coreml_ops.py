"""The op kernels of the Core ML reference interpreter (:mod:`devices.coreml_interp`), in numpy, and
``OPS``, the one table of MIL op type -> kernel (:func:`register_op`: a type registered twice is an
error). The convolution and pooling kernels are in :mod:`devices.coreml_conv`.

A kernel is ``fn(args, node) -> array`` (or a tuple, one per output): ``args`` maps the op's input
names to their values, float16 ones widened to float32 except those ``F16_INPUTS`` lists; ``node``
is the op's :class:`~devices.coreml_program.Node`. The interpreter casts each result to the op's
output dtype. :func:`unsupported_reason` says, at load, why a kernel cannot run an op as
parametrised.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from devices.coreml_conv import conv, pool
from devices.coreml_program import Node, arg, const_input, ints, var_rank
from devices.errors import DeviceError

Kernel = Callable[[dict, Node], Any]


# ----------------------------------------------------------------------------------------------
# elementwise, reduction, shape and linear kernels


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


def _sigmoid_hard(a, n):
    """min(max(alpha x + beta, 0), 1): torch's hardsigmoid (alpha 1/6, beta 0.5) and, after
    ``thresholded_relu(x, -3)``, half of its hardswish."""
    x = a["x"]
    return np.clip(x * np.float32(a["alpha"]) + np.float32(a["beta"]), 0, 1).astype(x.dtype, copy=False)


def _thresholded_relu(a, n):
    """x where x >= alpha, else 0 (coremltools writes hardswish as ``w = thresholded_relu(x, -3)``,
    ``w * sigmoid_hard(w, 1/6, 0.5)``)."""
    x = a["x"]
    return np.where(x >= np.float32(arg(a, "alpha", 1.0)), x, np.zeros((), x.dtype))


# Abramowitz & Stegun 7.1.26 is too coarse (1.5e-7 absolute) near 0 for float32; this is erf by
# its Taylor series for |x| < 2 and by erfc's continued fraction above, in float64: within 1e-15
def _erf(x: np.ndarray) -> np.ndarray:
    x64 = np.asarray(x, np.float64)
    ax = np.abs(x64)
    out = np.empty_like(x64)
    small = ax < 2.0
    if small.any():
        z = x64[small]
        z2 = z * z
        term = z.copy()
        total = z.copy()
        for k in range(1, 40):  # sum_k (-1)^k z^(2k+1) / (k! (2k+1)); 40 terms reach 1e-16 at |z| = 2
            term = term * (-z2) / k
            total += term / (2 * k + 1)
        out[small] = total * (2.0 / math.sqrt(math.pi))
    big = ~small
    if big.any():
        z = ax[big]
        # erfc(z) = exp(-z^2)/sqrt(pi) * 1/(z + 1/2/(z + 1/(z + 3/2/(z + ...)))), evaluated bottom up
        frac = np.zeros_like(z)
        for k in range(60, 0, -1):
            frac = (k / 2.0) / (z + frac)
        erfc = np.exp(-z * z) / math.sqrt(math.pi) / (z + frac)
        out[big] = np.sign(x64[big]) * (1.0 - erfc)
    return out.astype(np.float32)


def _gelu(a, n):
    x = a["x"]
    mode = str(arg(a, "mode", "EXACT"))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(np.float32(math.sqrt(2 / math.pi)) * (x + np.float32(0.044715) * x ** 3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(np.float32(1.702) * x)
    return (0.5 * x * (1 + _erf(x * np.float32(1 / math.sqrt(2))))).astype(np.float32)


def _layer_norm(a, n):
    """gamma (x - E[x]) / sqrt(Var[x] + eps) + beta over ``axes`` (None: all), gamma and beta shaped
    as ``x.shape[axes]``."""
    x = a["x"]
    axes = a.get("axes")
    ax = tuple(range(x.ndim)) if axes is None else tuple(i % x.ndim for i in ints(axes))
    mean = x.mean(axis=ax, keepdims=True)
    d = x - mean
    var = np.square(d).mean(axis=ax, keepdims=True)
    out = d / np.sqrt(var + np.float32(arg(a, "epsilon", 1e-5)))
    shape = [x.shape[i] if i in ax else 1 for i in range(x.ndim)]
    if a.get("gamma") is not None:
        out = out * np.reshape(a["gamma"], shape)
    if a.get("beta") is not None:
        out = out + np.reshape(a["beta"], shape)
    return out


def _real_div(a, n):
    x, y = a["x"], a["y"]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.true_divide(x, y)  # int operands (shape arithmetic): cast back to the output dtype


def _reduce(fn: Callable[..., np.ndarray]):
    def op(a, n):
        axes = a.get("axes")
        axis = None if axes is None else tuple(ints(axes))
        return fn(a["x"], axis=axis, keepdims=bool(arg(a, "keep_dims", False)))

    return op


def _reduce_l2(x, axis, keepdims):
    return np.sqrt(np.sum(np.square(x), axis=axis, keepdims=keepdims))


def _reduce_log_sum_exp(x, axis, keepdims):
    m = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


def _reduce_arg(fn):
    def op(a, n):
        axis = int(arg(a, "axis", -1))
        out = fn(a["x"], axis=axis)
        return np.expand_dims(out, axis) if bool(arg(a, "keep_dims", False)) else out

    return op


def _reshape(a, n):
    x = a["x"]
    shape = ints(a["shape"])
    if len(shape) == x.ndim:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _expand_dims(a, n):
    return np.expand_dims(a["x"], tuple(ints(a["axes"])))


def _squeeze(a, n):
    axes = a.get("axes")
    return np.squeeze(a["x"]) if axes is None else np.squeeze(a["x"], axis=tuple(ints(axes)))


def _slice_by_index(a, n):
    x = a["x"]
    r = x.ndim
    begin = ints(arg(a, "begin", [0] * r))
    end = ints(arg(a, "end", [0] * r))
    stride = ints(arg(a, "stride", [1] * r))
    bm = [bool(v) for v in np.asarray(arg(a, "begin_mask", [False] * r)).reshape(-1)]
    em = [bool(v) for v in np.asarray(arg(a, "end_mask", [False] * r)).reshape(-1)]
    sm = [bool(v) for v in np.asarray(arg(a, "squeeze_mask", [False] * r)).reshape(-1)]
    idx = []
    for i in range(r):
        if sm[i]:
            idx.append(begin[i])
        else:
            idx.append(slice(None if bm[i] else begin[i], None if em[i] else end[i], stride[i] or 1))
    return x[tuple(idx)]


def _slice_by_size(a, n):
    x = a["x"]
    begin, size = ints(a["begin"]), ints(a["size"])
    return x[tuple(slice(b, x.shape[i] if s == -1 else b + s) for i, (b, s) in enumerate(zip(begin, size)))]


def _concat(a, n):
    return np.concatenate(list(a["values"]), axis=int(a["axis"]))


def _split(a, n):
    """MIL ``split``: ``split_sizes`` along ``axis``, or ``num_splits`` equal parts (one output each)."""
    x = a["x"]
    axis = int(a["axis"]) % x.ndim
    sizes = a.get("split_sizes")
    if sizes is None:
        k = int(a["num_splits"])
        sizes = [x.shape[axis] // k] * k
    bounds = np.cumsum(ints(sizes))[:-1]
    return tuple(np.split(x, bounds, axis=axis))


def _stack(a, n):
    return np.stack(list(a["values"]), axis=int(a["axis"]))


def _pad(a, n):
    x = a["x"]
    p = ints(a["pad"])
    k = len(p) // 2
    width = [(0, 0)] * (x.ndim - k) + [(p[2 * i], p[2 * i + 1]) for i in range(k)]
    mode = str(arg(a, "mode", "constant"))
    if mode == "constant":
        return np.pad(x, width, mode="constant", constant_values=arg(a, "constant_val", 0.0))
    return np.pad(x, width, mode={"reflect": "reflect", "replicate": "edge"}[mode])


def _softmax(a, n):
    x = a["x"]
    axis = int(arg(a, "axis", -1))
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
    if bool(arg(a, "transpose_x", False)):
        x = np.swapaxes(x, -1, -2)
    if bool(arg(a, "transpose_y", False)):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _batch_norm(a, n):
    x = a["x"]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    eps = np.float32(arg(a, "epsilon", 1e-5))
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
    lut, shape = np.asarray(a["lut"]), ints(a["shape"])
    if lut.ndim != 1:
        raise DeviceError("per-channel lookup tables (iOS 18 constexpr_lut_to_dense) are not supported")
    nbits = int(round(math.log2(lut.size)))
    idx = _unpack_bits(a["indices"], nbits, int(np.prod(shape)))
    return lut[idx].reshape(shape)


def _constexpr_sparse_to_dense(a, n):
    shape = ints(a["shape"])
    data = np.asarray(a["nonzero_data"])
    out = np.zeros(int(np.prod(shape)), data.dtype)
    out[np.unpackbits(np.asarray(a["mask"], np.uint8), bitorder="little")[: out.size] != 0] = data
    return out.reshape(shape)


def _constexpr_cast(a, n):
    return np.asarray(a["source_val"])



# ----------------------------------------------------------------------------------------------
# the table

OPS: dict[str, Kernel] = {}  # MIL op type -> kernel


def register_op(op_type: str, kernel: Kernel) -> Kernel:
    """Add the kernel of MIL op ``op_type`` to ``OPS``; a type registered twice is an error."""
    if op_type in OPS:
        raise ValueError(f"Core ML op {op_type!r} already has a kernel")
    OPS[op_type] = kernel
    return kernel


for _op_type, _kernel in (
    ("identity", _unary(lambda x: x)),
    ("cast", _cast),
    # activations and elementwise unary
    ("relu", _relu),
    ("relu6", _unary(lambda x: np.clip(x, 0, 6))),
    ("sigmoid", _unary(_sigmoid)),
    ("tanh", _unary(np.tanh)),
    ("silu", _unary(lambda x: x * _sigmoid(x))),
    ("sigmoid_hard", _sigmoid_hard),
    ("thresholded_relu", _thresholded_relu),
    ("gelu", _gelu),
    ("erf", _unary(_erf)),
    ("leaky_relu", lambda a, n: np.where(a["x"] >= 0, a["x"], a["x"] * np.float32(arg(a, "alpha", 0.01)))),
    ("clip", lambda a, n: np.minimum(np.maximum(a["x"], a["alpha"]), a["beta"])),
    ("abs", _unary(np.abs)),
    ("exp", _unary(np.exp)),
    ("sqrt", _unary(np.sqrt)),
    ("square", _unary(np.square)),
    ("rsqrt", lambda a, n: 1.0 / np.sqrt(a["x"] + np.float32(arg(a, "epsilon", 1e-12)))),
    ("inverse", lambda a, n: 1.0 / (a["x"] + np.float32(arg(a, "epsilon", 1e-4)))),
    ("log", lambda a, n: np.log(a["x"] + np.float32(arg(a, "epsilon", 1e-45)))),
    ("floor", _unary(np.floor)),
    ("ceil", _unary(np.ceil)),
    ("logical_not", _unary(np.logical_not)),
    # elementwise binary (numpy broadcasting is MIL's)
    ("add", _binary(np.add)),
    ("sub", _binary(np.subtract)),
    ("mul", _binary(np.multiply)),
    ("real_div", _real_div),
    ("floor_div", _binary(np.floor_divide)),
    ("pow", _binary(np.power)),
    ("maximum", _binary(np.maximum)),
    ("minimum", _binary(np.minimum)),
    ("equal", _binary(np.equal)),
    ("not_equal", _binary(np.not_equal)),
    ("less", _binary(np.less)),
    ("less_equal", _binary(np.less_equal)),
    ("greater", _binary(np.greater)),
    ("greater_equal", _binary(np.greater_equal)),
    ("logical_and", _binary(np.logical_and)),
    ("logical_or", _binary(np.logical_or)),
    ("select", lambda a, n: np.where(a["cond"], a["a"], a["b"])),
    # reductions
    ("reduce_mean", _reduce(np.mean)),
    ("reduce_sum", _reduce(np.sum)),
    ("reduce_max", _reduce(np.max)),
    ("reduce_min", _reduce(np.min)),
    ("reduce_prod", _reduce(np.prod)),
    ("reduce_l2_norm", _reduce(_reduce_l2)),
    ("reduce_l1_norm", _reduce(lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims))),
    ("reduce_sum_square", _reduce(lambda x, axis, keepdims: np.sum(np.square(x), axis=axis, keepdims=keepdims))),
    ("reduce_log_sum_exp", _reduce(_reduce_log_sum_exp)),
    ("reduce_argmax", _reduce_arg(np.argmax)),
    ("reduce_argmin", _reduce_arg(np.argmin)),
    ("softmax", _softmax),
    # shapes and layout
    ("shape", lambda a, n: np.array(a["x"].shape, np.int32)),
    ("reshape", _reshape),
    ("tile", lambda a, n: np.tile(a["x"], ints(a["reps"]))),
    ("transpose", lambda a, n: np.transpose(a["x"], ints(a["perm"]))),
    ("squeeze", _squeeze),
    ("expand_dims", _expand_dims),
    ("concat", _concat),
    ("stack", _stack),
    ("split", _split),
    ("pad", _pad),
    ("slice_by_index", _slice_by_index),
    ("slice_by_size", _slice_by_size),
    # linear algebra, normalisation, convolution, pooling
    ("linear", _linear),
    ("matmul", _matmul),
    ("batch_norm", _batch_norm),
    ("layer_norm", _layer_norm),
    ("conv", conv),
    ("avg_pool", pool("avg")),
    ("max_pool", pool("max")),
    # compile-time weight decompression (iOS 16 constexpr ops)
    ("constexpr_affine_dequantize", _constexpr_affine_dequantize),
    ("constexpr_lut_to_dense", _constexpr_lut_to_dense),
    ("constexpr_sparse_to_dense", _constexpr_sparse_to_dense),
    ("constexpr_cast", _constexpr_cast),
):
    register_op(_op_type, _kernel)
del _op_type, _kernel


# Inputs an op takes as float16 arrays as they are (exact ops, or ops that widen while copying
# anyway); every other float16 input is widened to float32 before the op runs.
F16_INPUTS: dict[str, tuple[str, ...]] = {
    "identity": ("x",), "relu": ("x",), "shape": ("x",), "reshape": ("x",), "tile": ("x",),
    "transpose": ("x",), "squeeze": ("x",), "expand_dims": ("x",), "concat": ("values",), "stack": ("values",),
    "split": ("x",),
    "pad": ("x",), "slice_by_index": ("x",), "slice_by_size": ("x",), "select": ("a", "b"),
}


def unsupported_reason(op) -> str | None:
    """Why the interpreter cannot run this MIL op as parametrised (None: it can); asked at load."""
    t = op.op_type
    if t in ("conv", "avg_pool", "max_pool"):
        r = var_rank(op.inputs["x"])
        if r not in (3, 4):
            return f"{t} on rank-{r} input (only 1-D and 2-D {t} are supported)"
    if t == "conv" and const_input(op, "groups") is None and "groups" in op.inputs:
        return "conv with non-constant groups"
    if t == "concat" and bool(const_input(op, "interleave") or False):
        return "concat with interleave=True"
    if t == "pad":
        mode = const_input(op, "mode")
        if mode is not None and str(mode) not in ("constant", "reflect", "replicate"):
            return f"pad mode {mode!r}"
    if t == "constexpr_lut_to_dense":
        lut = const_input(op, "lut")
        if lut is not None and np.asarray(lut).ndim != 1:
            return "per-channel lookup tables (iOS 18 constexpr_lut_to_dense)"
    return None


def supported_ops() -> list[str]:
    """The MIL op types the interpreter runs (``const`` is the interpreter's own)."""
    return sorted(set(OPS) | {"const"})

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

The package is read by :mod:`devices.coreml_program`; the ops run as the kernels of
:mod:`devices.coreml_ops` (``OPS``, the table ``op_type -> kernel``) and :mod:`devices.coreml_conv`
(convolution and pooling). What it runs: every op that hetero's backbones produce at FP32, FP16,
with compressed weights and with an image input, plus common elementwise, reduction, shape and
pooling ops (see ``supported_ops()``). A program with any other op is refused when it is loaded,
with a one-line :class:`DeviceError` naming the op, never halfway through a run. Constant ops
(``const``, the ``constexpr_*`` weight decompressions, and every op whose inputs are all
constants) are evaluated once, at load.

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

Speed: convolutions run as matmuls (see :mod:`devices.coreml_conv`); numpy's BLAS is held to one
thread during runs (``blas_threads``). The demo edge model runs at about 3,400 images/s (FP32) and
1,850 (FP16) on 2 cores (``benchmarks/coreml_interp.py``).

numpy only; coremltools (to read the package) is imported lazily. Not thread-safe: a conv keeps
its padded-input buffers between runs (up to ``CACHE_BYTES`` per interpreter).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from devices.coreml_conv import CACHE_BYTES
from devices.coreml_ops import F16_INPUTS, OPS, register_op, supported_ops, unsupported_reason
from devices.coreml_program import (
    FIX,
    WEIGHTS_DIR,
    InputSpec,
    Node,
    all_ops,
    coremltools_module,
    coremltools_version,
    first_line,
    input_specs,
    load_program,
    load_spec,
    np_dtype,
    pixels_from_preprocessed,
)
from devices.errors import DeviceError

# what `from devices.coreml_interp import ...` has always offered, wherever it lives now
__all__ = ["CACHE_BYTES", "F16_INPUTS", "FIX", "OPS", "WEIGHTS_DIR", "InputSpec", "Interpreter", "Node", "batch_chunks",
           "coremltools_module", "coremltools_version", "input_specs", "load_program", "load_spec",
           "pixels_from_preprocessed", "register_op", "supported_ops"]


_BLAS: list[Any] = []  # [threadpoolctl controller of the loaded BLAS libraries, or None]


def _blas_threads(n: int | None):
    """A context that runs numpy's BLAS with ``n`` threads (None: as it is), through threadpoolctl
    when it is installed (it comes with scikit-learn), else a no-op."""
    if n is None:
        return contextlib.nullcontext()
    if not _BLAS:
        try:
            # optional (it comes with scikit-learn), and only needed once a run starts
            from threadpoolctl import ThreadpoolController

            _BLAS.append(ThreadpoolController().select(user_api="blas"))
        except Exception:
            _BLAS.append(None)
    return _BLAS[0].limit(limits=n) if _BLAS[0] is not None else contextlib.nullcontext()


_F16_TABLE: list[np.ndarray] = []


def _widen(x: np.ndarray) -> np.ndarray:
    """float16 -> float32 (exact), by table lookup: faster than numpy's cast."""
    if not _F16_TABLE:
        _F16_TABLE.append(np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32))
    return np.take(_F16_TABLE[0], np.ascontiguousarray(x).view(np.uint16))


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
        for op in all_ops(fn):
            t = op.op_type
            if t == "const":
                continue
            if t not in OPS:
                missing.setdefault(t, op.name)
                continue
            why = unsupported_reason(op)
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
            self._inputs.append((name, slots[name], np_dtype(var), shape))
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
            node = Node(op.name, op.op_type, tuple(np_dtype(o) for o in op.outputs), shared=shared)
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
            dt = np_dtype(o)
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
                              f"{e.__class__.__name__}: {first_line(e)}; report the model") from None
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

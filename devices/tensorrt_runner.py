"""TensorRT runner: deserialise a ``.plan`` and run it with the tensor-address API
(``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``), where ``tensorrt``, NVIDIA's
``cuda-python`` and a CUDA GPU are present.

UNVERIFIED: written against TensorRT 10/11's and cuda-python 12's documented Python APIs. No machine
this project was developed on had TensorRT (its PyPI packages fetch from NVIDIA's index; the lent GPU
machine had none), so this runner has never run on a GPU. ``tests/devices/test_tensorrt_runner.py``
drives its buffer and stream plumbing through stand-ins for both libraries.

Device buffers and the stream come from the CUDA runtime through cuda-python
(``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6): numpy and the runtime only, no torch, as
everywhere in the device core. Both libraries are imported when the runner is used.
"""
from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from devices.errors import DeviceError
from devices.runner import Runner, register_runner

CUDA_PYTHON = "pip install cuda-python (NVIDIA's CUDA runtime bindings)"


def cudart() -> Any:
    """The CUDA runtime module of cuda-python (ImportError without it)."""
    try:
        return importlib.import_module("cuda.bindings.runtime")  # optional: cuda-python >= 12.6, GPU hosts only
    except ImportError:
        return importlib.import_module("cuda.cudart")  # optional: older cuda-python, GPU hosts only


def _call(rt: Any, result: Any, what: str) -> Any:
    """The value of a cuda-python call, which returns ``(error, *values)``; a DeviceError on failure."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        raise DeviceError(f"CUDA {what} failed ({getattr(err, 'name', err)}); check the GPU and its driver")
    return values[0] if len(values) == 1 else tuple(values)


def _cuda_here() -> str | None:
    try:
        rt = cudart()
    except ImportError:
        return f"cuda-python is not installed to run TensorRT engines ({CUDA_PYTHON})"
    err, count = rt.cudaGetDeviceCount()
    return None if err == rt.cudaError_t.cudaSuccess and count > 0 else "no CUDA GPU here"


@register_runner("tensorrt")
class TensorRTRunner(Runner):
    formats = ("tensorrt",)
    extra = "tensorrt"

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            importlib.import_module("tensorrt")  # heavy optional runtime: imported only to see that it loads
        except Exception as e:  # not installed, or PyPI's placeholder that fails on import
            return f"tensorrt is not installed here ({e.__class__.__name__}; pip install 'hetero[tensorrt]' on a GPU machine)"
        return _cuda_here()

    def open(self) -> None:
        trt = importlib.import_module("tensorrt")  # the runtime, imported on use (GPU hosts only)
        rt = cudart()
        self._trt, self._rt, self._buffers, self._stream = trt, rt, [], None
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(self.artifact.path.read_bytes())
        if engine is None:
            raise DeviceError(f"TensorRT {trt.__version__} cannot deserialise {self.artifact.path.name}: a plan is specific "
                              "to the GPU and TensorRT version that built it; rebuild it here with the manifest's build_command")
        self._in = self.artifact.entry["input"]["name"]
        self._out = self.artifact.entry["output"]["name"]
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        if names != {self._in, self._out}:
            raise DeviceError(f"the engine's I/O tensors are {sorted(names)}, its entry says {self._in!r} and "
                              f"{self._out!r}; rebuild it from the exported ONNX with the manifest's build_command")
        for n in (self._in, self._out):
            if engine.get_tensor_dtype(n) != trt.float32:
                raise DeviceError(f"the engine's {n!r} is {engine.get_tensor_dtype(n)}, not float32; rebuild it "
                                  "from the exported ONNX with the manifest's build_command")
        self._engine = engine
        self._ctx = engine.create_execution_context()
        prof = self.artifact.entry.get("profile") or {}
        self._max = int(prof.get("max", [self.batch_size])[0]) if prof else self.batch_size
        self.batch_size = min(self.batch_size, self._max)
        self._gpu = _call(rt, rt.cudaGetDeviceProperties(0), "reading the GPU's name").name
        self._stream = _call(rt, rt.cudaStreamCreate(), "creating a stream")
        # one input and one output buffer for the largest batch the engine takes, reused by every call
        per_in = 4 * int(np.prod(self.artifact.input_shape))
        self._d_in = self._alloc(self.batch_size * per_in)
        self._d_out = self._alloc(self.batch_size * 4 * self.artifact.dim)

    def _alloc(self, nbytes: int) -> int:
        ptr = _call(self._rt, self._rt.cudaMalloc(nbytes), f"allocating {nbytes} bytes")
        self._buffers.append(ptr)
        return int(ptr)

    @property
    def runtime(self) -> str:
        trt, gpu = getattr(self, "_trt", None), getattr(self, "_gpu", None)
        name = gpu.decode(errors="replace").rstrip("\0") if isinstance(gpu, bytes) else (gpu or "?")
        return f"tensorrt {trt.__version__ if trt else '?'} on {name}"

    def versions(self) -> dict[str, str]:
        trt = getattr(self, "_trt", None)
        return {"tensorrt": trt.__version__ if trt else "?"}

    def close(self) -> None:
        rt = getattr(self, "_rt", None)
        for ptr in getattr(self, "_buffers", []):
            rt.cudaFree(ptr)
        if getattr(self, "_stream", None) is not None:
            rt.cudaStreamDestroy(self._stream)
        self._buffers, self._stream, self._ctx, self._engine = [], None, None, None

    def _run(self, batch: np.ndarray) -> np.ndarray:
        rt, stream = self._rt, self._stream
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if len(x) > self.batch_size:  # the device buffers hold batch_size rows
            raise DeviceError(f"a batch of {len(x)} is larger than this runner's buffers ({self.batch_size}); "
                              f"pass at most {self.batch_size} images at a time")
        if not self._ctx.set_input_shape(self._in, tuple(x.shape)):
            raise DeviceError(f"the engine refuses batch {x.shape[0]}: outside its optimisation profile (max {self._max})")
        y = np.empty(tuple(self._ctx.get_tensor_shape(self._out)), dtype=np.float32)
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _call(rt, rt.cudaMemcpyAsync(self._d_in, x.ctypes.data, x.nbytes, h2d, stream), "copying the batch in")
        self._ctx.set_tensor_address(self._in, self._d_in)
        self._ctx.set_tensor_address(self._out, self._d_out)
        if not self._ctx.execute_async_v3(int(stream)):
            raise DeviceError("TensorRT execute_async_v3 failed")
        _call(rt, rt.cudaMemcpyAsync(y.ctypes.data, self._d_out, y.nbytes, d2h, stream), "copying the embeddings out")
        _call(rt, rt.cudaStreamSynchronize(stream), "waiting for the stream")
        return y

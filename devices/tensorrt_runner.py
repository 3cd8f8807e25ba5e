"""TensorRT runner: deserialise a ``.plan`` and run it with the tensor-address API
(``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``), where ``tensorrt`` and a CUDA GPU
are present.

UNVERIFIED: written against TensorRT 10/11's documented Python API. No machine this project was
developed on had TensorRT (its PyPI packages fetch from NVIDIA's index; the lent GPU machine had
none), so this runner has never run. Its tests skip with a reason elsewhere.

Device buffers come from NVIDIA's cuda-python (``cuda.bindings.runtime``) where installed, else
from torch's CUDA allocator; the module imports neither at import time.
"""
from __future__ import annotations

import importlib.util

import numpy as np

from devices.errors import DeviceError
from devices.runner import Runner, register_runner


def _cuda_here() -> str | None:
    if importlib.util.find_spec("torch") is not None:
        import torch  # only to ask for a GPU; torch is optional on a device

        return None if torch.cuda.is_available() else "no CUDA GPU here"
    if importlib.util.find_spec("cuda") is None:
        return "neither cuda-python nor torch is installed to allocate GPU buffers (pip install cuda-python)"
    return None


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
        import tensorrt as trt  # the runtime, imported on use (GPU hosts only)
        import torch  # buffers and stream (cuda-python path: see module docstring; torch is the one written here)

        self._trt, self._torch = trt, torch
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
        self._stream = torch.cuda.Stream()
        prof = self.artifact.entry.get("profile") or {}
        self._max = int(prof.get("max", [self.batch_size])[0]) if prof else self.batch_size
        self.batch_size = min(self.batch_size, self._max)

    @property
    def runtime(self) -> str:
        trt = getattr(self, "_trt", None)
        torch = getattr(self, "_torch", None)
        gpu = torch.cuda.get_device_name(0) if torch is not None else "?"
        return f"tensorrt {trt.__version__ if trt else '?'} on {gpu}"

    def versions(self) -> dict[str, str]:
        trt = getattr(self, "_trt", None)
        return {"tensorrt": trt.__version__ if trt else "?"}

    def close(self) -> None:
        self._ctx = self._engine = None

    def _run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.cuda.stream(self._stream):
            x = torch.from_numpy(batch).cuda(non_blocking=False)
            if not self._ctx.set_input_shape(self._in, tuple(x.shape)):
                raise DeviceError(f"the engine refuses batch {x.shape[0]}: outside its optimisation profile (max {self._max})")
            y = torch.empty(tuple(self._ctx.get_tensor_shape(self._out)), dtype=torch.float32, device="cuda")
            self._ctx.set_tensor_address(self._in, x.data_ptr())
            self._ctx.set_tensor_address(self._out, y.data_ptr())
            if not self._ctx.execute_async_v3(self._stream.cuda_stream):
                raise DeviceError("TensorRT execute_async_v3 failed")
            self._stream.synchronize()
            return y.cpu().numpy()

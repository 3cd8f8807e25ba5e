"""The TensorRT runner's plumbing (engine checks, device buffers, copies, stream) driven through
stand-ins for ``tensorrt`` and cuda-python's runtime: no GPU or TensorRT exists here, so this checks
what the runner asks of both libraries, not TensorRT itself (the runner is labelled unverified)."""
import ctypes
import enum
import hashlib
import json
import sys
import types

import numpy as np
import pytest

from devices import create_runner
from devices.errors import DeviceError

DIM, SHAPE = 4, (1, 2, 2)


class Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2


class Kind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class FakeCudart(types.ModuleType):
    """Device memory as host buffers: a device pointer is a ctypes buffer's address."""

    cudaError_t, cudaMemcpyKind = Err, Kind

    def __init__(self, devices: int = 1):
        super().__init__("cuda.bindings.runtime")
        self.devices, self.buffers, self.calls = devices, {}, []

    def cudaGetDeviceCount(self):
        return Err.cudaSuccess, self.devices

    def cudaGetDeviceProperties(self, i):
        return Err.cudaSuccess, types.SimpleNamespace(name=b"Stand-in GPU\0\0")

    def cudaStreamCreate(self):
        return Err.cudaSuccess, 7

    def cudaStreamDestroy(self, s):
        self.calls.append(("destroy", s))
        return (Err.cudaSuccess,)

    def cudaMalloc(self, n):
        buf = ctypes.create_string_buffer(n)
        self.buffers[ctypes.addressof(buf)] = buf
        return Err.cudaSuccess, ctypes.addressof(buf)

    def cudaFree(self, ptr):
        self.buffers.pop(ptr)
        return (Err.cudaSuccess,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        device = dst if kind == Kind.cudaMemcpyHostToDevice else src
        assert device in self.buffers and n <= len(self.buffers[device]) and stream == 7
        ctypes.memmove(dst, src, n)
        self.calls.append((kind.name, n))
        return (Err.cudaSuccess,)

    def cudaStreamSynchronize(self, s):
        self.calls.append(("sync", s))
        return (Err.cudaSuccess,)


class FakeContext:
    """Embeds by averaging each image's pixels into DIM copies, reading and writing the set addresses."""

    def __init__(self, max_batch):
        self.max_batch, self.shape, self.addr = max_batch, None, {}

    def set_input_shape(self, name, shape):
        self.shape = shape
        return name == "input" and 1 <= shape[0] <= self.max_batch

    def get_tensor_shape(self, name):
        return (self.shape[0], DIM)

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr

    def execute_async_v3(self, stream):
        n = self.shape[0]
        x = np.frombuffer(ctypes.string_at(self.addr["input"], n * 4 * int(np.prod(SHAPE))), np.float32)
        y = np.repeat(x.reshape(n, -1).mean(1, keepdims=True), DIM, axis=1).astype(np.float32)
        ctypes.memmove(self.addr["embedding"], y.ctypes.data, y.nbytes)
        return stream == 7


def fake_tensorrt(max_batch: int, dtype: str = "float32") -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__, trt.float32 = "10.0-stand-in", "float32"

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return ("input", "embedding")[i]

        def get_tensor_dtype(self, name):
            return dtype

        def create_execution_context(self):
            return FakeContext(max_batch)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine() if data == b"plan" else None

    trt.Runtime, trt.Logger = Runtime, lambda level: None
    trt.Logger.WARNING = 2
    return trt


@pytest.fixture
def engine_dir(tmp_path):
    (tmp_path / "edge.plan").write_bytes(b"plan")
    entry = {"format": "tensorrt", "precision": "fp16", "file": "edge.plan",
             "sha256": hashlib.sha256(b"plan").hexdigest(), "input": {"name": "input", "shape": ["batch", *SHAPE]},
             "output": {"name": "embedding", "shape": ["batch", DIM]}, "profile": {"max": [3, *SHAPE]}}
    man = {"format": "hetero-manifest", "version": 1, "space": "s" * 64, "dim": DIM,
           "preprocess": {"size": 2, "channels": 1, "mean": [0.5], "std": [0.5]}, "artifacts": [entry]}
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    return tmp_path


def install(monkeypatch, trt, rt):
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", types.ModuleType("cuda.bindings"))
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", rt)


def test_the_runner_copies_in_runs_and_copies_out_on_its_stream_and_frees_its_buffers(monkeypatch, engine_dir):
    rt = FakeCudart()
    install(monkeypatch, fake_tensorrt(max_batch=3), rt)
    x = np.arange(7 * 4, dtype=np.float32).reshape(7, *SHAPE)
    with create_runner(engine_dir, "tensorrt") as r:
        assert r.batch_size == 3 and len(rt.buffers) == 2  # input and output, sized for the profile's max batch
        assert r.runtime == "tensorrt 10.0-stand-in on Stand-in GPU"
        emb = r.embed(x)  # 7 rows: batches of 3, 3 and 1
    assert np.allclose(emb, np.repeat(x.reshape(7, -1).mean(1, keepdims=True), DIM, axis=1))
    kinds = [c[0] for c in rt.calls]
    assert kinds.count("cudaMemcpyHostToDevice") == kinds.count("cudaMemcpyDeviceToHost") == kinds.count("sync") == 3
    assert rt.buffers == {} and kinds[-1] == "destroy"  # freed on close


def test_the_runner_refuses_what_it_cannot_run(monkeypatch, engine_dir):
    rt = FakeCudart(devices=0)
    install(monkeypatch, fake_tensorrt(max_batch=3), rt)
    from devices.tensorrt_runner import TensorRTRunner

    assert TensorRTRunner.unavailable() == "no CUDA GPU here"
    install(monkeypatch, fake_tensorrt(max_batch=3, dtype="half"), FakeCudart())
    with pytest.raises(DeviceError, match="not float32"):
        with create_runner(engine_dir, "tensorrt"):
            pass
    install(monkeypatch, fake_tensorrt(max_batch=3), FakeCudart())
    with create_runner(engine_dir, "tensorrt") as r:
        with pytest.raises(DeviceError, match="larger than this runner's buffers"):
            r.forward(np.zeros((4, *SHAPE), np.float32))
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)  # cuda-python absent
    monkeypatch.setitem(sys.modules, "cuda.cudart", None)
    assert "cuda-python is not installed" in TensorRTRunner.unavailable()

"""ONNX Runtime runner (CPU by default; any installed execution provider by name)."""
from __future__ import annotations

import numpy as np

from devices.errors import DeviceError
from devices.runner import Runner, register_runner


@register_runner("onnxruntime")
class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"
    artifact_format = "onnx"

    def __init__(self, artifact, batch_size: int = 256, providers: list[str] | None = None, threads: int | None = None):
        super().__init__(artifact, batch_size)
        self.providers = providers or ["CPUExecutionProvider"]
        self.threads = threads
        self._sess = None

    def open(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise DeviceError("onnxruntime is not installed; install it with: pip install 'hetero[onnx]'") from None
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            raise DeviceError(f"onnxruntime has no {', '.join(missing)} here (available: {', '.join(ort.get_available_providers())})")
        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        try:
            self._sess = ort.InferenceSession(str(self.artifact.path), opts, providers=self.providers)
        except Exception as e:  # ORT raises its own exception types for invalid models
            raise DeviceError(f"onnxruntime cannot load {self.artifact.path} ({str(e).splitlines()[0][:200]}); re-run `hetero export`") from None
        self._input = self._sess.get_inputs()[0].name
        self._output = self.artifact.entry["output"]["name"]
        self._version = ort.__version__

    @property
    def runtime(self) -> str:
        return f"onnxruntime {getattr(self, '_version', '?')} {self.providers[0]}"

    def close(self) -> None:
        self._sess = None

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self._sess is None:
            raise DeviceError("runner is not open; use it as a context manager: `with create_runner(...) as r:`")
        return self._sess.run([self._output], {self._input: batch})[0]

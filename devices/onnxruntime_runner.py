"""ONNX Runtime runner: ONNX (FP32, FP16, INT8) and ORT Mobile ``.ort`` artifacts; the CPU provider by
default, any installed execution provider (CUDA, TensorRT, CoreML, ...) by name."""
from __future__ import annotations

import numpy as np

from devices.errors import DeviceError
from devices.runner import Runner, module_missing, register_runner

OPT_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}


@register_runner("onnxruntime")
class OnnxRuntimeRunner(Runner):
    formats = ("onnx", "ort")
    extra = "onnx"

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        return ("threads", "providers", "optimization")

    @classmethod
    def unavailable(cls) -> str | None:
        return module_missing("onnxruntime", extra="onnx")

    def open(self) -> None:
        import onnxruntime as ort  # the runtime, imported on use: the core runs where only one runtime is installed

        providers = list(self.settings.get("providers") or ["CPUExecutionProvider"])
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise DeviceError(f"onnxruntime has no {', '.join(missing)} here (available: "
                              f"{', '.join(ort.get_available_providers())}); install the onnxruntime build that has it")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        threads = self.settings.get("threads")
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        level = self.settings.get("optimization", "all")
        if level not in OPT_LEVELS:
            raise DeviceError(f"unknown graph optimisation level {level!r}; choose one of: {', '.join(OPT_LEVELS)}")
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[level])
        try:
            self._sess = ort.InferenceSession(str(self.artifact.path), opts, providers=providers)
        except Exception as e:  # ORT raises its own exception types for invalid models
            raise DeviceError(f"onnxruntime cannot load {self.artifact.path} ({str(e).splitlines()[0][:200]}); "
                              "re-run `hetero export`") from None
        self._providers = providers
        self._input = self._sess.get_inputs()[0].name
        self._output = self.artifact.entry["output"]["name"]
        self._version = ort.__version__

    @property
    def runtime(self) -> str:
        return f"onnxruntime {getattr(self, '_version', '?')} {(getattr(self, '_providers', None) or ['CPUExecutionProvider'])[0]}"

    def versions(self) -> dict[str, str]:
        return {"onnxruntime": getattr(self, "_version", "?")}

    def close(self) -> None:
        self._sess = None

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if getattr(self, "_sess", None) is None:
            raise DeviceError("runner is not open; use it as a context manager: `with create_runner(...) as r:`")
        return self._sess.run([self._output], {self._input: batch})[0]

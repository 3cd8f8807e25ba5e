"""Run: artifact -> embeddings and latency on a runtime. The core imports only numpy and, lazily,
the runtime, so it can be copied to a device alone (see ``python -m devices``)."""
from devices import onnxruntime_runner as _ort  # noqa: F401  (registers the runners)
from devices import tensorrt_runner as _trt  # noqa: F401
from devices.artifact import Artifact, load_manifest, open_artifact
from devices.bench import bench
from devices.errors import DeviceError
from devices.runner import RUNNERS, Runner, create_runner, register_runner

try:  # the Core ML runners (real on macOS, the reference interpreter anywhere)
    from devices import coreml_runner as _coreml  # noqa: F401
except ImportError:  # pragma: no cover - while it is being written
    pass

__all__ = ["Artifact", "DeviceError", "RUNNERS", "Runner", "bench", "create_runner", "load_manifest", "open_artifact",
           "register_runner"]

"""Run: artifact -> embeddings on a runtime. The core imports only numpy and, lazily, the runtime."""
from devices import onnxruntime_runner as _ort  # noqa: F401  (registers the runner)
from devices.artifact import Artifact, load_manifest, open_artifact
from devices.errors import DeviceError
from devices.runner import RUNNERS, Runner, create_runner, register_runner

__all__ = ["Artifact", "DeviceError", "RUNNERS", "Runner", "create_runner", "load_manifest", "open_artifact", "register_runner"]

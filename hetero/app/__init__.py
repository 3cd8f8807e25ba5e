"""The application layer: the Python API (``hetero.train_edge``, ``hetero.export``, ...), the CLI, the
demo, evaluation, verification, architecture-search orchestration and latency measurement. It is the
only layer that wires learning (``hetero``), conversion (``export``) and running (``devices``)
together, and the one that registers the torch runner with ``devices``, so that the device core
stays torch-free."""
from hetero.app import torch_runner as _torch_runner  # noqa: F401  (registers the "torch" runner)

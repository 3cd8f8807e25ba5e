"""torch runner: the reference, for checkpoints (``hetero train-*`` output directories). It lives in
the application layer, which registers it with ``devices`` on import, so that the device core that
``pack-runner`` zips stays free of torch and hetero."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from devices.artifact import Artifact
from devices.errors import DeviceError
from devices.runner import Runner, module_missing, register_runner
from devices.schema import CHECKPOINT_FILE, MANIFEST_FILE
from hetero.checkpoint import load_checkpoint


@register_runner("torch")
class TorchRunner(Runner):
    formats = ("checkpoint",)
    extra = "torch"

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        return ("threads", "device")

    @classmethod
    def unavailable(cls) -> str | None:
        return module_missing("torch", extra="torch") and "torch is not installed (pip install torch)"

    @classmethod
    def unavailable_with(cls, settings: dict[str, Any]) -> str | None:
        if str(settings.get("device", "cpu")).startswith("cuda") and not torch.cuda.is_available():
            return "no CUDA GPU here"
        return cls.unavailable()

    @staticmethod
    def open_path(path: str | Path) -> Artifact:
        """The checkpoint directory as an artifact: shapes from its ``hetero.json`` (plain JSON)."""
        d = Path(path)
        if (d / MANIFEST_FILE).is_file() and not (d / CHECKPOINT_FILE).is_file():
            raise DeviceError(f"{d} is an export directory; the torch runner takes a checkpoint directory "
                              "(use --runtime onnxruntime for an export)")
        try:
            meta = json.loads((d / CHECKPOINT_FILE).read_text(encoding="utf-8"))
            pre, dim = meta["preprocess"], int(meta["model"]["dim"])
            shape = [int(pre["channels"]), int(pre["size"]), int(pre["size"])]
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            raise DeviceError(f"{d} is not a hetero checkpoint (no readable {CHECKPOINT_FILE}); pass a directory "
                              "written by hetero train-cloud / train-edge") from None
        entry = {"format": "checkpoint", "precision": "fp32", "file": d.name, "sha256": meta.get("weights_sha256"),
                 "input": {"name": "input", "shape": ["batch", *shape]}, "output": {"name": "embedding", "shape": ["batch", dim]}}
        return Artifact(d, entry, {"space": meta.get("space"), "dim": dim, "preprocess": pre, "_dir": str(d.parent)})

    def open(self) -> None:
        device = self.settings.get("device", "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise DeviceError("torch has no CUDA device here; use device=cpu")
        self._torch = torch
        self._old_threads = torch.get_num_threads()
        if self.settings.get("threads"):
            torch.set_num_threads(int(self.settings["threads"]))
        self._model = load_checkpoint(self.artifact.path).model.eval().to(device)
        self._device = device

    def close(self) -> None:
        if getattr(self, "_torch", None) is not None:
            self._torch.set_num_threads(self._old_threads)
        self._model = None

    @property
    def runtime(self) -> str:
        torch = getattr(self, "_torch", None)
        dev = getattr(self, "_device", self.settings.get("device", "cpu"))
        if torch is not None and dev.startswith("cuda"):
            dev = f"{dev} ({torch.cuda.get_device_name(0)})"
        return f"torch {torch.__version__ if torch else '?'} {dev}"

    def versions(self) -> dict[str, Any]:
        torch = getattr(self, "_torch", None)
        return {"torch": torch.__version__ if torch else "?"}

    def _run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self._model(torch.from_numpy(batch).to(self._device))
            if self._device != "cpu":
                torch.cuda.synchronize()
            return out.cpu().numpy()

"""Device profiles: named targets, each an export format (and precision), a runner and its settings.

``hetero devices`` lists them and says which can run on this host and why not. A profile that runs
here on a stand-in (the Core ML interpreter for an iPhone, the host's onnxruntime for an Android
phone's) says so: its results are labelled by the runner (emulated) or carry the host they ran on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from devices.errors import DeviceError
from devices.runner import RUNNERS


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    fmt: str  # manifest artifact format
    precision: str | None
    runtime: str  # registered runner
    settings: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # the hardware it stands for
    fallback: str | None = None  # a runner that stands in where ``runtime`` cannot run (emulated)


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("host-cpu", "ONNX FP32 on onnxruntime's CPU provider, every core of this host", "onnx", "fp32",
            "onnxruntime", {}, "this host"),
    Profile("host-cpu-1thread", "ONNX FP32 on onnxruntime's CPU provider, one thread (the latency-table default)",
            "onnx", "fp32", "onnxruntime", {"threads": 1}, "this host, one core"),
    Profile("host-cpu-int8", "ONNX INT8 (QDQ) on onnxruntime's CPU provider, one thread", "onnx", "int8",
            "onnxruntime", {"threads": 1}, "this host, one core"),
    Profile("host-torch", "the torch checkpoint (the reference) on this host's CPU", "checkpoint", "fp32", "torch",
            {}, "this host"),
    Profile("host-torch-cuda", "the torch checkpoint on this host's CUDA GPU", "checkpoint", "fp32", "torch",
            {"device": "cuda"}, "this host's GPU"),
    Profile("android-ort", "ORT Mobile .ort on onnxruntime's CPU provider, 4 threads (a phone's big cores)", "ort",
            "fp32", "onnxruntime", {"threads": 4}, "an Android phone (here: this host's onnxruntime)"),
    Profile("iphone-coreml", "Core ML FP16 ML Program on all compute units (Neural Engine where it can)", "coreml",
            "fp16", "coreml", {"compute_units": "ALL"}, "an iPhone or a Mac", fallback="coreml-interp"),
    Profile("jetson-trt", "TensorRT FP16 engine on a Jetson's GPU", "tensorrt", "fp16", "tensorrt", {},
            "an NVIDIA Jetson"),
    Profile("nvidia-trt", "TensorRT FP16 engine on an NVIDIA data-centre GPU", "tensorrt", "fp16", "tensorrt", {},
            "an NVIDIA GPU server"),
)}


def profile(name: str) -> Profile:
    if name not in PROFILES:
        raise DeviceError(f"unknown device profile {name!r}; choose one of: {', '.join(PROFILES)} (hetero devices lists them)")
    return PROFILES[name]


def runner_for(p: Profile) -> tuple[str | None, str | None]:
    """(runtime to use here, why not) for a profile: its own runner, else its stand-in, else None."""
    for rt in (p.runtime, p.fallback):
        if rt is None:
            continue
        cls = RUNNERS.get(rt)
        if cls is None:
            continue
        why = cls.unavailable_with(p.settings)
        if why is None:
            return rt, None
    cls = RUNNERS.get(p.runtime)
    why = cls.unavailable_with(p.settings) if cls is not None else f"the {p.runtime} runner is not part of this installation"
    return None, why


def describe() -> list[dict[str, Any]]:
    """Every profile with whether it runs here, on which runner, and why not."""
    rows = []
    for p in PROFILES.values():
        rt, why = runner_for(p)
        status = "no" if rt is None else ("yes" if rt == p.runtime else f"emulated ({rt})")
        rows.append({"profile": p.name, "format": p.fmt, "precision": p.precision, "runtime": p.runtime,
                     "settings": p.settings, "stands_for": p.where, "runs_here": status, "runner_here": rt,
                     "why_not": why, "description": p.description})
    return rows

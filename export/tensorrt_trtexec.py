"""The TensorRT build on the target: the optimisation profile of the batch axis and the ``trtexec``
line that builds the engine there (what a host without TensorRT or a GPU records instead of a plan)."""
from __future__ import annotations

import shlex

from hetero.errors import HeteroError


def profile_shapes(batch_sizes: tuple[int, ...] | list[int], chw: tuple[int, ...]) -> dict[str, list[int]]:
    """The optimisation profile of the batch axis: min, opt (the middle of the sizes), max."""
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise HeteroError(f"TensorRT batch sizes must be positive integers, got {list(batch_sizes)}")
    return {"min": [sizes[0], *chw], "opt": [sizes[len(sizes) // 2], *chw], "max": [sizes[-1], *chw]}


def trtexec_command(onnx_file: str, *, input_name: str, profile: dict[str, list[int]], plan_file: str,
                    timing_cache_file: str, strongly_typed: bool = True, fp16: bool = False) -> str:
    """The ``trtexec`` line that builds ``plan_file`` from ``onnx_file`` with ``profile`` on the target.

    ``strongly_typed``: TensorRT 10's ``--stronglyTyped`` (11 always builds strongly typed and keeps
    the flag as a no-op): precisions come from the ONNX (an FP16 ONNX stays FP16). ``fp16``: TensorRT
    10's ``--fp16`` (weak typing; removed in 11) for an FP32 ONNX.
    """
    if strongly_typed and fp16:
        raise HeteroError("trtexec: --stronglyTyped and --fp16 exclude each other")

    def shape(key: str) -> str:
        return f"{input_name}:" + "x".join(str(int(d)) for d in profile[key])

    args = ["trtexec", f"--onnx={onnx_file}"]
    args += ["--stronglyTyped"] if strongly_typed else []
    args += ["--fp16"] if fp16 else []
    args += [f"--minShapes={shape('min')}", f"--optShapes={shape('opt')}", f"--maxShapes={shape('max')}",
             f"--saveEngine={plan_file}", f"--timingCacheFile={timing_cache_file}"]
    return " ".join(shlex.quote(a) for a in args)


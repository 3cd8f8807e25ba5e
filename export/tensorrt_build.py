"""The TensorRT engine build on this host (a GPU host with ``tensorrt``): parse the ONNX, set the
batch profile and precision, and write the serialised plan and the timing cache.

Written against the TensorRT 10/11 documented Python API (Builder, OnnxParser, BuilderConfig,
optimisation profiles, timing cache). UNVERIFIED on CPU-only machines: it only runs where tensorrt
imports and a CUDA GPU is present (the tests drive it with a stand-in ``trt`` module).

TensorRT 10 vs 11: TensorRT 11 removed the precision builder flags (``BuilderFlag.FP16`` ...):
every network is strongly typed, so the FP16 ONNX (FP16 weights and activations, normalisation in
FP32) is built as it is. TensorRT 10 builds the FP32 ONNX with ``BuilderFlag.FP16`` (weak typing:
TensorRT picks FP16 kernels where it likes; keeping the normalisation in FP32 is not controlled).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from export.formats import INPUT_NAME
from hetero.errors import HeteroError


def _trt_major(trt) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        raise HeteroError(f"cannot read the TensorRT version {trt.__version__!r}; report it") from None


def _parser_errors(parser) -> str:
    """The parser's errors, one line: node name and op where the parser reports them."""
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node = op = None
        try:  # node_name()/node_operator() exist since TensorRT 10
            node, op = e.node_name(), e.node_operator()
        except AttributeError:
            pass
        where = f"op '{op}' (node {node}): " if node or op else (f"node #{e.node()}: " if e.node() >= 0 else "")
        out.append(where + " ".join(str(e.desc()).split())[:200])
    return "; ".join(out) or "no error reported"


def build_engine(trt, fp16_onnx: Path, fp32_onnx: Path, plan_path: Path, cache_path: Path,
                 profile: dict[str, list[int]]) -> dict[str, Any]:
    """Build and write the serialised engine and the timing cache. TensorRT >= 11: strongly typed
    network from the FP16 ONNX, no precision flags (they were removed). TensorRT 10: the FP32 ONNX
    with ``BuilderFlag.FP16``. Returns how it was built. UNVERIFIED on CPU-only machines."""
    major = _trt_major(trt)
    if major < 10:
        raise HeteroError(f"TensorRT {trt.__version__} is older than 10; install tensorrt>=10 (pip install 'hetero[tensorrt]')")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if major >= 11:
        src, how = fp16_onnx, "strongly typed network from the FP16 ONNX (TensorRT 11: no precision flags)"
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # deprecated and ignored in 11
        network = builder.create_network(1 << int(flag) if flag is not None else 0)
    else:
        src = fp32_onnx
        how = ("FP32 ONNX with BuilderFlag.FP16 (TensorRT 10 weak typing: TensorRT chooses FP16 kernels per layer; "
               "keeping the normalisation in FP32 is not controlled)")
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src)):
        raise HeteroError(f"TensorRT {trt.__version__}'s ONNX parser rejected {src.name}: {_parser_errors(parser)}")
    config = builder.create_builder_config()
    if major == 10:
        config.set_flag(trt.BuilderFlag.FP16)
    prof = builder.create_optimization_profile()
    prof.set_shape(INPUT_NAME, tuple(profile["min"]), tuple(profile["opt"]), tuple(profile["max"]))
    config.add_optimization_profile(prof)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise HeteroError(f"TensorRT {trt.__version__} could not build an engine from {src.name} "
                          "(build_serialized_network returned None; rerun with a verbose trtexec to see why)")
    plan_path.write_bytes(bytes(memoryview(plan)))
    cache_path.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    return {"built_from": src.name, "network": how, "strongly_typed": major >= 11}


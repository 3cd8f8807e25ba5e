"""Latency look-up table for the architecture search: an architecture space over the registered
backbone families, the decomposition of a model into building blocks, a table of per-block timings
measured on a device profile's runner, and a predictor that sums the table plus a fixed per-model
overhead.

    arch = random_arch(random.Random(0), "mobilenet")       # {"family": "mobilenet", "width": .., "depth": ..}
    table = measure_lut(decompose(arch), "lut.json")          # measures (and saves) missing keys only
    calibrate_overhead(table, calibration_archs, path="lut.json")
    ms = predict_latency(arch, table)                         # sum of the block entries + overhead

Layering: the architecture space, the decomposition and the predictor are learn-layer code (torch
and ``hetero.models``; the predictor reads a plain dict). Measuring is command-layer code: it
imports ``export`` (ONNX FP32) and ``devices`` (profiles, runners, the latency harness) lazily,
inside the functions that measure.

A block key is the canonical JSON of the block's type and config, its input shape (C, H, W), the
batch size and the device profile name. A block is timed in context (``context_models``): behind a
1x1 convolution and ahead of a 1x1 convolution to one channel, less that context alone, so that its
entry is its in-graph cost (layout as inside a model, no session call, no output hand-over); the
contexts telescope over a chain of blocks. The session call and what does not add up are the
per-model ``overhead_ms``, the median of (measured whole model - sum of its blocks) over
calibration models kept apart from any evaluation. The table's statistic is the 10%-trimmed mean
of the calls (``trimmed_mean_ms``): means add over blocks, medians do not, and the trimming drops
the scheduler's outliers; entries also hold the median, the mean and the minimum.

Limits seen on the 2-core host (``benchmarks/results/latency_lut.md``): blocks are timed with their
weights warm in cache, so models whose weights outgrow the core's L2 run a few percent slower than
predicted; onnxruntime's layout choices (NCHWc for channel counts that are multiples of 16) depend on
neighbouring layers, which one context cannot reproduce for every block.
"""
from __future__ import annotations

import copy
import datetime as _dt
import json
import random
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hetero.errors import HeteroError

SCHEMA = "hetero-latency-lut/1"
DEFAULT_PROFILE = "host-cpu-1thread"
DEFAULT_INPUT = (1, 28, 28)
DEFAULT_DIM = 128
STATS = ("trimmed_mean_ms", "p50_ms", "mean_ms", "min_ms")
DEFAULT_STAT = "trimmed_mean_ms"

# --------------------------------------------------------------------------------------------------
# Architecture space over the registered backbone families
# --------------------------------------------------------------------------------------------------

# family -> {parameter: choices}. Each choice set is the grid random_arch samples from; any value the
# backbone constructor accepts builds (and decomposes), the grid only bounds the random sampling.
SPACE: dict[str, dict[str, tuple]] = {
    "mobilenet": {"width": (0.25, 0.375, 0.5, 0.625, 0.75, 1.0), "depth": (0.5, 1.0, 1.5, 2.0)},
    "resnet": {"depth": (8, 14, 20, 26, 32), "width": (8, 12, 16, 20, 24)},
}
FAMILIES = tuple(SPACE)


def check_arch(arch: dict[str, Any]) -> dict[str, Any]:
    """The architecture as a canonical dict (family first, numbers typed), or a one-line error."""
    if not isinstance(arch, dict) or arch.get("family") not in SPACE:
        raise HeteroError(f"an architecture is a dict with 'family' one of {', '.join(FAMILIES)}, got {arch!r}")
    fam = arch["family"]
    want = set(SPACE[fam])
    have = set(arch) - {"family"}
    if have != want:
        raise HeteroError(f"a {fam} architecture takes exactly {', '.join(sorted(want))}; got {', '.join(sorted(have)) or 'none'}")
    if fam == "mobilenet":
        return {"family": fam, "width": float(arch["width"]), "depth": float(arch["depth"])}
    return {"family": fam, "depth": int(arch["depth"]), "width": int(arch["width"])}


def arch_name(arch: dict[str, Any]) -> str:
    a = check_arch(arch)
    if a["family"] == "mobilenet":
        return f"mobilenet-w{a['width']:g}-d{a['depth']:g}"
    return f"resnet{a['depth']}-w{a['width']}"


def arch_spec(arch: dict[str, Any], dim: int = DEFAULT_DIM):
    """The ``ModelSpec`` of an architecture: the registered backbone and its kwargs (train it as is)."""
    from hetero.models.embedding import ModelSpec

    a = check_arch(arch)
    return ModelSpec(backbone=a["family"], dim=dim, backbone_kwargs={k: v for k, v in a.items() if k != "family"})


def build_model(arch: dict[str, Any], dim: int = DEFAULT_DIM, in_channels: int = 1) -> nn.Module:
    """The embedding model (backbone -> projection -> L2 norm) of an architecture, in eval mode."""
    from hetero.models.embedding import create_embedding_model

    return create_embedding_model(arch_spec(arch, dim), in_channels).eval()


def random_arch(rng: random.Random | int, family: str | None = None) -> dict[str, Any]:
    """A uniformly sampled architecture of ``family`` (or of a random family) from the ``SPACE`` grid."""
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    if family is None:
        family = rng.choice(FAMILIES)
    if family not in SPACE:
        raise HeteroError(f"unknown architecture family {family!r}; choose one of: {', '.join(FAMILIES)}")
    return check_arch({"family": family, **{k: rng.choice(v) for k, v in SPACE[family].items()}})


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


class Head(nn.Module):
    """The embedding head as one block: global average pool -> flatten -> projection -> L2 norm.
    Without a projection (a bare backbone) it is the pool and the flatten only."""

    def __init__(self, pool: nn.Module, proj: nn.Module | None = None, normalize: bool = True):
        super().__init__()
        self.pool = pool
        self.proj = proj
        self.normalize = normalize and proj is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(x), 1)
        if self.proj is not None:
            x = self.proj(x)
        return F.normalize(x, dim=1) if self.normalize else x


@dataclass(frozen=True)
class Block:
    """One building block: its type and config (JSON values), its input shape (C, H, W), and the
    torch module that computes it (not part of the identity)."""

    type: str
    config: dict[str, Any]
    input_shape: tuple[int, ...]
    module: nn.Module | None = field(default=None, compare=False, repr=False)

    def key(self, profile: str = DEFAULT_PROFILE, batch: int = 1) -> str:
        return block_key(self.type, self.config, self.input_shape, batch, profile)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "config": dict(self.config), "input": list(self.input_shape)}


def block_key(type_: str, config: dict[str, Any], input_shape: Sequence[int], batch: int, profile: str) -> str:
    """Canonical JSON (sorted keys, no spaces) of the block config, input shape, batch and profile."""
    return json.dumps({"type": type_, "config": config, "input": [int(d) for d in input_shape], "batch": int(batch),
                       "profile": str(profile)}, sort_keys=True, separators=(",", ":"))


def _conv_cfg(c: nn.Conv2d) -> dict[str, Any]:
    return {"cin": c.in_channels, "cout": c.out_channels, "kernel": list(c.kernel_size), "stride": list(c.stride),
            "padding": list(c.padding), "groups": c.groups, "bias": c.bias is not None}


_STEM_PARTS = {nn.BatchNorm2d: "bn", nn.ReLU: "relu"}


def _describe_stem(m: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """A Sequential of a Conv2d then BatchNorm2d / ReLU layers (the stems): ``conv_bn_relu``."""
    layers = list(m.children()) if isinstance(m, nn.Sequential) else []
    if not layers or not isinstance(layers[0], nn.Conv2d) or any(type(x) not in _STEM_PARTS for x in layers[1:]):
        return None
    return "_".join(["conv", *(_STEM_PARTS[type(x)] for x in layers[1:])]), _conv_cfg(layers[0])


def _describe_dws(m: nn.Module) -> tuple[str, dict[str, Any]]:
    dw, pw = m.dw[0], m.pw[0]
    return "dw_separable", {"cin": dw.in_channels, "cout": pw.out_channels, "kernel": list(dw.kernel_size),
                            "stride": list(dw.stride)}


def _describe_basic(m: nn.Module) -> tuple[str, dict[str, Any]]:
    shortcut = "identity" if isinstance(m.shortcut, nn.Identity) else "conv"
    return "basic_block", {"cin": m.conv1.in_channels, "cout": m.conv1.out_channels,
                           "kernel": list(m.conv1.kernel_size), "stride": list(m.conv1.stride), "shortcut": shortcut}


def _describe_inverted_residual(m: nn.Module) -> tuple[str, dict[str, Any]]:
    """A ``nas_mbv3`` block (1x1 expand, depthwise kxk, optional squeeze-excite, 1x1 project)."""
    dw = m.dw[0]
    se = not isinstance(m.se, nn.Identity)
    return "inverted_residual", {"cin": m.expand[0].in_channels, "mid": dw.in_channels, "cout": m.project[0].out_channels,
                                 "kernel": list(dw.kernel_size), "stride": list(dw.stride), "se": se,
                                 "hidden": m.se.fc1.out_channels if se else 0, "residual": bool(m.residual)}


def _describe_head(m: Head) -> tuple[str, dict[str, Any]]:
    pool = type(m.pool).__name__
    if m.proj is None:
        return "head", {"pool": pool, "dim": None, "normalize": False}
    return "head", {"pool": pool, "dim": m.proj.out_features, "bias": m.proj.bias is not None, "normalize": m.normalize}


# module class -> describer returning (type, config). A new block family (e.g. a supernet's) registers here.
DESCRIBERS: dict[type, Callable[[nn.Module], tuple[str, dict[str, Any]] | None]] = {}


def register_block(cls: type, describe: Callable[[nn.Module], tuple[str, dict[str, Any]] | None]) -> None:
    DESCRIBERS[cls] = describe


def _register_defaults() -> None:
    from hetero.models.mobilenet import DepthwiseSeparable
    from hetero.models.resnet import BasicBlock
    from hetero.nas.static import InvertedResidual

    register_block(nn.Sequential, _describe_stem)
    register_block(DepthwiseSeparable, _describe_dws)
    register_block(BasicBlock, _describe_basic)
    register_block(InvertedResidual, _describe_inverted_residual)
    register_block(Head, _describe_head)


_register_defaults()


def describe_block(m: nn.Module) -> tuple[str, dict[str, Any]]:
    for cls in type(m).__mro__:
        fn = DESCRIBERS.get(cls)
        if fn is not None:
            got = fn(m)
            if got is not None:
                return got
    raise HeteroError(f"no latency-table block type for {type(m).__name__}; register one with "
                      "hetero.latency_lut.register_block(cls, describe)")


def top_level_layers(model: nn.Module) -> list[nn.Module]:
    """The model's top-level layers in execution order: stem, each block, the head (pool [+ projection
    + L2 norm]). Works for the staged backbones (``stem``, ``blocks``, ``pool``) and an
    ``EmbeddingModel`` around one."""
    backbone, proj = model, None
    if hasattr(model, "backbone") and hasattr(model, "proj"):
        backbone, proj = model.backbone, model.proj
    if not all(hasattr(backbone, a) for a in ("stem", "blocks", "pool")):
        raise HeteroError(f"cannot decompose {type(backbone).__name__} into blocks: the latency table knows backbones "
                          "with stem, blocks and pool layers (the registered mobilenet and resnet families)")
    return [backbone.stem, *backbone.blocks, Head(backbone.pool, proj, normalize=proj is not None)]


@torch.no_grad()
def decompose(model_or_arch: nn.Module | dict[str, Any], input_shape: Sequence[int] = DEFAULT_INPUT,
              dim: int = DEFAULT_DIM) -> list[Block]:
    """The model's blocks in execution order, each with the input shape it sees (found by one forward
    pass with hooks). An architecture dict is built first (``dim``, ``in_channels = input_shape[0]``)."""
    model = build_model(model_or_arch, dim, int(input_shape[0])) if isinstance(model_or_arch, dict) else model_or_arch
    layers = top_level_layers(model)
    shapes: dict[int, tuple[int, ...]] = {}

    def hook(i: int):
        def record(mod: nn.Module, args: tuple) -> None:
            shapes.setdefault(i, tuple(int(d) for d in args[0].shape[1:]))
        return record

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(layers[:-1])]
    handles.append(layers[-1].pool.register_forward_pre_hook(hook(len(layers) - 1)))
    was = model.training
    model.eval()  # no batch-norm statistics change
    device = next(model.parameters(), torch.zeros(())).device
    try:
        ref = model(torch.zeros((1, *input_shape), device=device))  # the model's own forward: what each layer sees
        for h in handles:
            h.remove()
        x = torch.zeros((1, *input_shape), device=device)
        for i, m in enumerate(layers):  # the blocks composed in sequence must give the model's output
            if i not in shapes or tuple(x.shape[1:]) != shapes[i]:
                raise HeteroError(f"{type(model).__name__} does not run its top-level layers in sequence (layer {i}); "
                                  "the latency table cannot decompose it")
            x = m(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if tuple(x.shape) != tuple(ref.shape):
        raise HeteroError(f"the blocks of {type(model).__name__} give {tuple(x.shape)}, the model {tuple(ref.shape)}; "
                          "the latency table cannot decompose it")
    blocks = []
    for i, m in enumerate(layers):
        t, cfg = describe_block(m)
        blocks.append(Block(t, cfg, shapes[i], m))
    return blocks


# --------------------------------------------------------------------------------------------------
# The table (pure: JSON in, numbers out)
# --------------------------------------------------------------------------------------------------


class MissingBlockError(HeteroError):
    """The table has no entry for a block the model needs."""


def new_table(profile: str = DEFAULT_PROFILE, batch: int = 1, stat: str = DEFAULT_STAT) -> dict[str, Any]:
    if stat not in STATS:
        raise HeteroError(f"unknown statistic {stat!r}; choose one of: {', '.join(STATS)}")
    return {"schema": SCHEMA, "profile": profile, "batch": int(batch), "stat": stat, "host": {}, "runtime": None,
            "settings": {}, "protocol": {}, "entries": {}, "overhead_ms": None, "overhead": {}}


def check_table(obj: Any, where: str = "latency table") -> dict[str, Any]:
    """A table read back from JSON, or a one-line error."""
    if not isinstance(obj, dict) or obj.get("schema") != SCHEMA or not isinstance(obj.get("entries"), dict):
        raise HeteroError(f"{where} is not a hetero latency table ({SCHEMA}); build one with measure_lut")
    if obj.get("stat", DEFAULT_STAT) not in STATS:
        raise HeteroError(f"{where} names an unknown statistic {obj.get('stat')!r}")
    return obj


def load_table(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HeteroError(f"{path} does not exist; build the table with measure_lut(..., path={str(path)!r})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise HeteroError(f"{path} is not valid JSON ({e.__class__.__name__}); delete it and measure again") from None
    return check_table(obj, str(path))


def save_table(table: dict[str, Any], path: str | Path) -> None:
    """Write atomically (a temp file renamed into place): a crash never leaves half a table."""
    from hetero._atomic import write_json_atomic

    write_json_atomic(path, check_table(table))


def missing_blocks(blocks: Iterable[Block], table: dict[str, Any], profile: str | None = None,
                   batch: int | None = None) -> list[Block]:
    """The distinct blocks (first occurrence order) that have no entry in the table."""
    profile = profile or table["profile"]
    batch = batch or table["batch"]
    seen: set[str] = set()
    out = []
    for b in blocks:
        k = b.key(profile, batch)
        if k not in seen and k not in table["entries"]:
            out.append(b)
        seen.add(k)
    return out


def predict_breakdown(blocks: Sequence[Block], table: dict[str, Any]) -> list[tuple[str, float]]:
    """(key, ms) of each block, in order; a missing block raises ``MissingBlockError`` naming it."""
    check_table(table)
    stat = table.get("stat", DEFAULT_STAT)
    out = []
    for i, b in enumerate(blocks):
        k = b.key(table["profile"], table["batch"])
        entry = table["entries"].get(k)
        if entry is None:
            cfg = json.dumps(b.config, sort_keys=True)
            raise MissingBlockError(f"the latency table has no entry for block {i} ({b.type} {cfg} "
                                    f"on input {list(b.input_shape)}, batch {table['batch']}, profile {table['profile']}); "
                                    f"key {k}; measure it with measure_lut or pass measure_missing=True")
        if stat not in entry:
            raise HeteroError(f"the latency table's entry for block {i} ({b.type}) has no {stat}; measure it again")
        out.append((k, float(entry[stat])))
    return out


def predict_latency(arch_or_model: nn.Module | dict[str, Any] | Sequence[Block], table: dict[str, Any] | str | Path, *,
                    input_shape: Sequence[int] = DEFAULT_INPUT, dim: int = DEFAULT_DIM, measure_missing: bool = False,
                    path: str | Path | None = None, **measure_kw: Any) -> float:
    """Predicted latency in ms of one forward pass on the table's profile and batch: the sum of the
    blocks' entries plus the table's per-model overhead. A block missing from the table raises
    ``MissingBlockError`` naming it, or, with ``measure_missing``, is measured into the table (and
    saved to ``path`` when given) first. ``table``: a table dict or its file."""
    if isinstance(table, (str, Path)):
        path = path or table
        table = load_table(table)
    check_table(table)
    blocks = list(arch_or_model) if isinstance(arch_or_model, (list, tuple)) else decompose(arch_or_model, input_shape, dim)
    if measure_missing and missing_blocks(blocks, table):
        measure_lut(blocks, table, profile=table["profile"], batch=table["batch"], path=path, **measure_kw)
    total = sum(ms for _, ms in predict_breakdown(blocks, table))
    if table.get("overhead_ms") is None:
        raise HeteroError("the latency table has no per-model overhead yet; run calibrate_overhead on it first")
    return total + float(table["overhead_ms"])


# --------------------------------------------------------------------------------------------------
# Measurement (command layer: export and devices are imported here, lazily)
# --------------------------------------------------------------------------------------------------


class _Conv1x1(nn.Module):
    """A 1x1 convolution (no bias), the lead-in and the tail of a timed block."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        nn.init.normal_(self.conv.weight, std=cin ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def context_models(block: Block) -> tuple[nn.Module, nn.Module]:
    """(timed, context) models of a block. A block is timed **in context**: behind a 1x1 convolution
    (so it takes its input in the layout a convolution inside a graph leaves it in, e.g. onnxruntime's
    NCHWc, not the model-input layout) and ahead of a 1x1 convolution to one channel (so its output is
    consumed by a convolution as inside a model, and the output handed back is tiny). The context
    model is the lead-in and the tail alone on the block's input shape; the block's entry is timed
    minus context. Over a chain of blocks the tails telescope (each block's output tail is the next
    block's input tail), so the sum of entries is the blocks' in-graph cost plus one constant tail
    and one session call, which the per-model overhead absorbs."""
    if block.module is None:
        raise HeteroError(f"block {block.type} has no torch module to measure; decompose the model again")
    if len(block.input_shape) != 3:
        raise HeteroError(f"the latency table times blocks on (C, H, W) inputs; {block.type} takes {list(block.input_shape)}")
    c = int(block.input_shape[0])
    module = copy.deepcopy(block.module).cpu().eval()
    with torch.no_grad():
        out = module(torch.zeros((1, *block.input_shape)))
    lead = _Conv1x1(c, c)
    context = nn.Sequential(lead, _Conv1x1(c, 1))
    if out.dim() == 4:
        timed = nn.Sequential(lead, module, _Conv1x1(int(out.shape[1]), 1))
    else:  # the head: its output is the embedding, nothing follows it
        timed = nn.Sequential(lead, module)
    return timed.eval(), context.eval()


def _summary(times_ns: list[int]) -> dict[str, float]:
    import numpy as np

    ms = np.sort(np.asarray(times_ns, dtype=np.float64) / 1e6)
    lo, hi = int(len(ms) * 0.1), max(int(len(ms) * 0.9), int(len(ms) * 0.1) + 1)
    return {"p50_ms": float(np.percentile(ms, 50)), "trimmed_mean_ms": float(ms[lo:hi].mean()),
            "mean_ms": float(ms.mean()), "min_ms": float(ms[0]), "iterations": int(len(ms))}


def _profile(name: str):
    from devices.profiles import profile as get_profile
    from devices.runner import runner_class

    p = get_profile(name)
    if p.fmt != "onnx" or (p.precision or "fp32") != "fp32":
        raise HeteroError(f"the latency table measures ONNX FP32 profiles (e.g. {DEFAULT_PROFILE}); {name} runs "
                          f"{p.fmt}/{p.precision}")
    cls = runner_class(p.runtime)
    why = cls.unavailable()
    if why:
        raise HeteroError(f"profile {name} cannot run here: {why}")
    return p, cls


def time_onnx_files(files: Sequence[tuple[str | Path, Sequence[int]]], *, profile: str = DEFAULT_PROFILE,
                    batch: int = 1, warmup: int = 10, iters: int | None = None, budget_s: float | None = 0.05,
                    rounds: int = 5, seed: int = 0) -> tuple[list[dict[str, Any]], str]:
    """Time ONNX files (input ``input``, output ``embedding``, dynamic batch; each with its input
    shape) on the profile's runner and settings with the latency harness, **interleaved**: every file
    gets a session, then ``rounds`` rounds each give every file ``warmup`` untimed calls and ``iters``
    timed calls (or ``budget_s`` seconds). Interleaving spreads the host's drift (clock, neighbours)
    evenly over the files, so differences between them are fair. Statistics pool every timed call.
    Returns (statistics per file, the runtime string)."""
    import contextlib

    import numpy as np

    from devices.artifact import Artifact
    from devices.bench import time_calls

    p, cls = _profile(profile)
    rng = np.random.default_rng(seed)
    times: list[list[int]] = [[] for _ in files]
    with contextlib.ExitStack() as stack:
        open_ = []
        for path, shape in files:
            shape = tuple(int(d) for d in shape)
            entry = {"format": "onnx", "precision": "fp32", "file": Path(path).name,
                     "input": {"name": "input", "shape": [batch, *shape], "dtype": "float32"},
                     "output": {"name": "embedding"}}
            r = stack.enter_context(cls(Artifact(Path(path), entry, {"dim": 0}), batch_size=batch, **p.settings))
            x = np.ascontiguousarray(rng.standard_normal((batch, *shape)).astype(np.float32))
            if not np.isfinite(r._run(x)).all():
                raise HeteroError(f"{path} gives non-finite outputs on {r.runtime}; report the block")
            open_.append((r, x))
        runtime = open_[0][0].runtime if open_ else ""
        for _ in range(rounds):
            for i, (r, x) in enumerate(open_):
                times[i] += time_calls(lambda: r._run(x), warmup=warmup, iters=iters, budget_s=budget_s)
    return [_summary(t) for t in times], runtime


def _export(module: nn.Module, input_shape: Sequence[int], path: Path) -> Path:
    from export.onnx import onnx_from_torch

    return onnx_from_torch(copy.deepcopy(module).cpu().eval(), tuple(int(d) for d in input_shape), path, simplify=True)


def _export_all(jobs: list[tuple[nn.Module, tuple[int, ...], Path]],
                progress: Callable[[str], None] | None = None) -> None:
    """Export every (module, input shape, path), one after the other (nothing is timed meanwhile)."""
    for i, (m, shape, path) in enumerate(jobs):
        if progress and (i + 1) % 10 == 0:
            progress(f"exported {i + 1}/{len(jobs)}")
        _export(m, shape, path)


def _host() -> dict[str, Any]:
    from devices.bench import host

    h = host()
    return {k: h[k] for k in ("cpu", "cores", "usable_cores", "machine", "os")}


def _adopt(table: dict[str, Any] | None, profile: str, batch: int) -> dict[str, Any]:
    table = new_table(profile, batch) if table is None else check_table(table)
    if table["profile"] != profile or int(table["batch"]) != int(batch):
        raise HeteroError(f"the latency table is for profile {table['profile']} batch {table['batch']}, not {profile} "
                          f"batch {batch}; use one table per profile and batch")
    host = _host()
    if table["host"] and table["host"].get("cpu") != host["cpu"]:
        raise HeteroError(f"the latency table was measured on {table['host'].get('cpu')!r}, this host is {host['cpu']!r}; "
                          "start a new table here")
    table["host"] = table["host"] or host
    return table


def measure(blocks: Iterable[Block] = (), models: Sequence[nn.Module | dict[str, Any]] = (),
            table: dict[str, Any] | str | Path | None = None, *, profile: str = DEFAULT_PROFILE, batch: int = 1,
            path: str | Path | None = None, input_shape: Sequence[int] = DEFAULT_INPUT, dim: int = DEFAULT_DIM,
            warmup: int = 10, iters: int | None = None, budget_s: float | None = 0.03, rounds: int = 10,
            chunk: int = 256, progress: Callable[[str], None] | None = None,
            workdir: str | Path | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Measure the blocks missing from ``table`` (a dict, updated in place; a path; or None for a new
    table) and the whole ``models`` (or architectures) in **one interleaved timing pass**, on a device
    profile. Returns (the table, the models' statistics in ms).

    Blocks already in the table are not measured again. Each distinct missing block is exported to
    ONNX FP32 (``onnx_from_torch``, simplified) in its timing context (``context_models``), each
    model as it is; then every file is timed with ``time_onnx_files``, interleaved, so that a host
    that drifts (a shared machine does, by several percent a minute) shifts the blocks and the models
    alike. A block's entry is timed minus context, per statistic. With ``path`` (or a table given as
    a path) the table is saved atomically after every ``chunk`` blocks (the models are timed with the
    last chunk)."""
    if isinstance(table, (str, Path)):
        path = path or table
        table = load_table(table) if Path(table).exists() else None
    p, _ = _profile(profile)
    table = _adopt(table, profile, batch)
    todo = missing_blocks(blocks, table, profile, batch)
    models = list(models)
    if not todo and not models:
        return table, []
    calls = f"{iters} calls" if iters else f"{budget_s} s of calls"
    protocol = {
        "export": "onnx_from_torch (torch dynamo exporter, FP32, onnxslim-simplified)",
        "timed": "1x1 conv -> block -> 1x1 conv to 1 channel, less 1x1 conv -> 1x1 conv to 1 channel on the block's "
                 "input shape (runner._run, perf_counter_ns)",
        "interleaving": f"{rounds} rounds over the models of up to {chunk} blocks (and any whole models measured "
                        f"with them); per model and round {warmup} warm-up calls, then {calls}",
        "inputs": "seeded standard normal (seed 0)",
        "statistics": "over the calls of all rounds; entry = timed - context, per statistic"}
    shape_in = tuple(int(d) for d in input_shape)
    model_stats: list[dict[str, Any]] = []
    parts = [todo[i:i + chunk] for i in range(0, len(todo), chunk)] or [[]]
    for n, part in enumerate(parts):
        last = n == len(parts) - 1
        with tempfile.TemporaryDirectory(prefix="hetero-lut-", dir=workdir) as tmp:
            jobs: list[tuple[nn.Module, tuple[int, ...], Path]] = []
            index: list[tuple[int, int]] = []
            ctx_of: dict[tuple[int, ...], int] = {}
            for i, b in enumerate(part):
                timed, context = context_models(b)
                shape = tuple(int(d) for d in b.input_shape)
                if shape not in ctx_of:  # one context model per input shape
                    ctx_of[shape] = len(jobs)
                    jobs.append((context, shape, Path(tmp) / f"context{i}.onnx"))
                index.append((len(jobs), ctx_of[shape]))
                jobs.append((timed, shape, Path(tmp) / f"block{i}.onnx"))
            first_model = len(jobs)
            if last:
                jobs += [(build_model(m, dim, shape_in[0]) if isinstance(m, dict) else m, shape_in,
                          Path(tmp) / f"model{i}.onnx") for i, m in enumerate(models)]
            _export_all(jobs, progress)
            if progress:
                progress(f"timing {len(jobs)} ONNX models x {rounds} rounds")
            stats, runtime = time_onnx_files([(path, shape) for _, shape, path in jobs], profile=profile, batch=batch,
                                             warmup=warmup, iters=iters, budget_s=budget_s, rounds=rounds)
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        for b, (ti, ci) in zip(part, index):
            t, c = stats[ti], stats[ci]
            table["entries"][b.key(profile, batch)] = {
                "block": b.to_dict(), **{s: t[s] - c[s] for s in STATS},
                "timed": {s: t[s] for s in (*STATS, "iterations")}, "context": {s: c[s] for s in (*STATS, "iterations")},
                "date": now}
        if part:
            table["runtime"], table["settings"], table["protocol"] = runtime, dict(p.settings), protocol
            if path is not None:
                save_table(table, path)
        if last:
            model_stats = [{**st, "runtime": runtime} for st in stats[first_model:]]
    return table, model_stats


def measure_lut(blocks: Iterable[Block], table: dict[str, Any] | str | Path | None = None, **kw: Any) -> dict[str, Any]:
    """Measure the blocks missing from ``table`` (see ``measure``) and return the table."""
    return measure(blocks, (), table, **kw)[0]


def measure_models(models: Sequence[nn.Module | dict[str, Any]], **kw: Any) -> list[dict[str, Any]]:
    """Whole models (or architectures) exported to ONNX FP32 and timed on the profile's runner,
    interleaved, with the blocks' protocol (see ``measure``): statistics in ms per model."""
    return measure((), models, None, **kw)[1]


def calibrate_overhead(table: dict[str, Any], models: Sequence[nn.Module | dict[str, Any]], *,
                       input_shape: Sequence[int] = DEFAULT_INPUT, dim: int = DEFAULT_DIM,
                       path: str | Path | None = None, measured: Sequence[dict[str, Any]] | None = None,
                       **measure_kw: Any) -> float:
    """The fixed per-model overhead: for each calibration model, its measured whole-model latency less
    the sum of its blocks' entries; the median over the models is stored as the table's
    ``overhead_ms`` (for the table's ``stat``; every statistic in ``overhead.by_stat``), with the
    per-model values. Missing blocks and the models are measured in one interleaved pass
    (``measure``) unless ``measured`` gives the models' statistics already. Keep these models out of
    any evaluation of the predictor."""
    check_table(table)
    if not models:
        raise HeteroError("calibrating the overhead needs at least one model")
    decomposed = [decompose(m, input_shape, dim) for m in models]
    blocks = [b for bl in decomposed for b in bl]
    kw = dict(profile=table["profile"], batch=table["batch"], path=path, input_shape=input_shape, dim=dim, **measure_kw)
    if measured is None:
        _, measured = measure(blocks, models, table, **kw)
    else:
        measure(blocks, (), table, **kw)
    if len(measured) != len(models):
        raise HeteroError(f"{len(measured)} measurements for {len(models)} calibration models")
    rows = []
    for m, bl, whole in zip(models, decomposed, measured):
        sums = {s: sum(float(table["entries"][b.key(table["profile"], table["batch"])][s]) for b in bl) for s in STATS}
        rows.append({"model": m if isinstance(m, dict) else type(m).__name__, "blocks": len(bl),
                     "measured": {s: whole[s] for s in STATS}, "sum_of_blocks": sums,
                     "overhead": {s: whole[s] - sums[s] for s in STATS}})
    by_stat = {s: statistics.median(r["overhead"][s] for r in rows) for s in STATS}
    table["overhead_ms"] = by_stat[table.get("stat", DEFAULT_STAT)]
    table["overhead"] = {"method": "median over the calibration models of measured whole model - sum of block entries",
                         "by_stat": by_stat, "calibration": rows}
    if path is not None:
        save_table(table, path)
    return table["overhead_ms"]


def use_stat(table: dict[str, Any], stat: str) -> dict[str, Any]:
    """A shallow copy of the table that predicts with another statistic (with that statistic's overhead)."""
    if stat not in STATS:
        raise HeteroError(f"unknown statistic {stat!r}; choose one of: {', '.join(STATS)}")
    by = (table.get("overhead") or {}).get("by_stat") or {}
    if stat not in by:
        raise HeteroError(f"the latency table has no overhead calibrated for {stat}; run calibrate_overhead")
    return {**table, "stat": stat, "overhead_ms": by[stat]}

"""Latency predictor for the architecture search: a network as a sequence of blocks, and a look-up
table of per-block timings on one device profile. The prediction is the sum of the blocks' entries
plus a fixed per-model overhead. Table in, prediction out: nothing here exports or times anything;
:mod:`hetero.app.latency` measures the table.

    blocks = arch_blocks(arch, space, dim)              # a subnet of the search space, from its genes
    blocks = decompose(model)                           # any staged network (nas_mbv3, mobilenet, resnet)
    ms = predict_latency(blocks, load_table("lut.json"))

A block is described by a :class:`BlockSpec`: its type, its configuration (JSON values) and its input
shape (C, H, W). An inverted residual's configuration is read from the search space's resolved
:class:`hetero.nas.space.Block`, so a subnet's blocks come from its arch without building the network
and equal those ``decompose`` finds in the extracted network; the hand-designed families' blocks
(depthwise-separable, basic residual, conv stems, the embedding head) are described from their
modules. A block key is the canonical JSON of the block's type, configuration and input shape, the
batch size and the device profile name.

The table's statistic is the 10%-trimmed mean of the timed calls (``trimmed_mean_ms``): means add
over blocks, medians do not, and the trimming drops the scheduler's outliers; entries also hold the
median, the mean and the minimum. The per-model ``overhead_ms`` (the session call and what does not
add up) is the median of (measured whole model - sum of its blocks) over calibration models kept
apart from any evaluation (:func:`fit_overhead`).
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from devices.schema import LATENCY_TABLE_SCHEMA
from hetero._atomic import write_json_atomic
from hetero.errors import HeteroError
from hetero.models.embedding import ModelSpec, create_embedding_model
from hetero.models.mobilenet import DepthwiseSeparable
from hetero.models.resnet import BasicBlock
from hetero.nas.space import STEM_KERNEL, Arch, Block, SearchSpace, conv_out, mid_channels, se_hidden
from hetero.nas.subnet import InvertedResidual, activation

SCHEMA = LATENCY_TABLE_SCHEMA
DEFAULT_PROFILE = "host-cpu-1thread"
DEFAULT_INPUT = (1, 28, 28)
STATS = ("trimmed_mean_ms", "p50_ms", "mean_ms", "min_ms")
DEFAULT_STAT = "trimmed_mean_ms"


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
class BlockSpec:
    """One block as the latency table keys it: its type and config (JSON values) and its input shape
    (C, H, W); ``module``, the torch module that computes it when one is at hand (``decompose``), is
    what the measuring side exports, and no part of the identity."""

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


def _conv(cin: int, cout: int, kernel: int, stride: int, padding: int) -> dict[str, Any]:
    """A convolution-batch norm-ReLU's config as ``_conv_cfg`` reads it from a plain (bias-free) ``Conv2d``."""
    return {"cin": cin, "cout": cout, "kernel": [kernel, kernel], "stride": [stride, stride],
            "padding": [padding, padding], "groups": 1, "bias": False}


def _conv_cfg(c: nn.Conv2d) -> dict[str, Any]:
    return {"cin": c.in_channels, "cout": c.out_channels, "kernel": list(c.kernel_size), "stride": list(c.stride),
            "padding": list(c.padding), "groups": c.groups, "bias": c.bias is not None}


def _inverted_residual(b: Block) -> dict[str, Any]:
    """An inverted residual's config: the space's resolved block (1x1 expand, depthwise kxk, optional
    squeeze-excite, 1x1 project). A MobileNetV3 activation or gate is named only where it is not the
    default ReLU / sigmoid, so the keys of the ReLU spaces' blocks stay as they were."""
    cfg = {"cin": b.cin, "mid": b.mid, "cout": b.cout, "kernel": [b.kernel, b.kernel], "stride": [b.stride, b.stride],
           "se": b.se, "hidden": b.hidden, "residual": b.residual}
    if b.act != "relu":
        cfg["act"] = b.act
    if b.se and b.gate != "sigmoid":
        cfg["gate"] = b.gate
    return cfg


def _head(pool: str, dim: int | None, bias: bool = True, normalize: bool = True) -> dict[str, Any]:
    if dim is None:
        return {"pool": pool, "dim": None, "normalize": False}
    return {"pool": pool, "dim": dim, "bias": bias, "normalize": normalize}


_STEM_PARTS = {nn.BatchNorm2d: "bn", nn.ReLU: "relu", nn.Hardswish: "hswish"}


def _describe_stem(m: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """A Sequential of a Conv2d then BatchNorm2d / ReLU / Hardswish layers (the stems): ``conv_bn_relu``
    (``conv_bn_hswish``)."""
    layers = list(m.children()) if isinstance(m, nn.Sequential) else []
    if not layers or not isinstance(layers[0], nn.Conv2d) or any(type(x) not in _STEM_PARTS for x in layers[1:]):
        return None
    return "_".join(["conv", *(_STEM_PARTS[type(x)] for x in layers[1:])]), _conv_cfg(layers[0])


def _describe_dws(m: DepthwiseSeparable) -> tuple[str, dict[str, Any]]:
    dw, pw = m.dw[0], m.pw[0]
    return "dw_separable", {"cin": dw.in_channels, "cout": pw.out_channels, "kernel": list(dw.kernel_size),
                            "stride": list(dw.stride)}


def _describe_basic(m: BasicBlock) -> tuple[str, dict[str, Any]]:
    shortcut = "identity" if isinstance(m.shortcut, nn.Identity) else "conv"
    return "basic_block", {"cin": m.conv1.in_channels, "cout": m.conv1.out_channels,
                           "kernel": list(m.conv1.kernel_size), "stride": list(m.conv1.stride), "shortcut": shortcut}


def _describe_inverted_residual(m: InvertedResidual) -> tuple[str, dict[str, Any]]:
    return "inverted_residual", _inverted_residual(m.block)


def _describe_head(m: Head) -> tuple[str, dict[str, Any]]:
    pool = type(m.pool).__name__
    if m.proj is None:
        return "head", _head(pool, None)
    return "head", _head(pool, m.proj.out_features, m.proj.bias is not None, m.normalize)


# module class -> describer returning (type, config). A new block family (e.g. a supernet's) registers here.
DESCRIBERS: dict[type, Callable[[nn.Module], tuple[str, dict[str, Any]] | None]] = {}


def register_block(cls: type, describe: Callable[[nn.Module], tuple[str, dict[str, Any]] | None]) -> None:
    DESCRIBERS[cls] = describe


register_block(nn.Sequential, _describe_stem)
register_block(DepthwiseSeparable, _describe_dws)
register_block(BasicBlock, _describe_basic)
register_block(InvertedResidual, _describe_inverted_residual)
register_block(Head, _describe_head)


def describe_block(m: nn.Module) -> tuple[str, dict[str, Any]]:
    for cls in type(m).__mro__:
        fn = DESCRIBERS.get(cls)
        if fn is not None:
            got = fn(m)
            if got is not None:
                return got
    raise HeteroError(f"no latency-table block type for {type(m).__name__}; register one with "
                      "hetero.nas.latency.register_block(cls, describe)")


def top_level_layers(model: nn.Module) -> list[nn.Module]:
    """The model's top-level layers in execution order: stem, each block, the head (pool [+ projection
    + L2 norm]). Works for the staged backbones (``stem``, ``blocks``, ``pool``) and an
    ``EmbeddingModel`` around one."""
    backbone, proj = model, None
    if hasattr(model, "backbone") and hasattr(model, "proj"):
        backbone, proj = model.backbone, model.proj
    if not all(hasattr(backbone, a) for a in ("stem", "blocks", "pool")):
        raise HeteroError(f"cannot decompose {type(backbone).__name__} into blocks: the latency table knows backbones "
                          "with stem, blocks and pool layers (the registered mobilenet, resnet and nas_mbv3 families)")
    return [backbone.stem, *backbone.blocks, Head(backbone.pool, proj, normalize=proj is not None)]


def as_model(model: nn.Module | ModelSpec, in_channels: int) -> nn.Module:
    """The model itself, or the embedding model a ``ModelSpec`` describes, built for ``in_channels`` in eval mode."""
    return create_embedding_model(model, in_channels).eval() if isinstance(model, ModelSpec) else model


@torch.no_grad()
def decompose(model: nn.Module | ModelSpec, input_shape: Sequence[int] = DEFAULT_INPUT) -> list[BlockSpec]:
    """The model's blocks in execution order, each with the input shape it sees (found by one forward
    pass with hooks) and its module. A ``ModelSpec`` is built first (``in_channels = input_shape[0]``)."""
    model = as_model(model, int(input_shape[0]))
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
        blocks.append(BlockSpec(t, cfg, shapes[i], m))
    return blocks


def arch_blocks(arch: Arch, space: SearchSpace, dim: int) -> list[BlockSpec]:
    """The blocks of ``arch``'s subnet with an embedding head of ``dim``, from its genes alone (no
    network built, no module attached): equal to ``decompose`` of the extracted subnet on its input
    (``arch_input_shape``: the arch's resolution gene, or the space's fixed input size). Blocks at
    different resolutions have different input shapes, so their own keys."""
    res = arch.input_size(space)
    size = conv_out(res, STEM_KERNEL, space.stem_stride)
    stem = space.stem_channels(arch.width)
    out = [BlockSpec(f"conv_bn_{space.stem_act}",
                     _conv(space.in_channels, stem, STEM_KERNEL, space.stem_stride, STEM_KERNEL // 2),
                     (space.in_channels, res, res))]
    channels = stem
    for b in arch.blocks(space):
        out.append(BlockSpec("inverted_residual", _inverted_residual(b), (b.cin, b.size_in, b.size_in)))
        channels, size = b.cout, b.size_out
    if space.head:
        out.append(BlockSpec(f"conv_bn_{space.head_act}", _conv(channels, space.head, 1, 1, 0), (channels, size, size)))
        channels = space.head
    out.append(BlockSpec("head", _head("AdaptiveAvgPool2d", dim), (channels, size, size)))
    return out


def space_blocks(space: SearchSpace, dim: int) -> list[BlockSpec]:
    """Every distinct block any subnet of ``space`` (with an embedding head of ``dim``) can have, at
    every resolution it can take, each with a module to time (fresh weights: timing does not read
    them). A block's input depends on the width, the resolution and its slot, not on the depths, so
    this is (widths x resolutions x slots x kernel/expand/SE choices) blocks, not every arch: a full
    table for a small space, in one pass."""
    out: dict[str, BlockSpec] = {}

    def add(type_: str, cfg: dict[str, Any], shape: tuple[int, ...], module: nn.Module) -> None:
        spec = BlockSpec(type_, cfg, shape, module)
        out.setdefault(spec.key(), spec)

    for width in space.widths:
        stem, chans = space.stem_channels(width), space.stage_channels(width)
        for res in space.resolution_choices:
            size = conv_out(res, STEM_KERNEL, space.stem_stride)
            pad = STEM_KERNEL // 2
            add(f"conv_bn_{space.stem_act}", _conv(space.in_channels, stem, STEM_KERNEL, space.stem_stride, pad),
                (space.in_channels, res, res),
                nn.Sequential(nn.Conv2d(space.in_channels, stem, STEM_KERNEL, space.stem_stride, pad, bias=False),
                              nn.BatchNorm2d(stem), activation(space.stem_act)))
            cin = stem
            for i, (_, depth, stride) in enumerate(space.stages):
                for j in range(depth):
                    st = stride if j == 0 else 1
                    size_out = conv_out(size, 3, st)  # odd kernels padded by k // 2: the same size for every k
                    for k in space.kernels:
                        for e in space.expands:
                            for se in space.choices("se", i):
                                mid = mid_channels(cin, e)
                                b = Block(i, j, cin, mid, chans[i], k, st, bool(se), se_hidden(mid) if se else 0, size,
                                          size_out, space.act(i), space.se_gate)
                                add("inverted_residual", _inverted_residual(b), (cin, size, size), InvertedResidual(b))
                    cin, size = chans[i], size_out
            if space.head:
                add(f"conv_bn_{space.head_act}", _conv(cin, space.head, 1, 1, 0), (cin, size, size),
                    nn.Sequential(nn.Conv2d(cin, space.head, 1, bias=False), nn.BatchNorm2d(space.head),
                                  activation(space.head_act)))
                cin = space.head
            add("head", _head("AdaptiveAvgPool2d", dim), (cin, size, size),
                Head(nn.AdaptiveAvgPool2d(1), nn.Linear(cin, dim)))
    return list(out.values())


def arch_input_shape(arch: Arch, space: SearchSpace) -> tuple[int, int, int]:
    """(C, H, W) of the subnet's input: the space's channels at the arch's resolution."""
    res = arch.input_size(space)
    return (space.in_channels, res, res)


def blocks_of(model: nn.Module | ModelSpec | Sequence[BlockSpec],
              input_shape: Sequence[int] = DEFAULT_INPUT) -> list[BlockSpec]:
    """Blocks given as they are, or ``decompose`` of a model or ``ModelSpec``."""
    return list(model) if isinstance(model, (list, tuple)) else decompose(model, input_shape)


# --------------------------------------------------------------------------------------------------
# The table (JSON in, numbers out)
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
    write_json_atomic(path, check_table(table))


def missing_blocks(blocks: Iterable[BlockSpec], table: dict[str, Any], profile: str | None = None,
                   batch: int | None = None) -> list[BlockSpec]:
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


def predict_breakdown(blocks: Sequence[BlockSpec], table: dict[str, Any]) -> list[tuple[str, float]]:
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
                                    f"key {k}; measure it with hetero.app.latency.measure_lut")
        if stat not in entry:
            raise HeteroError(f"the latency table's entry for block {i} ({b.type}) has no {stat}; measure it again")
        out.append((k, float(entry[stat])))
    return out


def predict_latency(model: nn.Module | ModelSpec | Sequence[BlockSpec], table: dict[str, Any] | str | Path, *,
                    input_shape: Sequence[int] = DEFAULT_INPUT) -> float:
    """Predicted latency in ms of one forward pass on the table's profile and batch: the sum of the
    blocks' entries plus the table's per-model overhead. ``model``: its blocks (``arch_blocks``,
    ``decompose``), or a model or ``ModelSpec`` to decompose on ``input_shape``; ``table``: a table
    dict or its file. A block missing from the table raises ``MissingBlockError`` naming it."""
    table = load_table(table) if isinstance(table, (str, Path)) else check_table(table)
    total = sum(ms for _, ms in predict_breakdown(blocks_of(model, input_shape), table))
    if table.get("overhead_ms") is None:
        raise HeteroError("the latency table has no per-model overhead yet; run calibrate_overhead on it first")
    return total + float(table["overhead_ms"])


def fit_overhead(table: dict[str, Any], blocks: Sequence[Sequence[BlockSpec]], measured: Sequence[dict[str, Any]],
                 labels: Sequence[Any]) -> float:
    """Set the table's per-model overhead from calibration models: for each (its blocks, its measured
    whole-model statistics, its label), measured less the sum of its blocks' entries; the median over
    the models is ``overhead_ms`` (for the table's ``stat``; every statistic in ``overhead.by_stat``),
    kept with the per-model values. Returns ``overhead_ms``."""
    check_table(table)
    if not blocks:
        raise HeteroError("calibrating the overhead needs at least one model")
    if len(measured) != len(blocks):
        raise HeteroError(f"{len(measured)} measurements for {len(blocks)} calibration models")
    rows = []
    for label, bl, whole in zip(labels, blocks, measured):
        sums = {s: sum(float(table["entries"][b.key(table["profile"], table["batch"])][s]) for b in bl) for s in STATS}
        rows.append({"model": label, "blocks": len(bl), "measured": {s: whole[s] for s in STATS}, "sum_of_blocks": sums,
                     "overhead": {s: whole[s] - sums[s] for s in STATS}})
    by_stat = {s: statistics.median(r["overhead"][s] for r in rows) for s in STATS}
    table["overhead_ms"] = by_stat[table.get("stat", DEFAULT_STAT)]
    table["overhead"] = {"method": "median over the calibration models of measured whole model - sum of block entries",
                         "by_stat": by_stat, "calibration": rows}
    return table["overhead_ms"]


def use_stat(table: dict[str, Any], stat: str) -> dict[str, Any]:
    """A shallow copy of the table that predicts with another statistic (with that statistic's overhead)."""
    if stat not in STATS:
        raise HeteroError(f"unknown statistic {stat!r}; choose one of: {', '.join(STATS)}")
    by = (table.get("overhead") or {}).get("by_stat") or {}
    if stat not in by:
        raise HeteroError(f"the latency table has no overhead calibrated for {stat}; run calibrate_overhead")
    return {**table, "stat": stat, "overhead_ms": by[stat]}

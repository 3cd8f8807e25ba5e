"""Measuring the latency look-up table that :mod:`hetero.nas.latency` predicts from: blocks and whole
models exported to ONNX FP32 (``onnx_from_torch``) and timed on a device profile's runner.

    table = measure_lut(decompose(model), "lut.json")        # measures (and saves) missing keys only
    calibrate_overhead(table, calibration_models, path="lut.json")
    ms = predict_latency(model, table)                        # hetero.nas.latency: the sum + overhead

A block is timed in context (``context_models``): behind a 1x1 convolution and ahead of a 1x1
convolution to one channel, less that context alone, so that its entry is its in-graph cost (layout
as inside a model, no session call, no output hand-over); the contexts telescope over a chain of
blocks. Each file is timed as ``devices.bench.bench`` times a runner (and ``hetero bench`` reports
it): the runner's forward pass on a pre-validated batch, without ``embed``'s checks of the batch and
the output, which cost tens of microseconds a call, as much as a small model's forward. On a torch
profile (``host-torch``: the torch runner, which runs the checkpoint's module) nothing is exported:
the same timed and context modules run in torch, as that runner runs them (eval mode, inference
mode, the profile's device and threads).

Limits seen on the 2-core host (``benchmarks/results/latency_lut.md``): blocks are timed with their
weights warm in cache, so models whose weights outgrow the core's L2 run a few percent slower than
predicted; onnxruntime's layout choices (NCHWc for channel counts that are multiples of 16) depend on
neighbouring layers, which one context cannot reproduce for every block.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from devices.artifact import Artifact
from devices.bench import host, time_calls
from devices.profiles import profile as get_profile
from devices.runner import Runner, runner_class
from export.onnx import onnx_from_torch
from hetero.errors import HeteroError
from hetero.models.embedding import ModelSpec
from hetero.nas.latency import (
    DEFAULT_INPUT,
    DEFAULT_PROFILE,
    STATS,
    BlockSpec,
    as_model,
    check_table,
    decompose,
    fit_overhead,
    load_table,
    missing_blocks,
    new_table,
    save_table,
)

Model = nn.Module | ModelSpec


class _Conv1x1(nn.Module):
    """A 1x1 convolution (no bias), the lead-in and the tail of a timed block."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        nn.init.normal_(self.conv.weight, std=cin ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def context_models(block: BlockSpec) -> tuple[nn.Module, nn.Module]:
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
    ms = np.sort(np.asarray(times_ns, dtype=np.float64) / 1e6)
    lo, hi = int(len(ms) * 0.1), max(int(len(ms) * 0.9), int(len(ms) * 0.1) + 1)
    return {"p50_ms": float(np.percentile(ms, 50)), "trimmed_mean_ms": float(ms[lo:hi].mean()),
            "mean_ms": float(ms.mean()), "min_ms": float(ms[0]), "iterations": int(len(ms))}


def _profile(name: str):
    p = get_profile(name)
    torch_profile = p.fmt == "checkpoint" and p.runtime == "torch"
    if (p.fmt != "onnx" and not torch_profile) or (p.precision or "fp32") != "fp32":
        raise HeteroError(f"the latency table measures ONNX FP32 profiles (e.g. {DEFAULT_PROFILE}) and the torch "
                          f"profiles (host-torch); {name} runs {p.fmt}/{p.precision}")
    if torch_profile:
        if str(p.settings.get("device", "cpu")).startswith("cuda") and not torch.cuda.is_available():
            raise HeteroError(f"profile {name} cannot run here: no CUDA GPU")
        return p, None
    cls = runner_class(p.runtime)
    why = cls.unavailable()
    if why:
        raise HeteroError(f"profile {name} cannot run here: {why}")
    return p, cls


def _forward(runner: Runner) -> Callable[[np.ndarray], np.ndarray]:
    """The runner's forward pass on a pre-validated batch: what ``devices.bench.bench`` times
    (``embed`` would add its checks to every call)."""
    return runner.forward


def time_onnx_files(files: Sequence[tuple[str | Path, Sequence[int]]], *, profile: str = DEFAULT_PROFILE,
                    batch: int = 1, warmup: int = 10, iters: int | None = None, budget_s: float | None = 0.05,
                    rounds: int = 5, seed: int = 0) -> tuple[list[dict[str, Any]], str]:
    """Time ONNX files (input ``input``, output ``embedding``, dynamic batch; each with its input
    shape) on the profile's runner and settings with the latency harness, **interleaved**: every file
    gets a session, then ``rounds`` rounds each give every file ``warmup`` untimed calls and ``iters``
    timed calls (or ``budget_s`` seconds) of its forward pass on a batch validated once
    (``check_batch``). Interleaving spreads the host's drift (clock, neighbours) evenly over the
    files, so differences between them are fair. Statistics pool every timed call. Returns
    (statistics per file, the runtime string)."""
    p, cls = _profile(profile)
    if cls is None:
        raise HeteroError(f"profile {profile} runs torch modules, not ONNX files; time them with time_torch_modules")
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
            x = r.check_batch(rng.standard_normal((batch, *shape)).astype(np.float32))
            if not np.isfinite(_forward(r)(x)).all():
                raise HeteroError(f"{path} gives non-finite outputs on {r.runtime}; report the block")
            open_.append((r, x))
        runtime = open_[0][0].runtime if open_ else ""
        for _ in range(rounds):
            for i, (r, x) in enumerate(open_):
                forward = _forward(r)
                times[i] += time_calls(lambda: forward(x), warmup=warmup, iters=iters, budget_s=budget_s)
    return [_summary(t) for t in times], runtime


def time_torch_modules(jobs: Sequence[tuple[nn.Module, Sequence[int]]], *, settings: dict[str, Any] | None = None,
                       batch: int = 1, warmup: int = 10, iters: int | None = None, budget_s: float | None = 0.05,
                       rounds: int = 5, seed: int = 0) -> tuple[list[dict[str, Any]], str]:
    """Time torch modules (each with its input shape) as the torch runner runs a checkpoint's model
    (eval, ``inference_mode``, the ``settings``' device and threads), interleaved over ``rounds`` like
    ``time_onnx_files``. Returns (statistics per module, the runtime string)."""
    settings = settings or {}
    device = str(settings.get("device", "cpu"))
    old = torch.get_num_threads()
    if settings.get("threads"):
        torch.set_num_threads(int(settings["threads"]))
    try:
        rng = np.random.default_rng(seed)
        open_ = []
        for m, shape in jobs:
            x = torch.from_numpy(rng.standard_normal((batch, *(int(d) for d in shape))).astype(np.float32)).to(device)
            open_.append((copy.deepcopy(m).to(device).eval(), x))
        times: list[list[int]] = [[] for _ in open_]
        with torch.inference_mode():
            for m, x in open_:
                if not torch.isfinite(m(x)).all():
                    raise HeteroError(f"{type(m).__name__} gives non-finite outputs in torch; report the block")
            for _ in range(rounds):
                for i, (m, x) in enumerate(open_):
                    def call(m=m, x=x):
                        m(x)
                        if device.startswith("cuda"):
                            torch.cuda.synchronize()
                    times[i] += time_calls(call, warmup=warmup, iters=iters, budget_s=budget_s)
    finally:
        torch.set_num_threads(old)
    return [_summary(t) for t in times], f"torch {torch.__version__} {device}"


def _export(module: nn.Module, input_shape: Sequence[int], path: Path) -> Path:
    return onnx_from_torch(copy.deepcopy(module).cpu().eval(), tuple(int(d) for d in input_shape), path, simplify=True)


def _export_all(jobs: list[tuple[nn.Module, tuple[int, ...], Path]],
                progress: Callable[[str], None] | None = None) -> None:
    """Export every (module, input shape, path), one after the other (nothing is timed meanwhile)."""
    for i, (m, shape, path) in enumerate(jobs):
        if progress and (i + 1) % 10 == 0:
            progress(f"exported {i + 1}/{len(jobs)}")
        _export(m, shape, path)


def _host() -> dict[str, Any]:
    h = host()
    return {k: h[k] for k in ("cpu", "cores", "usable_cores", "machine", "os")}


def _adopt(table: dict[str, Any] | None, profile: str, batch: int) -> dict[str, Any]:
    table = new_table(profile, batch) if table is None else check_table(table)
    if table["profile"] != profile or int(table["batch"]) != int(batch):
        raise HeteroError(f"the latency table is for profile {table['profile']} batch {table['batch']}, not {profile} "
                          f"batch {batch}; use one table per profile and batch")
    here = _host()
    if table["host"] and table["host"].get("cpu") != here["cpu"]:
        raise HeteroError(f"the latency table was measured on {table['host'].get('cpu')!r}, this host is {here['cpu']!r}; "
                          "start a new table here")
    table["host"] = table["host"] or here
    return table


def measure(blocks: Iterable[BlockSpec] = (), models: Sequence[Model] = (),
            table: dict[str, Any] | str | Path | None = None, *, profile: str = DEFAULT_PROFILE, batch: int = 1,
            path: str | Path | None = None, input_shape: Sequence[int] = DEFAULT_INPUT,
            warmup: int = 10, iters: int | None = None, budget_s: float | None = 0.03, rounds: int = 10,
            chunk: int = 256, progress: Callable[[str], None] | None = None,
            workdir: str | Path | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Measure the blocks missing from ``table`` (a dict, updated in place; a path; or None for a new
    table) and the whole ``models`` (or ``ModelSpec``s, built for ``input_shape``) in **one
    interleaved timing pass**, on a device profile. Returns (the table, the models' statistics in ms).

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
        "export": "none: torch modules timed as the torch runner runs them (eval, inference_mode)" if p.fmt == "checkpoint"
                  else "onnx_from_torch (torch dynamo exporter, FP32, onnxslim-simplified)",
        "timed": "1x1 conv -> block -> 1x1 conv to 1 channel, less 1x1 conv -> 1x1 conv to 1 channel on the block's "
                 "input shape (runner.forward, perf_counter_ns)",
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
                jobs += [(as_model(m, shape_in[0]), shape_in, Path(tmp) / f"model{i}.onnx") for i, m in enumerate(models)]
            if p.fmt == "checkpoint":  # a torch profile: the modules themselves, nothing exported
                if progress:
                    progress(f"timing {len(jobs)} torch modules x {rounds} rounds")
                stats, runtime = time_torch_modules([(m, shape) for m, shape, _ in jobs], settings=p.settings,
                                                    batch=batch, warmup=warmup, iters=iters, budget_s=budget_s,
                                                    rounds=rounds)
            else:
                _export_all(jobs, progress)
                if progress:
                    progress(f"timing {len(jobs)} ONNX models x {rounds} rounds")
                stats, runtime = time_onnx_files([(path, shape) for _, shape, path in jobs], profile=profile,
                                                 batch=batch, warmup=warmup, iters=iters, budget_s=budget_s,
                                                 rounds=rounds)
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


def measure_lut(blocks: Iterable[BlockSpec], table: dict[str, Any] | str | Path | None = None,
                **kw: Any) -> dict[str, Any]:
    """Measure the blocks missing from ``table`` (see ``measure``) and return the table."""
    return measure(blocks, (), table, **kw)[0]


def measure_models(models: Sequence[Model], **kw: Any) -> list[dict[str, Any]]:
    """Whole models (or ``ModelSpec``s) exported to ONNX FP32 and timed on the profile's runner,
    interleaved, with the blocks' protocol (see ``measure``): statistics in ms per model."""
    return measure((), models, None, **kw)[1]


def calibrate_overhead(table: dict[str, Any], models: Sequence[Model], *, input_shape: Sequence[int] = DEFAULT_INPUT,
                       path: str | Path | None = None, measured: Sequence[dict[str, Any]] | None = None,
                       labels: Sequence[Any] | None = None, **measure_kw: Any) -> float:
    """The fixed per-model overhead (``hetero.nas.latency.fit_overhead``) from calibration models:
    their missing blocks and the models themselves are measured in one interleaved pass
    (``measure``) unless ``measured`` gives the models' statistics already. ``labels`` name the models
    in the table (default: a ``ModelSpec`` as its dict, a module by its class name). Keep these models
    out of any evaluation of the predictor. Saved to ``path`` when given; returns ``overhead_ms``."""
    check_table(table)
    if not models:
        raise HeteroError("calibrating the overhead needs at least one model")
    decomposed = [decompose(m, input_shape) for m in models]
    blocks = [b for bl in decomposed for b in bl]
    kw = dict(profile=table["profile"], batch=table["batch"], path=path, input_shape=input_shape, **measure_kw)
    if measured is None:
        _, measured = measure(blocks, models, table, **kw)
    else:
        measure(blocks, (), table, **kw)
    if labels is None:
        labels = [m.to_dict() if isinstance(m, ModelSpec) else type(m).__name__ for m in models]
    overhead = fit_overhead(table, decomposed, measured, labels)
    if path is not None:
        save_table(table, path)
    return overhead

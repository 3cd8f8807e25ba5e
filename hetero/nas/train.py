"""Training the elastic supernet into a frozen cloud's space (CMP-NAS's compatibility-aware
supernet, trained the Once-for-All way).

Each step follows the sandwich rule: the largest subnet, the smallest and ``n_random`` random ones
each take the compatibility losses against the frozen cloud (cached targets, no augmentation), and
their gradients add up before one optimiser step. In a space with elastic resolution every subnet
also carries its resolution (the largest at the largest, the smallest at the smallest): the batch,
loaded at the cloud's input size, is resized to it (bilinear, antialiased) as OFA trains. With ``distill`` the smaller subnets also align
(cosine) with the largest subnet's embedding of the same batch (in-place distillation). With
``progressive`` the sampled space grows in phases (largest only, then elastic kernel, then depth,
then expand ratio and width), and expanded channels are re-sorted by importance after each phase.

A validation split is carved from the training split here (``val_size`` images, seeded) and never
trained on; the search scores subnets on it. The supernet directory holds ``weights.safetensors``,
``supernet.json`` (space, cloud fingerprint, split, config, history, weights sha256) and, for
``--resume``, ``train_state.pt`` (optimiser and scheduler state, RNG states: tensors and plain
containers only, read back with ``torch.load(weights_only=True)``). It is rewritten atomically at
the end of every epoch. Between epoch ends, every ``save_every`` steps, ``steps/`` holds the whole
training state of the epoch in progress (:mod:`hetero._resume`), so ``--resume`` continues from the
last step saved; the epoch's rewrite drops it.

Under torchrun the ranks share each step's batch and average their gradients (one all-reduce after
the sandwich: DistributedDataParallel cannot wrap several passes over changing subnets); rank 0 writes.
"""
from __future__ import annotations

import json
import math
import pickle
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from devices.schema import SUPERNET_FORMAT
from hetero import data, distributed  # data.iterate_batches read at call time: tests interrupt it
from hetero._atomic import atomic_dir, check_output_dest, sha256_file, write_json_atomic
from hetero._progress import progress_bar
from hetero._resume import STATE as STEP_STATE
from hetero._resume import Snapshots, read_state, rng_state, set_rng_state
from hetero.embed import cloud_targets
from hetero.errors import HeteroError
from hetero.losses import LossContext, WeightedLoss
from hetero.nas.space import Arch, SearchSpace, largest, sample, smallest, space_fields
from hetero.nas.supernet import Supernet

FORMAT = SUPERNET_FORMAT
META = "supernet.json"
WEIGHTS = "weights.safetensors"
STATE = "train_state.pt"
STEPS = "steps"  # mid-epoch training state (hetero._resume), dropped when the epoch's output is written


@dataclass(frozen=True)
class SupernetConfig:
    epochs: int = 6
    batch_size: int = 128
    lr: float = 0.05
    weight_decay: float = 3e-5
    n_random: int = 2
    distill: float = 1.0  # weight of in-place distillation from the largest subnet (0: off)
    progressive: bool = False
    sort_channels: bool = False
    losses: dict[str, float] = field(default_factory=lambda: {"influence": 1.0, "alignment": 1.0})
    val_size: int = 5000
    limit: int | None = None
    seed: int = 0
    # SearchSpace fields to change from the defaults (e.g. head, stem_stride, stages), or a preset's name
    # (``hetero.nas.space.SPACES``, e.g. "mbv3-224"; read into its fields here)
    space: dict[str, Any] | str | None = None

    def __post_init__(self):
        if self.space is not None:
            if not isinstance(self.space, (dict, str)):
                raise HeteroError(f"--search-space must name a preset or hold a JSON object of search-space fields, got "
                                  f"{type(self.space).__name__}")
            object.__setattr__(self, "space", space_fields(self.space))
            check = dict(self.space)
            res = check.get("resolutions")
            if isinstance(res, list) and res and all(isinstance(r, int) for r in res):
                check["input_size"] = max(res)  # the input size follows the cloud (checked against it when training)
            SearchSpace.from_dict(check)  # a one-line error naming the bad field, before any training
        for name in ("epochs", "batch_size", "val_size"):
            if getattr(self, name) < 1:
                raise HeteroError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.n_random < 0 or self.distill < 0 or not (self.lr > 0 and math.isfinite(self.lr)):
            raise HeteroError("--n-random and --distill must be >= 0 and --lr a positive number")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def val_split(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) of a training split of ``n`` images, seeded, sorted."""
    if val_size >= n:
        raise HeteroError(f"the validation split ({val_size}) must be smaller than the training split ({n}); lower --val-size")
    perm = np.random.default_rng(10_000 + seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def _phase(epoch: int, epochs: int, progressive: bool) -> int:
    """Progressive shrinking: 0 largest only, 1 + elastic kernel, 2 + depth, 3 everything."""
    return min(3, int(4 * epoch / max(1, epochs))) if progressive else 3


def _sample_phase(space, rng: random.Random, phase: int):
    """A random arch of the space, with the elastic dimensions not yet opened held at their maximum."""
    a, big = sample(space, rng), largest(space)
    return Arch(width=a.width if phase >= 3 else big.width,
                depths=a.depths if phase >= 2 else big.depths,
                kernels=a.kernels if phase >= 1 else big.kernels,
                expands=a.expands if phase >= 3 else big.expands,
                se=a.se if phase >= 3 else big.se,
                resolution=a.resolution if phase >= 1 else big.resolution)


def legacy_supernet_kind(d: Path) -> str | None:
    """A supernet directory written before output markers, or one whose first epoch is under way (only
    its mid-epoch state in ``steps/`` so far)."""
    return "supernet" if (d / META).is_file() or (d / STEPS / STEP_STATE).is_file() else None


def save_supernet(out: Path, net, meta: dict[str, Any], state: dict[str, Any] | None) -> None:
    with atomic_dir(out, "supernet", True, legacy_supernet_kind) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp / WEIGHTS))
        meta = {**meta, "weights_sha256": sha256_file(tmp / WEIGHTS)}
        write_json_atomic(tmp / META, meta)
        if state is not None:
            torch.save(state, tmp / STATE)


def load_supernet(path: str | Path, *, with_state: bool = False):
    """(supernet, meta[, train state]) from a directory written by `hetero train-supernet`, checked."""
    d = Path(path)
    if not (d / META).is_file():
        raise HeteroError(f"{path} is not a supernet directory (no {META}); pass the --out of `hetero train-supernet`")
    try:
        meta = json.loads((d / META).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeteroError(f"{d / META} is not valid JSON ({e.__class__.__name__}); re-run `hetero train-supernet`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise HeteroError(f"{d / META} is not a hetero supernet description; re-run `hetero train-supernet`")
    if not (d / WEIGHTS).is_file() or sha256_file(d / WEIGHTS) != meta.get("weights_sha256"):
        raise HeteroError(f"{d / WEIGHTS} is missing or does not match its sha256 in {META}; re-run `hetero train-supernet`")
    try:
        space = SearchSpace.from_dict(meta["space"])
        net = Supernet(space, int(meta["dim"]), int(meta["preprocess"]["channels"]))
        net.load_state_dict(load_file(str(d / WEIGHTS)), strict=True)
    except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise HeteroError(f"{d}: the supernet cannot be rebuilt ({first}); re-run `hetero train-supernet`") from None
    net.eval()
    if not with_state:
        return net, meta
    if not (d / STATE).is_file():
        return net, meta, None
    try:  # tensors and plain containers only: a pickled object in the file is refused, never run
        state = torch.load(d / STATE, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, AttributeError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else e.__class__.__name__
        raise HeteroError(f"{d / STATE} cannot be read as training state ({first}); it is damaged or not hetero's: "
                          f"delete {d / STATE} to keep the finished epochs' weights, or train again") from None
    return net, meta, state


def train_supernet(cfg: SupernetConfig, cloud, train_set, out: str | Path, *, resume: bool = False,
                   progress: bool = True, log=print, save_every: int = 200) -> dict[str, Any]:
    """Train (or resume) the supernet into ``cloud``'s space; writes ``out`` each epoch; returns its meta.

    Mid-epoch, every ``save_every`` steps (0: never), the whole training state also goes to ``out/steps/``
    (see :mod:`hetero._resume`), so ``resume`` continues from the last step saved, not the last epoch.
    Under torchrun ``cfg.batch_size`` is the global batch, split over the ranks; their gradients are
    averaged after the sandwich and rank 0 alone writes ``out``."""
    if cloud.role != "cloud":
        raise HeteroError(f"--cloud must be a cloud checkpoint, got a {cloud.role} checkpoint ({cloud.path})")
    out = Path(out)
    check_output_dest(out, "supernet", True, legacy_supernet_kind)  # before any work
    main = distributed.is_main()
    if not main:
        log = _quiet
    world, rank = distributed.world_size(), distributed.rank()
    if cfg.batch_size % world:
        raise HeteroError(f"--batch-size {cfg.batch_size} is the global batch, split over {world} processes; "
                          f"use a multiple of {world}")
    per_rank = cfg.batch_size // world
    prep = cloud.preprocess
    fields = dict(cfg.space or {})
    res = fields.get("resolutions") or []
    if res:  # elastic resolution: images load at the cloud's size and are resized down to each subnet's
        if max(res) > prep.size:
            raise HeteroError(f"the search space's resolutions go up to {max(res)} px, but the cloud's preprocessing "
                              f"gives {prep.size} px images; use a cloud at {max(res)} px or resolutions up to {prep.size}")
        fields.pop("input_size", None)
    for key, want in (("in_channels", prep.channels), ("input_size", prep.size)):
        if key in fields and fields[key] != want:
            raise HeteroError(f"--search-space sets {key} = {fields[key]!r}, but the cloud's preprocessing gives {want}; "
                              f"leave {key} out (it follows the cloud)")
    space = SearchSpace.from_dict({**fields, "in_channels": prep.channels, "input_size": prep.size})
    ds = train_set.conform(prep)
    if cfg.limit and cfg.limit < len(ds):
        ds = ds.subset(cfg.limit)
    tr_idx, va_idx = val_split(len(ds), cfg.val_size, cfg.seed)
    train_ds = ds.subset(tr_idx)
    loss_fn = WeightedLoss(dict(cfg.losses), LossContext(dim=cloud.spec.dim, num_classes=len(train_set.classes)))
    if loss_fn.needs_classifier and cloud.classifier is None:
        raise HeteroError(f"the cloud {cloud.path} has no classifier, which the influence loss needs; run "
                          "`hetero fit-classifier` on it or pass --loss alignment=1")
    frozen = cloud.classifier
    if frozen is not None:
        frozen.eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    net = Supernet(space, cloud.spec.dim, prep.channels)
    dev = distributed.device()  # the CPU, or this rank's GPU under torchrun
    net.to(dev)
    loss_fn.to(dev)
    if frozen is not None:
        frozen.to(dev)
    steps = math.ceil(math.ceil(len(train_ds) / world) / per_rank)
    params = list(net.parameters()) + list(loss_fn.parameters())
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps)
    meta = {"format": FORMAT, "version": 1, "space": space.to_dict(), "dim": cloud.spec.dim,
            "preprocess": prep.to_dict(), "classes": list(train_set.classes), "cloud_space": cloud.space,
            "cloud_checkpoint": str(cloud.path) if cloud.path else None, "config": cfg.to_dict(),
            "dataset": ds.name, "dataset_digest": ds.digest(),
            "split": {"train": len(tr_idx), "val": len(va_idx), "seed": cfg.seed,
                      "val_digest": ds.subset(va_idx).digest()}, "history": [], "epochs_done": 0}
    snaps = Snapshots(out / STEPS, save_every, {"command": "train-supernet", "out": str(out.resolve())}, enabled=main)
    start = start_step = 0
    sums: dict[str, float] = {}
    n = 0
    arch_rng_state = None
    step_state = None
    if resume and (out / STEPS / STEP_STATE).is_file():
        step_state = read_state(out / STEPS, flag="--resume")
    if resume and (out / META).is_file():
        old, old_meta, state = load_supernet(out, with_state=True)
        if old_meta.get("cloud_space") != cloud.space:
            raise HeteroError(f"--resume {out}: that supernet was trained into cloud space {str(old_meta.get('cloud_space'))[:12]}, "
                              f"not {cloud.space[:12]}; pass its cloud or a new --out")
        if old_meta.get("config") != cfg.to_dict() or old_meta.get("dataset_digest") != ds.digest():
            raise HeteroError(f"--resume {out}: the config or the data differ from the interrupted run's; resume with the same flags")
        if state is None:
            raise HeteroError(f"--resume {out}: no {STATE} (the run finished, or it was not written by train-supernet)")
        net.load_state_dict(old.state_dict())
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        loss_fn.load_state_dict(state["loss"])
        torch.set_rng_state(state["torch_rng"])
        meta = old_meta
        start = int(meta["epochs_done"])
    elif resume and step_state is not None:
        pass  # interrupted in its first epoch: only the step state exists
    elif (out / META).is_file() or (out.exists() and any(out.iterdir())):
        raise HeteroError(f"{out} already exists; pass --resume to continue it, or another --out")
    if step_state is not None:
        snaps.loaded = step_state
        smeta = snaps.check(cfg.to_dict(), ds.digest(), world)
        if smeta.get("cloud_space") != cloud.space:
            raise HeteroError(f"--resume {out}: that supernet was trained into cloud space {str(smeta.get('cloud_space'))[:12]}, "
                              f"not {cloud.space[:12]}; pass its cloud or a new --out")
        if int(smeta["position"]["epoch"]) == start:  # a step state older than the last epoch's output is stale
            net.load_state_dict(step_state["net"])
            opt.load_state_dict(step_state["optimizer"])
            sched.load_state_dict(step_state["scheduler"])
            loss_fn.load_state_dict(step_state["loss"])
            mine = step_state["ranks"][rank]
            set_rng_state(mine["rng"])
            sums, n = dict(mine["sums"]), int(mine["images"])
            arch_rng_state = step_state["arch_rng"]
            meta["history"] = [dict(h) for h in smeta["history"]]
            meta["train_seconds"] = float(smeta.get("train_seconds", 0.0))
            start_step = int(smeta["position"]["step"])
    if resume and (start or start_step):
        log(f"resuming {out} at epoch {start + 1}/{cfg.epochs}, step {start_step}/{steps}")
    with distributed.main_first():  # rank 0 fills the cache file, the other ranks then read it
        cached = cloud_targets(cloud, train_ds, progress=progress and main) if loss_fn.needs_cloud_emb else None
    big, small = largest(space), smallest(space)
    archs: list = []
    for epoch in range(start, cfg.epochs):
        phase = _phase(epoch, cfg.epochs, cfg.progressive)
        rng = random.Random(cfg.seed * 1000 + epoch)
        first = start_step if epoch == start else 0
        if first and arch_rng_state is not None:
            rng.setstate(_tuples(arch_rng_state))
        else:
            sums, n = {}, 0
        net.train()
        loss_fn.train()
        t0, n0 = time.perf_counter(), n
        order = distributed.shard(np.random.default_rng(cfg.seed + epoch).permutation(len(train_ds)), rank, world)
        bar = progress_bar(total=len(order) * world, initial=n * world, desc=f"train-supernet {epoch + 1}/{cfg.epochs}",
                           unit="img", disable=not (progress and main), leave=False)
        batches = data.iterate_batches(train_ds, prep, per_rank, indices=order[first * per_rank:])
        for s, (x, y, idx) in enumerate(batches, start=first):
            x, y = x.to(dev), y.to(dev)
            target = torch.from_numpy(np.asarray(cached[idx.numpy()])).to(dev) if cached is not None else None
            archs = [big] if phase == 0 else [big, small] + [_sample_phase(space, rng, phase) for _ in range(cfg.n_random)]
            opt.zero_grad(set_to_none=True)
            teacher = None
            for i, arch in enumerate(archs):
                net.set_active(arch)
                emb = net(x)
                terms = loss_fn(emb, y, target, frozen)
                loss = terms["total"]
                if i == 0:
                    teacher = emb.detach()
                elif cfg.distill:
                    kd = (1 - F.cosine_similarity(emb, teacher, dim=1)).mean()
                    loss = loss + cfg.distill * kd
                    terms = {**terms, "distill": kd}
                if not torch.isfinite(loss):
                    raise HeteroError(f"train-supernet diverged (loss {loss.item()}) in epoch {epoch + 1}; lower --lr")
                loss.backward()
                tag = "largest" if i == 0 else "smallest" if i == 1 else "random"
                for k, v in terms.items():
                    sums[f"{tag}.{k}"] = sums.get(f"{tag}.{k}", 0.0) + float(v.detach()) * len(x)
            # the sandwich makes several passes per step over changing subnets, which DistributedDataParallel
            # cannot wrap; one all-reduce of the summed gradients does the same
            distributed.average_gradients(params)
            opt.step()
            sched.step()
            n += len(x)
            bar.update(len(x) * world)
            if s + 1 < steps and snaps.due(epoch * steps + s + 1):
                ranks = distributed.all_gather_object({"rng": rng_state(), "sums": dict(sums), "images": n})
                snaps.save({"net": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
                            "optimizer": _cpu(opt.state_dict()), "scheduler": sched.state_dict(),
                            "loss": _cpu(loss_fn.state_dict()),
                            "ranks": ranks, "arch_rng": _lists(rng.getstate()),
                            "meta": {"config": cfg.to_dict(), "dataset": ds.name, "dataset_digest": ds.digest(),
                                     "cloud_space": cloud.space, "world_size": world, "steps_per_epoch": steps,
                                     "position": {"epoch": epoch, "step": s + 1}, "history": meta["history"],
                                     "train_seconds": meta.get("train_seconds", 0.0) + (time.perf_counter() - t0)}})
        bar.close()
        distributed.broadcast_module(net)  # rank 0's BatchNorm statistics everywhere (the weights agree already)
        if cfg.sort_channels and cfg.progressive and epoch + 1 < cfg.epochs and \
                _phase(epoch + 1, cfg.epochs, True) != phase:
            net.sort_channels()
        net.eval()
        keys = list(sums)
        total = distributed.all_reduce_sum([float(n), float(n - n0)] + [sums[k] for k in keys])
        sums = dict(zip(keys, total[2:]))
        elapsed = time.perf_counter() - t0
        meta["history"].append({**{k: v / total[0] for k, v in sums.items()}, "epoch": epoch + 1, "phase": phase,
                                "img_per_s": total[1] / elapsed, "subnets_per_step": len(archs)})
        meta["epochs_done"] = epoch + 1
        meta["train_seconds"] = meta.get("train_seconds", 0.0) + elapsed
        state = {"optimizer": _cpu(opt.state_dict()), "scheduler": sched.state_dict(), "loss": _cpu(loss_fn.state_dict()),
                 "torch_rng": torch.get_rng_state()}
        if main:  # rewrites out whole, which drops the step state of the epoch just finished
            save_supernet(out, net, meta, state if epoch + 1 < cfg.epochs else None)
        distributed.barrier()
        log(f"epoch {epoch + 1}/{cfg.epochs}: " + ", ".join(f"{k} {v / total[0]:.3f}" for k, v in sums.items()
                                                          if k.endswith("total")) + f" ({total[1] / elapsed:.0f} img/s)")
    net.cpu()
    if frozen is not None:
        frozen.cpu()
    return meta


def _cpu(obj):
    """A state dict (nested) with every tensor on the CPU, for the state files."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    return obj


def _quiet(_: str) -> None:
    pass


def _lists(x):
    return [_lists(v) for v in x] if isinstance(x, tuple) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x

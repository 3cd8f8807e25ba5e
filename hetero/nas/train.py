"""Training the elastic supernet into a frozen cloud's space (CMP-NAS's compatibility-aware
supernet, trained the Once-for-All way).

Each step follows the sandwich rule: the largest subnet, the smallest and ``n_random`` random ones
each take the compatibility losses against the frozen cloud (cached targets, no augmentation), and
their gradients add up before one optimiser step. With ``distill`` the smaller subnets also align
(cosine) with the largest subnet's embedding of the same batch (in-place distillation). With
``progressive`` the sampled space grows in phases (largest only, then elastic kernel, then depth,
then expand ratio and width), and expanded channels are re-sorted by importance after each phase.

A validation split is carved from the training split here (``val_size`` images, seeded) and never
trained on; the search scores subnets on it. The supernet directory holds ``weights.safetensors``,
``supernet.json`` (space, cloud fingerprint, split, config, history, weights sha256) and, for
``--resume``, ``train_state.pt`` (optimiser and scheduler state, RNG states: tensors and plain
containers only, read back with ``torch.load(weights_only=True)``). It is rewritten atomically at
the end of every epoch.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hetero.errors import HeteroError

FORMAT = "hetero-supernet"
META = "supernet.json"
WEIGHTS = "weights.safetensors"
STATE = "train_state.pt"


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

    def __post_init__(self):
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
    from hetero.nas.space import Arch, largest, sample

    a, big = sample(space, rng), largest(space)
    return Arch(width=a.width if phase >= 3 else big.width,
                depths=a.depths if phase >= 2 else big.depths,
                kernels=a.kernels if phase >= 1 else big.kernels,
                expands=a.expands if phase >= 3 else big.expands,
                se=a.se if phase >= 3 else big.se)


def save_supernet(out: Path, net, meta: dict[str, Any], state: dict[str, Any] | None) -> None:
    from safetensors.torch import save_file

    from hetero._atomic import atomic_dir, sha256_file, write_json_atomic

    with atomic_dir(out, overwrite=True) as tmp:
        save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(tmp / WEIGHTS))
        meta = {**meta, "weights_sha256": sha256_file(tmp / WEIGHTS)}
        write_json_atomic(tmp / META, meta)
        if state is not None:
            torch.save(state, tmp / STATE)


def load_supernet(path: str | Path, *, with_state: bool = False):
    """(supernet, meta[, train state]) from a directory written by `hetero train-supernet`, checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from hetero._atomic import sha256_file
    from hetero.nas.space import SearchSpace
    from hetero.nas.supernet import Supernet

    d = Path(path)
    if not (d / META).is_file():
        raise HeteroError(f"{path} is not a supernet directory (no {META}); pass the --out of `hetero train-supernet`")
    try:
        meta = json.loads((d / META).read_text())
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
    state = torch.load(d / STATE, weights_only=True) if (d / STATE).is_file() else None
    return net, meta, state


def train_supernet(cfg: SupernetConfig, cloud, train_set, out: str | Path, *, resume: bool = False,
                   progress: bool = True, log=print) -> dict[str, Any]:
    """Train (or resume) the supernet into ``cloud``'s space; writes ``out`` each epoch; returns its meta."""
    from hetero._progress import progress_bar
    from hetero.data import iterate_batches
    from hetero.embed import cloud_targets
    from hetero.losses import LossContext, WeightedLoss
    from hetero.nas.space import SearchSpace, largest, smallest
    from hetero.nas.supernet import Supernet

    if cloud.role != "cloud":
        raise HeteroError(f"--cloud must be a cloud checkpoint, got a {cloud.role} checkpoint ({cloud.path})")
    out = Path(out)
    prep = cloud.preprocess
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
    space = SearchSpace(in_channels=prep.channels, input_size=prep.size)
    torch.manual_seed(cfg.seed)
    net = Supernet(space, cloud.spec.dim, prep.channels)
    steps = math.ceil(len(train_ds) / cfg.batch_size)
    opt = torch.optim.SGD(list(net.parameters()) + list(loss_fn.parameters()), lr=cfg.lr, momentum=0.9, nesterov=True,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps)
    meta = {"format": FORMAT, "version": 1, "space": space.to_dict(), "dim": cloud.spec.dim,
            "preprocess": prep.to_dict(), "classes": list(train_set.classes), "cloud_space": cloud.space,
            "cloud_checkpoint": str(cloud.path) if cloud.path else None, "config": cfg.to_dict(),
            "dataset": ds.name, "dataset_digest": ds.digest(),
            "split": {"train": len(tr_idx), "val": len(va_idx), "seed": cfg.seed,
                      "val_digest": ds.subset(va_idx).digest()}, "history": [], "epochs_done": 0}
    start = 0
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
        log(f"resuming {out} after epoch {start}/{cfg.epochs}")
    elif (out / META).is_file() or (out.exists() and any(out.iterdir())):
        raise HeteroError(f"{out} already exists; pass --resume to continue it, or another --out")
    cached = cloud_targets(cloud, train_ds, progress=progress) if loss_fn.needs_cloud_emb else None
    big, small = largest(space), smallest(space)
    for epoch in range(start, cfg.epochs):
        phase = _phase(epoch, cfg.epochs, cfg.progressive)
        rng = random.Random(cfg.seed * 1000 + epoch)
        net.train()
        loss_fn.train()
        sums: dict[str, float] = {}
        n = 0
        t0 = time.perf_counter()
        bar = progress_bar(total=len(train_ds), desc=f"train-supernet {epoch + 1}/{cfg.epochs}", unit="img",
                           disable=not progress, leave=False)
        for x, y, idx in iterate_batches(train_ds, prep, cfg.batch_size, shuffle=True, seed=cfg.seed + epoch):
            target = torch.from_numpy(np.asarray(cached[idx.numpy()])) if cached is not None else None
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
            opt.step()
            sched.step()
            n += len(x)
            bar.update(len(x))
        bar.close()
        if cfg.sort_channels and cfg.progressive and epoch + 1 < cfg.epochs and \
                _phase(epoch + 1, cfg.epochs, True) != phase:
            net.sort_channels()
        net.eval()
        meta["history"].append({**{k: v / n for k, v in sums.items()}, "epoch": epoch + 1, "phase": phase,
                                "img_per_s": n / (time.perf_counter() - t0), "subnets_per_step": len(archs)})
        meta["epochs_done"] = epoch + 1
        meta["train_seconds"] = meta.get("train_seconds", 0.0) + (time.perf_counter() - t0)
        state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "loss": loss_fn.state_dict(),
                 "torch_rng": torch.get_rng_state()}
        save_supernet(out, net, meta, state if epoch + 1 < cfg.epochs else None)
        log(f"epoch {epoch + 1}/{cfg.epochs}: " + ", ".join(f"{k} {v / n:.3f}" for k, v in sums.items()
                                                          if k.endswith("total")) + f" ({n / (time.perf_counter() - t0):.0f} img/s)")
    return meta

"""Training: the cloud model (cross-entropy through its cosine classifier) and edge models trained
into the cloud space (compatibility losses), or the no-compatibility control."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from devices.artifact import MAX_IMAGE_SIZE
from hetero import distributed
from hetero._progress import progress_bar
from hetero._resume import Snapshots, rng_state, set_rng_state
from hetero.checkpoint import Checkpoint
from hetero.data import ImageSet, Preprocess, as_nchw, iterate_batches
from hetero.data.augment import IMAGENET, PAD_CROP, POLICIES, resolve
from hetero.data.imageset import LUMA
from hetero.data.loader import _augment as augment_batch  # the loader's flip + 2-px crop, with our own generator
from hetero.embed import cloud_targets
from hetero.errors import HeteroError
from hetero.losses import LossContext, WeightedLoss
from hetero.models import CosineClassifier, ModelSpec, create_embedding_model
from hetero.models.library_weights import describe as describe_pretrained
from hetero.models.library_weights import load_pretrained
from hetero.models.registry import check_input

_OMITTED_WHEN_NONE = ("pretrained", "size")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; written into the checkpoint."""

    model: str = "resnet20"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dim: int = 128
    epochs: int = 2
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    scale: float = 16.0
    margin: float = 0.0
    # False; True (auto: imagenet for a centre-cropping preprocess, else pad-crop); "pad-crop"; "imagenet"
    augment: bool | str = False
    seed: int = 0
    limit: int | None = None
    size: int | None = None  # input size; None: the cloud's (an edge), the model's native or the data's (a cloud)
    # influence + alignment + relational: never far from the best recipe measured (docs/training.md, "Which loss
    # when"): 0.9 points behind influence alone on Fashion-MNIST at 8 epochs, ahead of it in the demo
    # and by 2-4 points on a small dataset (scikit-learn digits), where influence alone lagged
    losses: dict[str, float] = field(default_factory=lambda: {"influence": 1.0, "alignment": 1.0, "relational": 1.0})
    loss_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    targets: str = "auto"  # cloud targets: "cached" (memory-mapped), "online" (frozen cloud per batch), "auto"
    compat: bool = True
    # --pretrained FILE|NAME (tv:/timm: models); once loaded, the record of what: source, file, sha256 (, weights)
    pretrained: str | dict[str, Any] | None = None

    def __post_init__(self):
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        flag = {"losses": "loss", "loss_options": "loss-options", "model_kwargs": "model-kwargs"}
        for name, ok, want in (("model", lambda v: isinstance(v, str) and v, "a backbone name"),
                               ("model_kwargs", lambda v: isinstance(v, dict), "name=value options"),
                               ("losses", lambda v: isinstance(v, dict) and all(isinstance(k, str) and is_num(w)
                                                                               for k, w in v.items()),
                                "loss=weight pairs with finite numeric weights"),
                               ("loss_options", lambda v: isinstance(v, dict) and all(isinstance(o, dict) for o in v.values()),
                                "loss.option=value pairs"),
                               ("dim", is_int, "a whole number"), ("epochs", is_int, "a whole number"),
                               ("batch_size", is_int, "a whole number"), ("seed", is_int, "a whole number"),
                               ("limit", lambda v: v is None or is_int(v), "a whole number"),
                               ("lr", is_num, "a finite number"), ("weight_decay", is_num, "a finite number"),
                               ("scale", is_num, "a finite number"), ("margin", is_num, "a finite number"),
                               ("augment", lambda v: isinstance(v, bool) or v in ("auto", *POLICIES),
                                f"true, false or one of {', '.join(POLICIES)}"),
                               ("size", lambda v: v is None or (is_int(v) and 8 <= v <= MAX_IMAGE_SIZE),
                                f"a whole number of pixels, 8 to {MAX_IMAGE_SIZE}"),
                               ("compat", lambda v: isinstance(v, bool), "true or false"),
                               ("pretrained", lambda v: v is None or (isinstance(v, str) and v) or isinstance(v, dict),
                                "a weights file or a weight name such as DEFAULT"),
                               ("targets", lambda v: isinstance(v, str), "auto, cached or online")):
            v = getattr(self, name)
            if not ok(v):
                raise HeteroError(f"--{flag.get(name, name.replace('_', '-'))} must be {want}, got {v!r:.80}; "
                                  "fix the flag or the --config file")
        if self.weight_decay < 0:
            raise HeteroError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        for name in ("epochs", "batch_size", "dim"):
            if getattr(self, name) < 1:
                raise HeteroError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise HeteroError(f"--lr must be a positive number, got {self.lr}")
        if self.limit is not None and self.limit < 1:
            raise HeteroError(f"--limit must be >= 1, got {self.limit}")
        if self.targets not in ("auto", "cached", "online"):
            raise HeteroError(f"--targets must be auto, cached or online, got {self.targets!r}")
        if self.targets == "cached" and self.augment:
            raise HeteroError("cached cloud targets are embeddings of un-augmented images; with --augment use --targets online")

    @property
    def online_targets(self) -> bool:
        return self.targets == "online" or (self.targets == "auto" and self.augment)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in _OMITTED_WHEN_NONE:  # newer fields: a config without them reads (and resumes) as before
            if d[k] is None:
                del d[k]
        return d


class _Objective(torch.nn.Module):
    """Every trained module behind one forward (batch -> loss terms), so DistributedDataParallel
    synchronises the classifier and loss heads' gradients along with the model's."""

    def __init__(self, modules: list[torch.nn.Module], step: Callable[..., dict[str, torch.Tensor]]):
        super().__init__()
        self.parts = torch.nn.ModuleList(modules)
        self._step = step

    def forward(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._step(x, y, idx)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's sample order: a pure function of (seed, epoch), so a resumed run sees the same batches."""
    return np.random.default_rng(seed + epoch).permutation(n)


def step_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    """Seed of the augmentation of one batch: a pure function of (seed, epoch, step, rank)."""
    return int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1)[0])


def _fit(modules: list[torch.nn.Module], ds: ImageSet, prep: Preprocess, cfg: TrainConfig,
         step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
         desc: str, progress: bool, snapshots: Snapshots | None = None) -> tuple[list[dict[str, float]], float]:
    """SGD (Nesterov) with a one-cycle schedule over every parameter of ``modules``.

    Returns the per-epoch mean of every loss term, and the seconds spent by earlier (interrupted) runs.
    ``snapshots``: save the state every ``save_every`` steps and at epoch ends, and continue from a loaded
    one. Under torchrun ``cfg.batch_size`` is the global batch: each of the ``world`` ranks takes
    ``batch_size / world`` rows of the epoch's order, DistributedSampler-style."""
    world, rank = distributed.world_size(), distributed.rank()
    if cfg.batch_size % world:
        raise HeteroError(f"--batch-size {cfg.batch_size} is the global batch, split over {world} processes; "
                          f"use a multiple of {world}")
    per_rank = cfg.batch_size // world
    steps_per_epoch = math.ceil(math.ceil(len(ds) / world) / per_rank)
    dev = distributed.device()
    torch.manual_seed(cfg.seed)
    for m in modules:
        m.to(dev)
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15)
    history: list[dict[str, float]] = []
    start_epoch, start_step, sums, n, seconds_before = 0, 0, {}, 0, 0.0
    meta = snapshots.check(cfg.to_dict(), ds.digest(), world) if snapshots is not None else None
    if meta is not None:
        st = snapshots.loaded
        for m, s in zip(modules, st["modules"], strict=True):
            m.load_state_dict(s)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        mine = st["ranks"][rank]
        set_rng_state(mine["rng"])
        sums, n = dict(mine["sums"]), int(mine["images"])
        history = [dict(h) for h in meta["history"]]
        start_epoch, start_step = int(meta["position"]["epoch"]), int(meta["position"]["step"])
        seconds_before = float(meta.get("train_seconds", 0.0))
    t_start = time.perf_counter()

    def save(epoch: int, step_: int) -> None:
        # every rank takes part (its RNG state and partial sums); rank 0 writes
        ranks = distributed.all_gather_object({"rng": rng_state(), "sums": dict(sums), "images": n})
        snapshots.save({"modules": [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in modules],
                        "optimizer": _to_cpu(opt.state_dict()), "scheduler": sched.state_dict(), "ranks": ranks,
                        "meta": {"config": cfg.to_dict(), "dataset": ds.name, "dataset_digest": ds.digest(),
                                 "world_size": world, "steps_per_epoch": steps_per_epoch,
                                 "position": {"epoch": epoch, "step": step_}, "history": history,
                                 "train_seconds": seconds_before + time.perf_counter() - t_start}})

    objective = distributed.ddp(_Objective(modules, step))
    objective.train()
    fill = torch.tensor([-m / sd for m, sd in zip(prep.mean, prep.std)], dtype=torch.float32)  # black, normalised
    # pad-crop on the batch here, per step; imagenet in the loader's workers, from each original file
    policy = resolve(cfg.augment, prep.crop)
    for epoch in range(start_epoch, cfg.epochs):
        first = start_step if epoch == start_epoch else 0
        if first == 0:
            sums, n = {}, 0
        order = distributed.shard(epoch_order(len(ds), cfg.seed, epoch), rank, world)
        t0, n0 = time.perf_counter(), n
        bar = progress_bar(total=len(order) * world, initial=n * world, desc=f"{desc} {epoch + 1}/{cfg.epochs}",
                           unit="img", disable=not (progress and distributed.is_main()), leave=False)
        # one loader per epoch (a lazy set's decoding workers stay up); augmentation is drawn here, per step
        seeds = [step_seed(cfg.seed, epoch, s, rank) for s in range(first, steps_per_epoch)]
        batches = iterate_batches(ds, prep, per_rank, indices=order[first * per_rank:], batch_seeds=seeds,
                                  augment=IMAGENET if policy == IMAGENET else False)
        for s, (x, y, ib) in enumerate(batches, start=first):
            if policy == PAD_CROP:
                x = augment_batch(x, fill, torch.Generator().manual_seed(step_seed(cfg.seed, epoch, s, rank)))
            # the loader already gives NCHW; training never runs channels-last by accident
            terms = objective(as_nchw(x).to(dev), y.to(dev), ib)
            loss = terms["total"]
            if not torch.isfinite(loss):
                raise HeteroError(f"{desc}: training diverged (loss is {loss.item()}) in epoch {epoch + 1}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(x)
            n += len(x)
            bar.update(len(x) * world)
            bar.set_postfix({k: f"{v / n:.3f}" for k, v in sums.items()}, refresh=False)
            if snapshots is not None and s + 1 < steps_per_epoch and snapshots.due(epoch * steps_per_epoch + s + 1):
                save(epoch, s + 1)
        bar.close()
        keys = list(sums)  # the loss's own term order, the same on every rank
        total = distributed.all_reduce_sum([float(n), float(n - n0)] + [sums[k] for k in keys])
        history.append({**{k: v / total[0] for k, v in zip(keys, total[2:])}, "epoch": epoch + 1,
                        "img_per_s": total[1] / (time.perf_counter() - t0)})
        if snapshots is not None:
            save(epoch + 1, 0)
    for m in modules:
        m.eval()
        m.cpu()
    return history, seconds_before


def as_input_of(x: torch.Tensor, have: Preprocess, want: Preprocess) -> torch.Tensor:
    """A batch preprocessed by ``have`` as ``want`` would feed it: the same pixels renormalised and
    resized (bilinear, antialiased), so the frozen cloud embeds an edge's augmented batch at its own
    input size. A different centre crop is not redone (the picture's border differs by a few percent)."""
    if have == want:
        return x
    m0, s0 = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1) for v in (have.mean, have.std))
    m1, s1 = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1) for v in (want.mean, want.std))
    pixels = x * s0 + m0
    if have.channels != want.channels:
        luma = torch.as_tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)  # as conform converts
        pixels = pixels.expand(-1, 3, -1, -1) if want.channels == 3 else (pixels * luma).sum(1, keepdim=True)
    if have.size != want.size:
        pixels = F.interpolate(pixels, size=(want.size, want.size), mode="bilinear", align_corners=False,
                               antialias=want.size < have.size)
    return as_nchw((pixels - m1) / s1)


def _start_from_pretrained(model: torch.nn.Module, cfg: TrainConfig, snapshots: Snapshots | None) -> TrainConfig:
    """Load ``cfg.pretrained`` into the model's library backbone; ``cfg`` then records what was loaded. A
    resumed run takes its weights from its state, and its config already says where they started."""
    if cfg.pretrained is None or (snapshots is not None and snapshots.loaded is not None):
        return cfg
    record = load_pretrained(model, cfg.model, cfg.pretrained)
    if distributed.is_main():
        print(describe_pretrained(record, cfg.model), file=sys.stderr)
    return replace(cfg, pretrained=record)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def _prepare(ds: ImageSet, prep: Preprocess, cfg: TrainConfig) -> ImageSet:
    ds = ds.conform(prep)
    return ds.subset(cfg.limit) if cfg.limit and cfg.limit < len(ds) else ds


def train_cloud(cfg: TrainConfig, train_set: ImageSet, prep: Preprocess, *, progress: bool = True,
                snapshots: Snapshots | None = None) -> Checkpoint:
    """Train the cloud embedding model with cross-entropy through its cosine classifier.
    ``snapshots``: save (and resume from) step-level training state."""
    ds = _prepare(train_set, prep, cfg)
    torch.manual_seed(cfg.seed)
    spec = ModelSpec(cfg.model, cfg.dim, dict(cfg.model_kwargs))
    model = create_embedding_model(spec, prep.channels)
    check_input(model, prep.channels, prep.size)  # a ViT at another size, a size below the strides: one line, now
    cfg = _start_from_pretrained(model, cfg, snapshots)
    classifier = CosineClassifier(cfg.dim, len(train_set.classes), cfg.scale, cfg.margin)

    def step(x, y, idx):
        return {"total": F.cross_entropy(classifier(model(x), y), y)}

    t0 = time.perf_counter()
    history, before = _fit([model, classifier], ds, prep, cfg, step, "train-cloud", progress, snapshots)
    ckpt = Checkpoint("cloud", spec, model, classifier, prep, train_set.classes, space="", config=cfg.to_dict())
    ckpt.space = ckpt.fingerprint
    ckpt.info = {"dataset": ds.name, "dataset_digest": ds.digest(), "history": history,
                 "train_seconds": before + time.perf_counter() - t0}
    return ckpt


def train_edge(cfg: TrainConfig, cloud: Checkpoint, train_set: ImageSet, *, progress: bool = True,
               init_state: dict[str, torch.Tensor] | None = None, snapshots: Snapshots | None = None) -> Checkpoint:
    """Train an edge model into ``cloud``'s space (``cfg.compat``), or the control (own classifier, CE only).
    ``init_state``: starting weights of the model (e.g. a subnet extracted from a NAS supernet).
    ``snapshots``: save (and resume from) step-level training state."""
    if cloud.role != "cloud":
        raise HeteroError(f"--cloud must be a cloud checkpoint, got a {cloud.role} checkpoint ({cloud.path})")
    # the edge sees the images as the cloud does, at its own input size if cfg.size says one
    prep = cloud.preprocess if cfg.size in (None, cloud.preprocess.size) else replace(cloud.preprocess, size=cfg.size)
    if cfg.dim != cloud.spec.dim:
        raise HeteroError(f"--dim {cfg.dim} differs from the cloud's embedding dim {cloud.spec.dim}; use --dim {cloud.spec.dim}")
    ctx = LossContext(dim=cfg.dim, num_classes=len(train_set.classes))
    options = {k: dict(v) for k, v in cfg.loss_options.items()}
    if "ce" in cfg.losses:  # the model's own classifier: --scale/--margin apply unless ce.* options say otherwise
        options["ce"] = {"scale": cfg.scale, "margin": cfg.margin, **options.get("ce", {})}
    loss_fn = WeightedLoss(dict(cfg.losses), ctx, options) if cfg.compat else None
    if loss_fn is not None and loss_fn.needs_classifier:
        if cloud.classifier is None:
            raise HeteroError(f"the cloud checkpoint {cloud.path} has no classifier, which the influence and logit_distill losses "
                              "need; run `hetero fit-classifier` on it, or use --loss alignment=1 (or contrastive, relational)")
        if len(train_set.classes) != cloud.classifier.num_classes:
            raise HeteroError(
                f"training data has {len(train_set.classes)} classes but the cloud classifier has "
                f"{cloud.classifier.num_classes}; use the cloud's dataset or drop the influence loss")
    ds = _prepare(train_set, prep, cfg)
    torch.manual_seed(cfg.seed)
    spec = ModelSpec(cfg.model, cfg.dim, dict(cfg.model_kwargs))
    model = create_embedding_model(spec, prep.channels)
    check_input(model, prep.channels, prep.size)  # a ViT at another size, a size below the strides: one line, now
    cfg = _start_from_pretrained(model, cfg, snapshots)
    if init_state is not None:
        try:
            model.load_state_dict(init_state, strict=True)
        except RuntimeError as e:
            raise HeteroError(f"the initial weights do not fit {cfg.model} ({str(e).splitlines()[0]})") from None
    t0 = time.perf_counter()
    dev = distributed.device()
    if loss_fn is not None:
        frozen = cloud.classifier
        if frozen is not None:
            frozen.eval()
            frozen.requires_grad_(False)
            frozen.to(dev)
        cloud.model.eval()
        cloud.model.requires_grad_(False)
        if not loss_fn.needs_cloud_emb:
            def target(x, idx):
                return None
        elif cfg.online_targets:
            cloud.model.to(dev)

            def target(x, idx):
                with torch.no_grad():
                    return cloud.model(as_input_of(x, prep, cloud.preprocess))
        else:
            with distributed.main_first():  # rank 0 fills the cache file, the other ranks then read it
                cached = cloud_targets(cloud, ds, progress=progress and distributed.is_main())  # read-only memory map

            def target(x, idx):
                return torch.from_numpy(cached[idx.numpy()]).to(x.device)

        def step(x, y, idx):
            return loss_fn(model(x), y, target(x, idx), frozen)

        modules: list[torch.nn.Module] = [model, loss_fn]
        classifier = loss_fn.own_classifier
        role, space = "edge", cloud.space
    else:
        classifier = CosineClassifier(cfg.dim, len(train_set.classes), cfg.scale, cfg.margin)

        def step(x, y, idx):
            return {"total": F.cross_entropy(classifier(model(x), y), y)}

        modules = [model, classifier]
        role, space = "control", ""
    try:
        history, before = _fit(modules, ds, prep, cfg, step, "train-edge" if cfg.compat else "train-control", progress,
                               snapshots)
    finally:
        cloud.model.cpu()
        if cloud.classifier is not None:
            cloud.classifier.cpu()
    ckpt = Checkpoint(role, spec, model, classifier, prep, train_set.classes, space=space, config=cfg.to_dict())
    if role == "control":
        ckpt.space = ckpt.fingerprint  # its own, unrelated space
    ckpt.info = {"dataset": ds.name, "dataset_digest": ds.digest(), "history": history,
                 "cloud_fingerprint": cloud.space, "cloud_checkpoint": str(cloud.path) if cloud.path else None,
                 "train_seconds": before + time.perf_counter() - t0}
    return ckpt

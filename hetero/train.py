"""Training: the cloud model (cross-entropy through its cosine classifier) and edge models trained
into the cloud space (compatibility losses), or the no-compatibility control."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from hetero._progress import progress_bar
from hetero.checkpoint import Checkpoint
from hetero.data import ImageSet, Preprocess, as_nchw, iterate_batches
from hetero.embed import cloud_targets
from hetero.errors import HeteroError
from hetero.losses import LossContext, WeightedLoss
from hetero.models import CosineClassifier, ModelSpec, create_embedding_model


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
    augment: bool = False
    seed: int = 0
    limit: int | None = None
    # influence + alignment + relational: never far from the best recipe measured (README, "Which loss
    # when"): 0.9 points behind influence alone on Fashion-MNIST at 8 epochs, ahead of it in the demo
    # and by 2-4 points on a small dataset (scikit-learn digits), where influence alone lagged
    losses: dict[str, float] = field(default_factory=lambda: {"influence": 1.0, "alignment": 1.0, "relational": 1.0})
    loss_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    targets: str = "auto"  # cloud targets: "cached" (memory-mapped), "online" (frozen cloud per batch), "auto"
    compat: bool = True

    def __post_init__(self):
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
        return asdict(self)


def _fit(params: list[torch.nn.Parameter], modules: list[torch.nn.Module], ds: ImageSet, prep: Preprocess,
         cfg: TrainConfig, step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
         desc: str, progress: bool) -> list[dict[str, float]]:
    """SGD (Nesterov) with a one-cycle schedule. Returns the per-epoch mean of every loss term."""
    torch.manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(ds) / cfg.batch_size)
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15)
    history: list[dict[str, float]] = []
    for m in modules:
        m.train()
    for epoch in range(cfg.epochs):
        sums: dict[str, float] = {}
        n = 0
        t0 = time.perf_counter()
        bar = progress_bar(total=len(ds), desc=f"{desc} {epoch + 1}/{cfg.epochs}", unit="img", disable=not progress, leave=False)
        for x, y, idx in iterate_batches(ds, prep, cfg.batch_size, shuffle=True, seed=cfg.seed + epoch, augment=cfg.augment):
            terms = step(as_nchw(x), y, idx)  # the loader already does this; training never runs channels-last by accident
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
            bar.update(len(x))
            bar.set_postfix({k: f"{v / n:.3f}" for k, v in sums.items()}, refresh=False)
        bar.close()
        history.append({**{k: v / n for k, v in sums.items()}, "epoch": epoch + 1,
                        "img_per_s": n / (time.perf_counter() - t0)})
    for m in modules:
        m.eval()
    return history


def _prepare(ds: ImageSet, prep: Preprocess, cfg: TrainConfig) -> ImageSet:
    ds = ds.conform(prep)
    return ds.subset(cfg.limit) if cfg.limit and cfg.limit < len(ds) else ds


def train_cloud(cfg: TrainConfig, train_set: ImageSet, prep: Preprocess, *, progress: bool = True) -> Checkpoint:
    """Train the cloud embedding model with cross-entropy through its cosine classifier."""
    ds = _prepare(train_set, prep, cfg)
    torch.manual_seed(cfg.seed)
    spec = ModelSpec(cfg.model, cfg.dim, dict(cfg.model_kwargs))
    model = create_embedding_model(spec, prep.channels)
    classifier = CosineClassifier(cfg.dim, len(train_set.classes), cfg.scale, cfg.margin)

    def step(x, y, idx):
        return {"total": F.cross_entropy(classifier(model(x), y), y)}

    t0 = time.perf_counter()
    history = _fit(list(model.parameters()) + list(classifier.parameters()), [model, classifier], ds, prep, cfg,
                   step, "train-cloud", progress)
    ckpt = Checkpoint("cloud", spec, model, classifier, prep, train_set.classes, space="", config=cfg.to_dict())
    ckpt.space = ckpt.fingerprint
    ckpt.info = {"dataset": ds.name, "dataset_digest": ds.digest(), "history": history,
                 "train_seconds": time.perf_counter() - t0}
    return ckpt


def train_edge(cfg: TrainConfig, cloud: Checkpoint, train_set: ImageSet, *, progress: bool = True,
               init_state: dict[str, torch.Tensor] | None = None) -> Checkpoint:
    """Train an edge model into ``cloud``'s space (``cfg.compat``), or the control (own classifier, CE only).
    ``init_state``: starting weights of the model (e.g. a subnet extracted from a NAS supernet)."""
    if cloud.role != "cloud":
        raise HeteroError(f"--cloud must be a cloud checkpoint, got a {cloud.role} checkpoint ({cloud.path})")
    prep = cloud.preprocess
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
    if init_state is not None:
        try:
            model.load_state_dict(init_state, strict=True)
        except RuntimeError as e:
            raise HeteroError(f"the initial weights do not fit {cfg.model} ({str(e).splitlines()[0]})") from None
    t0 = time.perf_counter()
    if loss_fn is not None:
        frozen = cloud.classifier
        if frozen is not None:
            frozen.eval()
            frozen.requires_grad_(False)
        cloud.model.eval()
        cloud.model.requires_grad_(False)
        if not loss_fn.needs_cloud_emb:
            def target(x, idx):
                return None
        elif cfg.online_targets:
            def target(x, idx):
                with torch.no_grad():
                    return cloud.model(x)
        else:
            cached = cloud_targets(cloud, ds, progress=progress)  # read-only memory map

            def target(x, idx):
                return torch.from_numpy(cached[idx.numpy()])

        def step(x, y, idx):
            return loss_fn(model(x), y, target(x, idx), frozen)

        params = list(model.parameters()) + list(loss_fn.parameters())
        modules: list[torch.nn.Module] = [model, loss_fn]
        classifier = loss_fn.own_classifier
        role, space = "edge", cloud.space
    else:
        classifier = CosineClassifier(cfg.dim, len(train_set.classes), cfg.scale, cfg.margin)

        def step(x, y, idx):
            return {"total": F.cross_entropy(classifier(model(x), y), y)}

        params = list(model.parameters()) + list(classifier.parameters())
        modules = [model, classifier]
        role, space = "control", ""
    history = _fit(params, modules, ds, prep, cfg, step, "train-edge" if cfg.compat else "train-control", progress)
    ckpt = Checkpoint(role, spec, model, classifier, prep, train_set.classes, space=space, config=cfg.to_dict())
    if role == "control":
        ckpt.space = ckpt.fingerprint  # its own, unrelated space
    ckpt.info = {"dataset": ds.name, "dataset_digest": ds.digest(), "history": history,
                 "cloud_fingerprint": cloud.space, "cloud_checkpoint": str(cloud.path) if cloud.path else None,
                 "train_seconds": time.perf_counter() - t0}
    return ckpt

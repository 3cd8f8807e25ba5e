"""Compatibility losses, composed from small registered parts (pytorch-metric-learning style).

Every loss is built by ``LOSSES.create(name, ctx, **options)`` and called as
``loss(edge_emb, labels, cloud_emb, cloud_classifier) -> {term name: scalar tensor}``.
A loss may own parameters (``ce`` and ``logit_distill`` train their own classifier head), so
losses are ``nn.Module``s and the trainer optimises their parameters with the model's.
The objective is a weighted sum (:class:`WeightedLoss`); every term is logged.
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hetero.errors import HeteroError
from hetero.models.embedding import CosineClassifier
from hetero.registry import Registry


@dataclass(frozen=True)
class LossContext:
    """What a loss may need to build itself."""

    dim: int
    num_classes: int


LOSSES: Registry[nn.Module] = Registry("loss")


def _loss(name: str) -> Callable:
    """Register an ``nn.Module`` loss class whose ``__init__`` takes ``(ctx, **options)``."""
    def deco(cls):
        def factory(ctx: LossContext, **options: Any) -> nn.Module:
            try:
                return cls(ctx, **options)
            except TypeError as e:
                raise HeteroError(f"loss {name!r} does not take these options ({e}); see `hetero train-edge --help`") from None
            except (ValueError, OverflowError) as e:  # e.g. temperature="hot" reaching float()
                raise HeteroError(f"loss {name!r}: invalid option value ({e}); see `hetero train-edge --help`") from None

        LOSSES.register(name)(factory)
        cls.loss_name = name
        return cls

    return deco


def _need(x, what: str, fix: str):
    if x is None:
        raise HeteroError(f"{what}; {fix}")
    return x


@_loss("influence")
class InfluenceLoss(nn.Module):
    """BCT influence loss (Shen et al. 2020, eq. 3): cross-entropy of the edge embedding through the
    *frozen* cloud classifier, so edge features land where the cloud's class prototypes are.
    ``margin`` (CosFace-style, on the target cosine) overrides the classifier's own margin."""

    needs_cloud_emb = False

    def __init__(self, ctx: LossContext, margin: float | None = None):
        super().__init__()
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin)):
            raise HeteroError(f"influence margin must be a number, got {margin!r}")
        self.margin = margin

    def forward(self, edge_emb, labels, cloud_emb, cloud_classifier):
        clf = _need(cloud_classifier, "the influence loss needs the cloud model's classifier",
                    "run `hetero fit-classifier` on the cloud checkpoint, or use feature losses (alignment, contrastive, relational)")
        cos = clf.cosine(edge_emb)
        margin = clf.margin if self.margin is None else self.margin
        if margin:
            cos = cos - margin * F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return {"influence": F.cross_entropy(clf.scale * cos, labels)}


@_loss("alignment")
class AlignmentLoss(nn.Module):
    """Regress the edge embedding onto the cloud embedding of the same image (asymmetric: the
    cloud side is a fixed target, as in AML). ``kind="cosine"``: 1 - cos; ``kind="l2"``: squared
    Euclidean distance (for unit vectors this equals 2 * (1 - cos); kept for parity with papers)."""

    needs_cloud_emb = True

    def __init__(self, ctx: LossContext, kind: str = "cosine"):
        super().__init__()
        if kind not in ("cosine", "l2"):
            raise HeteroError(f"alignment kind must be 'cosine' or 'l2', got {kind!r}")
        self.kind = kind

    def forward(self, edge_emb, labels, cloud_emb, cloud_classifier):
        c = _need(cloud_emb, "the alignment loss needs cloud embeddings of the training images", "pass a cloud checkpoint")
        if self.kind == "cosine":
            value = (1.0 - F.cosine_similarity(edge_emb, c, dim=1)).mean()
        else:
            value = (edge_emb - c).pow(2).sum(1).mean()
        return {"alignment": value}


@_loss("contrastive")
class ContrastiveLoss(nn.Module):
    """Cross-model InfoNCE: edge embeddings are queries, the batch's cloud embeddings are keys.
    ``positives="image"``: the key of the same image is the one positive (CLIP-style);
    ``positives="label"``: every key with the query's label is positive (SupCon-style average)."""

    needs_cloud_emb = True

    def __init__(self, ctx: LossContext, temperature: float = 0.07, positives: str = "image"):
        super().__init__()
        if positives not in ("image", "label"):
            raise HeteroError(f"contrastive positives must be 'image' or 'label', got {positives!r}")
        if not temperature > 0:
            raise HeteroError(f"contrastive temperature must be > 0, got {temperature}")
        self.temperature, self.positives = float(temperature), positives

    def forward(self, edge_emb, labels, cloud_emb, cloud_classifier):
        c = _need(cloud_emb, "the contrastive loss needs cloud embeddings", "pass a cloud checkpoint")
        logits = F.normalize(edge_emb, dim=1) @ F.normalize(c, dim=1).t() / self.temperature
        if self.positives == "image":
            return {"contrastive": F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))}
        pos = (labels[:, None] == labels[None, :]).to(logits.dtype)
        log_prob = logits.log_softmax(dim=1)
        return {"contrastive": -((pos * log_prob).sum(1) / pos.sum(1)).mean()}


@_loss("relational")
class RelationalLoss(nn.Module):
    """Keep the cloud's neighbourhood structure (CSD-style, Wu et al. 2022): for each sample, the
    softmax over its similarities to the other cloud embeddings of the batch, at temperature
    ``temperature``, should be the same whether the anchor is the cloud or the edge embedding.
    KL(cloud || edge), restricted to the ``k`` nearest cloud neighbours when ``k`` is given."""

    needs_cloud_emb = True

    def __init__(self, ctx: LossContext, temperature: float = 0.1, k: int | None = None):
        super().__init__()
        if not temperature > 0:
            raise HeteroError(f"relational temperature must be > 0, got {temperature}")
        if k is not None and k < 1:
            raise HeteroError(f"relational k must be >= 1, got {k}")
        self.temperature, self.k = float(temperature), k

    def forward(self, edge_emb, labels, cloud_emb, cloud_classifier):
        c = _need(cloud_emb, "the relational loss needs cloud embeddings", "pass a cloud checkpoint")
        c = F.normalize(c, dim=1)
        s_cloud = c @ c.t()
        s_edge = F.normalize(edge_emb, dim=1) @ c.t()
        n = len(c)
        mask = torch.eye(n, dtype=torch.bool, device=c.device)  # a sample is not its own neighbour
        if self.k is not None and self.k < n - 1:
            kth = s_cloud.masked_fill(mask, -2.0).topk(self.k, dim=1).values[:, -1:]
            mask = mask | (s_cloud < kth)
        p_log = (s_cloud / self.temperature).masked_fill(mask, float("-inf")).log_softmax(1)
        q_log = (s_edge / self.temperature).masked_fill(mask, float("-inf")).log_softmax(1)
        kl = (p_log.exp() * (p_log - q_log)).masked_fill(mask, 0.0).sum(1)
        return {"relational": kl.mean()}


@_loss("ce")
class OwnClassifierLoss(nn.Module):
    """Plain classification through the trained model's *own* cosine classifier (no compatibility).
    With influence, this is BCT's full objective for a new cloud model: L_new + lambda * L_influence."""

    needs_cloud_emb = False

    def __init__(self, ctx: LossContext, scale: float = 16.0, margin: float = 0.0):
        super().__init__()
        self.classifier = CosineClassifier(ctx.dim, ctx.num_classes, scale, margin)

    def forward(self, edge_emb, labels, cloud_emb, cloud_classifier):
        return {"ce": F.cross_entropy(self.classifier(edge_emb, labels), labels)}


@_loss("logit_distill")
class LogitDistillLoss(nn.Module):
    """Plain knowledge distillation (Hinton et al. 2015): the model's own classifier matches the
    cloud's softened class probabilities; embeddings are never tied to the cloud's. The baseline
    that, per the literature, gives near-chance cross-model retrieval."""

    needs_cloud_emb = True

    def __init__(self, ctx: LossContext, temperature: float = 4.0, scale: float = 16.0):
        super().__init__()
        self.classifier = CosineClassifier(ctx.dim, ctx.num_classes, scale)
        self.temperature = float(temperature)

    def forward(self, edge_emb, labels, cloud_emb, cloud_classifier):
        clf = _need(cloud_classifier, "logit distillation needs the cloud model's classifier", "run `hetero fit-classifier` first")
        c = _need(cloud_emb, "logit distillation needs cloud embeddings", "pass a cloud checkpoint")
        t = self.temperature
        teacher = (clf(c) / t).softmax(1)
        student = (self.classifier(edge_emb) / t).log_softmax(1)
        return {"logit_distill": F.kl_div(student, teacher, reduction="batchmean") * t * t}


class WeightedLoss(nn.Module):
    """A weighted sum of registered losses; ``forward`` returns every term plus ``total``.

    ``options`` maps a loss name to its keyword options, e.g. ``{"contrastive": {"temperature": 0.1}}``.
    """

    def __init__(self, weights: Mapping[str, float], ctx: LossContext | None = None,
                 options: Mapping[str, Mapping[str, Any]] | None = None):
        super().__init__()
        if not isinstance(weights, Mapping) or not all(isinstance(k, str) for k in weights):
            raise HeteroError(f"losses must be name=weight pairs, e.g. --loss influence=1,alignment=1; got {weights!r:.80}")
        if not weights:
            raise HeteroError("no loss selected; give at least one loss with a weight, e.g. --loss influence=1,alignment=1")
        if options is not None and not isinstance(options, Mapping):
            raise HeteroError(f"loss options must map a loss name to its options, e.g. contrastive.temperature=0.1; got {options!r:.80}")
        options = dict(options or {})
        stray = set(options) - set(weights)
        if stray:
            raise HeteroError(f"options given for loss(es) not selected: {', '.join(sorted(stray))}; add them to --loss")
        ctx = ctx or LossContext(dim=0, num_classes=0)
        self.weights: dict[str, float] = {}
        self.parts = nn.ModuleDict()
        for name, w in weights.items():
            LOSSES.get(name)  # raises on an unknown name, listing the known ones
            try:
                w = float(w)
            except (TypeError, ValueError, OverflowError):
                raise HeteroError(f"loss weight for {name!r} must be a number, got {w!r}") from None
            if not (w >= 0 and math.isfinite(w)):
                raise HeteroError(f"loss weight for {name!r} must be a finite number >= 0, got {w}")
            opts = options.get(name, {})
            if not isinstance(opts, Mapping) or not all(isinstance(k, str) for k in opts):
                raise HeteroError(f"options for loss {name!r} must be name=value pairs, got {opts!r}")
            self.weights[name] = w
            self.parts[name] = LOSSES.create(name, ctx=ctx, **opts)

    @property
    def needs_classifier(self) -> bool:
        return any(n in self.weights for n in ("influence", "logit_distill"))

    @property
    def needs_cloud_emb(self) -> bool:
        """Whether any term reads the cloud embeddings of the batch (influence and ce do not, so
        training with them alone never runs the frozen cloud model)."""
        return any(part.needs_cloud_emb for part in self.parts.values())

    @property
    def own_classifier(self) -> CosineClassifier | None:
        """The trained model's own classifier, if a loss trains one (``ce`` first)."""
        for name in ("ce", "logit_distill"):
            if name in self.parts:
                return self.parts[name].classifier
        return None

    def forward(self, edge_emb, labels, cloud_emb=None, cloud_classifier=None) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        total = edge_emb.new_zeros(())
        for name, part in self.parts.items():
            for key, value in part(edge_emb, labels, cloud_emb, cloud_classifier).items():
                terms[key] = value
                total = total + self.weights[name] * value
        terms["total"] = total
        return terms


def influence_loss(edge_emb, labels, cloud_emb, cloud_classifier) -> dict[str, torch.Tensor]:
    """Functional form of :class:`InfluenceLoss` with the classifier's own margin."""
    return InfluenceLoss(LossContext(0, 0))(edge_emb, labels, cloud_emb, cloud_classifier)


def cosine_alignment_loss(edge_emb, labels, cloud_emb, cloud_classifier) -> dict[str, torch.Tensor]:
    """Functional form of :class:`AlignmentLoss` (cosine)."""
    return AlignmentLoss(LossContext(0, 0))(edge_emb, labels, cloud_emb, cloud_classifier)

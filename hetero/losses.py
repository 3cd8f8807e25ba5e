"""Compatibility losses. Each returns a dict of named terms; the objective is their weighted sum.

Signature of every loss: ``loss(edge_emb, labels, cloud_emb, cloud_classifier) -> {name: tensor}``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from hetero.errors import HeteroError
from hetero.models.embedding import CosineClassifier
from hetero.registry import Registry

LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", "CosineClassifier | None"], dict[str, torch.Tensor]]
LOSSES: Registry[LossFn] = Registry("loss")


def influence_loss(edge_emb, labels, cloud_emb, cloud_classifier) -> dict[str, torch.Tensor]:
    """BCT influence loss (Shen et al. 2020, eq. 3): cross-entropy of the edge embedding through the
    *frozen* cloud classifier, so edge features land where the cloud's class prototypes are."""
    if cloud_classifier is None:
        raise HeteroError("the influence loss needs the cloud model's classifier; use the alignment loss alone")
    return {"influence": F.cross_entropy(cloud_classifier(edge_emb, labels), labels)}


def cosine_alignment_loss(edge_emb, labels, cloud_emb, cloud_classifier) -> dict[str, torch.Tensor]:
    """1 - cos(edge, cloud) for the same image, averaged: pulls each edge embedding onto its cloud target."""
    if cloud_emb is None:
        raise HeteroError("the alignment loss needs cloud embeddings of the training images")
    return {"alignment": (1.0 - F.cosine_similarity(edge_emb, cloud_emb, dim=1)).mean()}


LOSSES.register("influence")(lambda: influence_loss)
LOSSES.register("alignment")(lambda: cosine_alignment_loss)


@dataclass(frozen=True)
class WeightedLoss:
    """A weighted sum of registered losses; ``__call__`` returns every term plus ``total``."""

    weights: Mapping[str, float]

    def __post_init__(self):
        if not self.weights:
            raise HeteroError("no loss selected; give at least one loss with a positive weight")
        for name, w in self.weights.items():
            LOSSES.get(name)  # raises on an unknown name
            if not w >= 0:
                raise HeteroError(f"loss weight for {name!r} must be >= 0, got {w}")

    def __call__(self, edge_emb, labels, cloud_emb=None, cloud_classifier=None) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        total = edge_emb.new_zeros(())
        for name, w in self.weights.items():
            for key, value in LOSSES.create(name)(edge_emb, labels, cloud_emb, cloud_classifier).items():
                terms[key] = value
                total = total + w * value
        terms["total"] = total
        return terms

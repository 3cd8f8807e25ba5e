"""Embedding model (backbone -> projection -> L2 norm) and the cosine classifier."""
from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hetero.errors import HeteroError
from hetero.models.external import create_external
from hetero.models.registry import create_backbone


MAX_DIM = 1 << 16  # a sanity bound: a damaged file must not ask for a 10^12-wide projection
KINDS = ("hetero", "torchvision", "factory")


@dataclass(frozen=True)
class ModelSpec:
    """JSON-serialisable description of an embedding model: enough to rebuild it before loading weights."""

    backbone: str
    dim: int = 128
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    # "hetero": a registered backbone + projection + L2 norm. "torchvision" (backbone = model name) or
    # "factory" (backbone = "module:callable"): a bring-your-own model whose output is the embedding.
    kind: str = "hetero"

    def __post_init__(self) -> None:
        try:
            dim = operator.index(self.dim)
        except TypeError:
            raise HeteroError(f"embedding dim must be a whole number, got {self.dim!r}") from None
        if isinstance(self.dim, bool) or not 2 <= dim <= MAX_DIM:
            raise HeteroError(f"embedding dim must be between 2 and {MAX_DIM}, got {self.dim!r}")
        object.__setattr__(self, "dim", dim)
        if self.kind not in KINDS:
            raise HeteroError(f"model kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.backbone, str) or not self.backbone:
            raise HeteroError(f"backbone must be a name, got {self.backbone!r}")
        if not isinstance(self.backbone_kwargs, dict) or not all(isinstance(k, str) for k in self.backbone_kwargs):
            raise HeteroError(f"model options must be name=value pairs, got {self.backbone_kwargs!r:.80}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        if not isinstance(d, dict) or not isinstance(d.get("backbone"), str) or not isinstance(d.get("backbone_kwargs", {}), dict):
            raise HeteroError(f"model description is malformed ({str(d)[:80]}); the checkpoint JSON is damaged")
        try:
            return cls(backbone=d["backbone"], dim=d.get("dim"), backbone_kwargs=dict(d.get("backbone_kwargs", {})),
                       kind=d.get("kind", "hetero"))
        except HeteroError as e:
            raise HeteroError(f"model description is malformed ({e}); the checkpoint JSON is damaged") from None


class EmbeddingModel(nn.Module):
    """backbone -> linear projection to ``dim`` -> L2 normalisation. Output [N, dim], float32, unit norm."""

    def __init__(self, backbone: nn.Module, dim: int):
        super().__init__()
        if dim < 2:
            raise HeteroError(f"embedding dim must be >= 2, got {dim}")
        self.backbone = backbone
        self.proj = nn.Linear(backbone.out_features, dim)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.backbone(x)), dim=1)


class ExternalEmbeddingModel(nn.Module):
    """A bring-your-own network whose output is taken as the embedding, then L2-normalised."""

    def __init__(self, net: nn.Module, dim: int):
        super().__init__()
        self.net = net
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return F.normalize(torch.flatten(out, 1), dim=1)


def create_embedding_model(spec: ModelSpec, in_channels: int) -> nn.Module:
    if spec.kind != "hetero":
        return ExternalEmbeddingModel(create_external(spec), spec.dim)
    kwargs = {**spec.backbone_kwargs, "in_channels": in_channels}
    return EmbeddingModel(create_backbone(spec.backbone, **kwargs), spec.dim)


class CosineClassifier(nn.Module):
    """Logits = s * cos(w_c, e), with an optional additive margin m on the target class (CosFace).

    The margin applies only when labels are given (training); frozen, this is the BCT "influence" head.
    """

    def __init__(self, dim: int, num_classes: int, scale: float = 16.0, margin: float = 0.0):
        super().__init__()
        if num_classes < 2:
            raise HeteroError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * dim**-0.5)
        self.scale = float(scale)
        self.margin = float(margin)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(emb, dim=1) @ F.normalize(self.weight, dim=1).t()

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosine(emb)
        if labels is not None and self.margin:
            cos = cos - self.margin * F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return self.scale * cos

    def config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "scale": self.scale, "margin": self.margin}

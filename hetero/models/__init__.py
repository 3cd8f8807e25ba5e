"""Backbones (registry), the embedding model and the cosine classifier."""
from hetero.models import mobilenet as _mobilenet  # noqa: F401  (registers backbones)
from hetero.models import resnet as _resnet  # noqa: F401
from hetero.nas import subnet as _nas  # noqa: F401  (registers nas_mbv3)
from hetero.models.embedding import CosineClassifier, EmbeddingModel, ModelSpec, create_embedding_model
from hetero.models.registry import BACKBONES, create_backbone, list_backbones, register_backbone

__all__ = [
    "BACKBONES",
    "CosineClassifier",
    "EmbeddingModel",
    "ModelSpec",
    "create_backbone",
    "create_embedding_model",
    "list_backbones",
    "register_backbone",
]

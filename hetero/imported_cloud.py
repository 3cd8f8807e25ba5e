"""Bring your own cloud model: ``import_cloud`` wraps a model hetero does not define
(:mod:`hetero.models.external`) with a declared embedding dim and preprocessing, frozen and
fingerprinted like a native cloud; ``fit_classifier`` gives it a cosine classifier on its frozen
embeddings so the influence loss works."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hetero.checkpoint import Checkpoint
from hetero.embed import cloud_targets
from hetero.errors import HeteroError
from hetero.models import CosineClassifier
from hetero.models.embedding import ExternalEmbeddingModel, ModelSpec
from hetero.models.external import (
    check_finite_weights,
    check_model_size,
    create_external,
    load_weights_file,
    trust_factory,
)


def import_cloud(kind: str, name: str, weights: str | Path, dim: int, prep, *, model_kwargs: dict[str, Any] | None = None,
                 classes: tuple[str, ...] = ()):
    """Wrap, load, check and freeze a BYO model as a cloud Checkpoint (no classifier yet)."""
    spec = ModelSpec(name, dim, dict(model_kwargs or {}), kind=kind)
    state = load_weights_file(weights)
    check_finite_weights(state, weights)
    check_model_size(spec, state, weights)
    model = ExternalEmbeddingModel(create_external(spec, trusted=True), dim)
    try:
        model.net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise HeteroError(f"--weights {weights} do not fit {name} ({first}); pass the weights of this architecture") from None
    model.eval().requires_grad_(False)
    x = torch.zeros((2, prep.channels, prep.size, prep.size))
    try:
        with torch.no_grad():
            raw = model.net(x)
    except Exception as e:  # the user's model rejects the declared input
        raise HeteroError(f"{name} fails on input [N, {prep.channels}, {prep.size}, {prep.size}] ({e.__class__.__name__}: "
                          f"{str(e).splitlines()[0][:150]}); check --channels and --size") from None
    if isinstance(raw, (tuple, list)):
        raw = raw[0]
    out_dim = int(np.prod(raw.shape[1:]))
    if out_dim != dim:
        raise HeteroError(f"{name} outputs {out_dim}-dim embeddings but --dim says {dim}; declare --dim {out_dim} "
                          "or give the model a projection to that size")
    ckpt = Checkpoint("cloud", spec, model, None, prep, tuple(classes), space="",
                      config={"imported": {"kind": kind, "name": name, "weights": str(weights)}})
    ckpt.space = ckpt.fingerprint
    if kind == "factory":  # the user typed it: checkpoints naming it may call it on this machine from now on
        trust_factory(name)
    return ckpt


def fit_classifier(cloud, train_set, *, epochs: int = 10, scale: float = 16.0, margin: float = 0.0,
                   lr: float = 0.05, batch_size: int = 1024, seed: int = 0, progress: bool = True):
    """Fit a cosine classifier on the cloud's frozen embeddings of ``train_set``. The embedding model is
    untouched; the returned checkpoint is a new space (the fingerprint covers the classifier)."""
    if epochs < 1:
        raise HeteroError(f"--epochs must be >= 1, got {epochs}")
    ds = train_set.conform(cloud.preprocess)
    emb = torch.from_numpy(np.array(cloud_targets(cloud, ds, progress=progress)))
    labels = torch.from_numpy(ds.labels.astype(np.int64))
    n_cls = len(train_set.classes)
    clf = CosineClassifier(cloud.spec.dim, n_cls, scale, margin)
    with torch.no_grad():  # start from the normalised class means
        for c in range(n_cls):
            sel = emb[labels == c]
            if len(sel):
                clf.weight[c] = F.normalize(sel.mean(0), dim=0)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(emb), generator=gen)
        for i in range(0, len(emb), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(clf(emb[idx], labels[idx]), labels[idx])
            if not math.isfinite(loss.item()):
                raise HeteroError("fitting the classifier diverged (NaN loss); lower --lr")
            opt.zero_grad()
            loss.backward()
            opt.step()
    clf.eval()
    with torch.no_grad():
        acc = float((clf(emb).argmax(1) == labels).float().mean())
    out = Checkpoint("cloud", cloud.spec, cloud.model, clf, cloud.preprocess, tuple(train_set.classes), space="",
                     config={**cloud.config, "fit_classifier": {"epochs": epochs, "scale": scale, "margin": margin, "lr": lr}},
                     info={**cloud.info, "classifier_train_accuracy": acc, "classifier_dataset": ds.name,
                           "classifier_seconds": time.perf_counter() - t0, "previous_space": cloud.space})
    out.space = out.fingerprint
    return out

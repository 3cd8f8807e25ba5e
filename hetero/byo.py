"""Bring your own cloud model: a torchvision model or a ``module:factory`` callable, weights from
safetensors or a ``.pt`` state dict (``torch.load(weights_only=True)``, never a full unpickle), a
declared embedding dim and preprocessing. The model is frozen and fingerprinted like a native one.
``fit_classifier`` gives it a cosine classifier on its frozen embeddings so the influence loss works.
"""
from __future__ import annotations

import importlib
import math
import pickle
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hetero.errors import HeteroError, require


TRUST_ENV = "HETERO_TRUSTED_FACTORIES"


def _trust_file() -> Path:
    from hetero.embed import cache_dir

    return cache_dir() / "trusted-factories.json"


def trusted_factories() -> set[str]:
    """Factories hetero may call when it rebuilds a checkpoint: those imported on this machine with
    ``hetero import-cloud --factory`` (recorded in the cache directory) and those listed, comma
    separated, in ``$HETERO_TRUSTED_FACTORIES``."""
    import json
    import os

    names = {n.strip() for n in os.environ.get(TRUST_ENV, "").split(",") if n.strip()}
    try:
        doc = json.loads(_trust_file().read_text())
        names |= {n for n in doc.get("factories", []) if isinstance(n, str)} if isinstance(doc, dict) else set()
    except (OSError, ValueError, RecursionError):
        pass
    return names


def trust_factory(name: str) -> None:
    """Record ``name`` (module:callable) as trusted on this machine (what import-cloud does)."""
    from hetero._atomic import write_json_atomic

    import json

    try:
        doc = json.loads(_trust_file().read_text())
        names = {n for n in doc.get("factories", []) if isinstance(n, str)} if isinstance(doc, dict) else set()
    except (OSError, ValueError, RecursionError):
        names = set()
    if name not in names:
        path = _trust_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"factories": sorted(names | {name}),
                                 "note": "module:callable factories `hetero import-cloud` was given on this machine"})


def create_external(spec, *, trusted: bool = False) -> nn.Module:
    """Build the network of a ``torchvision`` or ``factory`` ModelSpec (random init, nothing downloaded).

    A factory is code that a checkpoint's ``hetero.json`` names, so a checkpoint someone handed over
    could name anything: it is called only if ``trusted`` (import-cloud, where the user typed it) or
    listed by :func:`trusted_factories`."""
    kwargs = dict(spec.backbone_kwargs)
    if spec.kind == "torchvision":
        tv = require("torchvision", "byo")
        try:
            builder = tv.models.get_model_builder(spec.backbone)
        except ValueError:
            raise HeteroError(f"torchvision has no model {spec.backbone!r}; see torchvision.models.list_models()") from None
        try:
            return builder(weights=None, **kwargs)
        except TypeError as e:
            raise HeteroError(f"torchvision {spec.backbone} does not take these options ({e})") from None
    if spec.kind == "factory":
        module_name, _, attr = spec.backbone.partition(":")
        if not module_name or not attr:
            raise HeteroError(f"--factory must look like package.module:callable, got {spec.backbone!r}")
        _refuse_unsafe_module(spec.backbone, module_name)
        if not trusted and spec.backbone not in trusted_factories():
            raise HeteroError(f"this checkpoint builds its model by calling {spec.backbone} (named in its hetero.json), "
                              "which was not imported on this machine; if you trust its sender, add it to "
                              f"${TRUST_ENV} (or run `hetero import-cloud --factory {spec.backbone}` here)")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError, TypeError) as e:
            raise HeteroError(f"cannot import {spec.backbone} ({e}); check the module is importable (PYTHONPATH) and the name") from None
        _refuse_unsafe_callable(spec.backbone, fn)
        try:
            net = fn(**kwargs)
        except Exception as e:  # user code: any failure becomes one line
            raise HeteroError(f"{spec.backbone}(**{kwargs}) failed: {e.__class__.__name__}: {e}") from None
        if not isinstance(net, nn.Module):
            raise HeteroError(f"{spec.backbone} returned {type(net).__name__}, not a torch.nn.Module")
        return net
    raise HeteroError(f"unknown model kind {spec.kind!r}; the checkpoint is damaged")


# A checkpoint's hetero.json names its factory, so loading one calls module:callable(**kwargs) from a file
# someone may have handed over: the standard library and libraries that read or run files (os:system,
# numpy:load, torch.hub:load, ...) are refused; an nn.Module class or a function of your own module is fine.
_UNSAFE_PACKAGES = {"torch", "torchvision", "numpy", "pandas", "scipy", "joblib", "dill", "cloudpickle", "yaml",
                    "onnx", "onnxruntime", "coremltools", "safetensors", "hetero", "export", "devices", "pip",
                    "setuptools", "pkg_resources", "IPython", "matplotlib", "PIL", "requests", "urllib3", "fsspec",
                    "huggingface_hub", "transformers", "timm", "hypothesis", "pytest", "_pytest"}


def _refuse_unsafe_module(name: str, module_name: str) -> None:
    import sys

    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names or top in _UNSAFE_PACKAGES:
        if top in ("torch", "torchvision") and module_name.split(".")[:2] in (["torch", "nn"], ["torchvision", "models"]):
            return  # their nn.Module classes (checked once imported)
        raise HeteroError(f"--factory {name}: {top} is not a model factory module; refusing to call into it "
                          "(give a function of your own module, or an nn.Module class)")


def _refuse_unsafe_callable(name: str, fn: Any) -> None:
    import inspect

    if inspect.isclass(fn) and issubclass(fn, nn.Module):
        return
    if not inspect.isfunction(fn) or fn.__module__.split(".")[0] in _UNSAFE_PACKAGES:
        raise HeteroError(f"--factory {name} is not a Python function of your own module nor an nn.Module class; "
                          "refusing to call it")


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file loaded with ``weights_only=True``."""
    p = Path(path)
    if not p.is_file():
        raise HeteroError(f"--weights {path}: no such file")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise HeteroError(f"--weights {path} is not a readable safetensors file ({str(e)[:120]})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it then refuses anyway
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise HeteroError(f"--weights {path} holds pickled Python objects, not just tensors; refusing to unpickle it. "
                          "Save the state_dict with safetensors (safetensors.torch.save_file) instead") from None
    except Exception as e:  # zip/format errors from torch.load
        raise HeteroError(f"--weights {path} cannot be read as a torch state dict ({e.__class__.__name__}); "
                          "pass a .safetensors file or a torch.save(state_dict) file") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise HeteroError(f"--weights {path} is not a state dict of tensors; save model.state_dict()")
    return obj


def _check_no_nan(state: dict[str, torch.Tensor], path: str | Path) -> None:
    bad = next((k for k, v in state.items() if v.is_floating_point() and bool(torch.isnan(v).any())), None)
    if bad is not None:
        raise HeteroError(f"--weights {path}: tensor {bad!r} holds NaN values; pass weights from a run that did not diverge")


def import_cloud(kind: str, name: str, weights: str | Path, dim: int, prep, *, model_kwargs: dict[str, Any] | None = None,
                 classes: tuple[str, ...] = ()):
    """Wrap, load, check and freeze a BYO model as a cloud Checkpoint (no classifier yet)."""
    from hetero.checkpoint import Checkpoint
    from hetero.models.embedding import ExternalEmbeddingModel, ModelSpec

    spec = ModelSpec(name, dim, dict(model_kwargs or {}), kind=kind)
    model = ExternalEmbeddingModel(create_external(spec, trusted=True), dim)
    state = load_weights_file(weights)
    _check_no_nan(state, weights)
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
    from hetero.checkpoint import Checkpoint
    from hetero.embed import cloud_targets
    from hetero.models import CosineClassifier

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

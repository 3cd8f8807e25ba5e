"""Bring your own cloud model: a torchvision model or a ``module:factory`` callable, weights from
safetensors or a ``.pt`` state dict (``torch.load(weights_only=True)``, never a full unpickle), a
declared embedding dim and preprocessing. The model is frozen and fingerprinted like a native one.
``fit_classifier`` gives it a cosine classifier on its frozen embeddings so the influence loss works.
"""
from __future__ import annotations

import importlib
import json
import math
import os
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
TRUST_FILE = "trusted-factories.json"
# a BYO model larger than this is a typo or a hostile hetero.json, not a cloud model (ViT-g has 1e9)
MAX_PARAMS = 2_000_000_000


class FactoryError(HeteroError):
    """A ``module:callable`` factory raised while building its model."""


def trust_file() -> Path:
    """``$XDG_CONFIG_HOME/hetero/trusted-factories.json`` (``~/.config/hetero`` by default): the user's
    own configuration. Not the cache: that may be shared by several users or jobs, and whoever can
    write there must not be able to make hetero call a factory."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"  # relative: ignored (XDG)
    return root / "hetero" / TRUST_FILE


def _cache_trust_file() -> Path:
    """Where earlier versions kept the trust list (the cache directory): no longer read."""
    from hetero.embed import cache_dir

    return cache_dir() / TRUST_FILE


def _read_trust(path: Path) -> set[str]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return set()
    return {n for n in doc.get("factories", []) if isinstance(n, str)} if isinstance(doc, dict) else set()


def trusted_factories() -> set[str]:
    """Factories hetero may call when it rebuilds a checkpoint: those imported by this user with
    ``hetero import-cloud --factory`` (recorded in :func:`trust_file`) and those listed, comma
    separated, in ``$HETERO_TRUSTED_FACTORIES``."""
    names = {n.strip() for n in os.environ.get(TRUST_ENV, "").split(",") if n.strip()}
    return names | _read_trust(trust_file())


def trust_factory(name: str) -> None:
    """Record ``name`` (module:callable) as trusted by this user (what import-cloud does)."""
    from hetero._atomic import write_json_atomic

    path = trust_file()
    names = _read_trust(path)
    if name not in names:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_json_atomic(path, {"factories": sorted(names | {name}),
                                 "note": "module:callable factories `hetero import-cloud` was given by this user"})


def _untrusted(name: str) -> HeteroError:
    msg = (f"this checkpoint builds its model by calling {name} (named in its hetero.json), which was not imported "
           f"on this machine; if you trust its sender, add it to ${TRUST_ENV} (or run `hetero import-cloud --factory "
           f"{name}` here)")
    old = _cache_trust_file()
    if old.is_file():
        msg += (f"; {old} is no longer honoured (a trust list in the shared cache lets anyone who can write there "
                f"trust a factory): re-run import-cloud to record it in {trust_file()}")
    return HeteroError(msg)


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
            raise _untrusted(spec.backbone)
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError, TypeError) as e:
            raise HeteroError(f"cannot import {spec.backbone} ({e}); check the module is importable (PYTHONPATH) and the name") from None
        _refuse_unsafe_callable(spec.backbone, fn)
        try:
            net = fn(**kwargs)
        except Exception as e:  # user code: any failure becomes one line
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise FactoryError(f"{spec.backbone}(**{kwargs}) failed: {e.__class__.__name__}: {first}") from None
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


def _torch_version() -> tuple[int, int]:
    major, minor = (torch.__version__.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


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
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else e.__class__.__name__
            raise HeteroError(f"--weights {path} is not a readable safetensors file ({first})") from None
    if _torch_version() < (2, 6):  # CVE-2025-32434: weights_only=True does not stop code in a crafted file
        raise HeteroError(f"--weights {path}: torch {torch.__version__} cannot read a .pt file safely (torch < 2.6 "
                          "runs code hidden in one despite weights_only=True); upgrade torch, or pass .safetensors")
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


def _check_finite(state: dict[str, torch.Tensor], path: str | Path) -> None:
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            what = "NaN" if bool(torch.isnan(v).any()) else "Inf"
            raise HeteroError(f"--weights {path}: tensor {k!r} holds {what} values; pass weights from a run that "
                              "did not diverge")


def _check_size(spec, state: dict[str, torch.Tensor], weights: str | Path) -> None:
    """Refuse, before the model is allocated, one larger than :data:`MAX_PARAMS` or than the weights
    given for it: its options are a typo (num_classes=50000000). Counted on the meta device."""
    try:
        with torch.device("meta"):
            net = create_external(spec, trusted=True)
    except FactoryError:
        return  # user code that cannot build on the meta device: the weights' strict fit checks it instead
    n = sum(t.numel() for t in net.state_dict().values())
    have = sum(t.numel() for t in state.values())
    what = f"{spec.backbone} with options {dict(spec.backbone_kwargs)}"
    if n > have:
        raise HeteroError(f"--weights {weights} do not fit {what}: it has {n:,} weights, the file {have:,}; pass the "
                          "weights of this architecture, or check --model-kwargs")
    if n > MAX_PARAMS:
        raise HeteroError(f"{what} has {n:,} weights, more than the {MAX_PARAMS:,} hetero accepts; check --model-kwargs")


def import_cloud(kind: str, name: str, weights: str | Path, dim: int, prep, *, model_kwargs: dict[str, Any] | None = None,
                 classes: tuple[str, ...] = ()):
    """Wrap, load, check and freeze a BYO model as a cloud Checkpoint (no classifier yet)."""
    from hetero.checkpoint import Checkpoint
    from hetero.models.embedding import ExternalEmbeddingModel, ModelSpec

    spec = ModelSpec(name, dim, dict(model_kwargs or {}), kind=kind)
    state = load_weights_file(weights)
    _check_finite(state, weights)
    _check_size(spec, state, weights)
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

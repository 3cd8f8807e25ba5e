"""Models hetero does not define (bring your own cloud model): a torchvision model or a
``module:factory`` callable, built only when trusted, and weights from safetensors or a ``.pt`` state
dict (``torch.load(weights_only=True)``, never a full unpickle), checked for size and finite values.
:mod:`hetero.imported_cloud` turns one into a cloud checkpoint.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from hetero._atomic import write_json_atomic
from hetero.errors import HeteroError, require
from hetero.locations import cache_dir, config_dir

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
    return config_dir() / TRUST_FILE


def _cache_trust_file() -> Path:
    """Where earlier versions kept the trust list (the cache directory): no longer read."""
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
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names or top in _UNSAFE_PACKAGES:
        if top in ("torch", "torchvision") and module_name.split(".")[:2] in (["torch", "nn"], ["torchvision", "models"]):
            return  # their nn.Module classes (checked once imported)
        raise HeteroError(f"--factory {name}: {top} is not a model factory module; refusing to call into it "
                          "(give a function of your own module, or an nn.Module class)")


def _refuse_unsafe_callable(name: str, fn: Any) -> None:
    if inspect.isclass(fn) and issubclass(fn, nn.Module):
        return
    if not inspect.isfunction(fn) or fn.__module__.split(".")[0] in _UNSAFE_PACKAGES:
        raise HeteroError(f"--factory {name} is not a Python function of your own module nor an nn.Module class; "
                          "refusing to call it")


def _torch_version() -> tuple[int, int]:
    major, minor = (torch.__version__.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def load_weights_file(path: str | Path, flag: str = "--weights") -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file loaded with ``weights_only=True``; errors name ``flag``."""
    p = Path(path)
    if not p.is_file():
        raise HeteroError(f"{flag} {path}: no such file")
    if p.suffix == ".safetensors":
        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else e.__class__.__name__
            raise HeteroError(f"{flag} {path} is not a readable safetensors file ({first})") from None
    if _torch_version() < (2, 6):  # CVE-2025-32434: weights_only=True does not stop code in a crafted file
        raise HeteroError(f"{flag} {path}: torch {torch.__version__} cannot read a .pt file safely (torch < 2.6 "
                          "runs code hidden in one despite weights_only=True); upgrade torch, or pass .safetensors")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it then refuses anyway
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise HeteroError(f"{flag} {path} holds pickled Python objects, not just tensors; refusing to unpickle it. "
                          "Save the state_dict with safetensors (safetensors.torch.save_file) instead") from None
    except Exception as e:  # zip/format errors from torch.load
        raise HeteroError(f"{flag} {path} cannot be read as a torch state dict ({e.__class__.__name__}); "
                          "pass a .safetensors file or a torch.save(state_dict) file") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise HeteroError(f"{flag} {path} is not a state dict of tensors; save model.state_dict()")
    return obj


def check_finite_weights(state: dict[str, torch.Tensor], path: str | Path, flag: str = "--weights") -> None:
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            what = "NaN" if bool(torch.isnan(v).any()) else "Inf"
            raise HeteroError(f"{flag} {path}: tensor {k!r} holds {what} values; pass weights from a run that "
                              "did not diverge")


def check_model_size(spec, state: dict[str, torch.Tensor], weights: str | Path) -> None:
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

"""ImageNet weights for a library backbone (``--pretrained FILE|NAME``, ``tv:``/``timm:`` models only).

FILE: a state dict file, safetensors or a torch file read with ``weights_only=True`` (never unpickled),
in the library model's own keys as torchvision and timm save them, classifier included. NAME: the
library's own weights (torchvision: ``DEFAULT``, ``IMAGENET1K_V1``, ...; timm: ``true``/``DEFAULT`` or
a pretrained tag), read from the library's cache only (torchvision: ``$TORCH_HOME/hub/checkpoints``;
timm: the Hugging Face cache), never over the network: nothing waits on a timeout, and where they are
not cached the error says where to put them, or to pass a FILE.

The classifier the headless model lacks is left out; a first convolution for another channel count is
adapted as timm does it (1 channel: the sum over RGB; C channels: RGB repeated, scaled by 3/C); any
other difference is refused in one line naming the first missing and unexpected keys.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from hetero.errors import HeteroError, require
from hetero.models.external import check_finite_weights, load_weights_file
from hetero.models.library import TIMM, TORCHVISION, LibraryBackbone, is_library, library_defaults

FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
DEFAULT_NAMES = ("default", "true", "imagenet")


@dataclass(frozen=True)
class PretrainedFile:
    """Where the weights are, and what a checkpoint records of them: ``source`` (as given), ``file``
    (its name), ``sha256``, and for library weights ``weights`` (the library's name for them)."""

    path: Path
    record: dict[str, Any]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _torch_cache(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _torchvision_cached(model: str, name: str) -> tuple[Path, str]:
    tv, short = require("torchvision", "byo"), model[len(TORCHVISION):]
    enum = tv.models.get_model_weights(short)
    key = "DEFAULT" if name.lower() in DEFAULT_NAMES else name.rpartition(".")[2]  # also Enum_Weights.NAME
    try:
        w = enum[key]
    except KeyError:
        raise HeteroError(f"torchvision has no weights {name!r} for {short}; choose DEFAULT or one of "
                          f"{', '.join(enum.__members__)}, or pass --pretrained FILE") from None
    file, what = _torch_cache(w.url), f"{type(w).__name__}.{w.name}"
    if not file.is_file():
        raise HeteroError(f"torchvision weights {what} are not in torchvision's cache ({file}) and hetero does not "
                          f"download them; fetch {w.url} into {file.parent} where there is a network, or pass "
                          "--pretrained FILE (a state dict file)")
    return file, f"torchvision:{what}"


def _timm_cached(model: str, name: str) -> tuple[Path, str]:
    timm, short = require("timm", "timm"), model[len(TIMM):]
    arch, _, tag = short.partition(".")
    tag = tag if name.lower() in DEFAULT_NAMES else name
    try:
        cfg = timm.models.get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
        raise HeteroError(f"timm has no pretrained weights {name!r} for {arch}; choose true"
                          f"{' or a tag: ' + ', '.join(tags[:8]) if tags else ' (it has none)'}, or pass --pretrained FILE")
    what = f"{arch}.{cfg.tag}" if cfg.tag else arch
    if cfg.hf_hub_id:
        hub = require("huggingface_hub", "timm")
        for fn in dict.fromkeys((cfg.hf_hub_filename or "model.safetensors", "model.safetensors", "pytorch_model.bin")):
            found = hub.try_to_load_from_cache(cfg.hf_hub_id, fn)  # a look in the cache folder: no network
            if isinstance(found, str):
                return Path(found), f"timm:{what}"
        raise HeteroError(f"timm weights {what} are not in the Hugging Face cache ({hub.constants.HF_HUB_CACHE}) and "
                          f"hetero does not download them; fetch them where there is a network (huggingface-cli download "
                          f"{cfg.hf_hub_id}) and copy the cache here, or pass --pretrained FILE (a state dict file)")
    file = Path(cfg.file) if cfg.file else _torch_cache(cfg.url)
    if not file.is_file():
        raise HeteroError(f"timm weights {what} are not in the cache ({file}) and hetero does not download them; "
                          f"fetch {cfg.url or cfg.file} there where there is a network, or pass --pretrained FILE")
    return file, f"timm:{what}"


def find_pretrained(model: str, source: str | Mapping[str, Any]) -> PretrainedFile:
    """Resolve ``--pretrained`` for the backbone ``model`` without reading the weights: a file, or the
    library's cached weights by name. ``source`` may be the record of an earlier run (its config's
    ``pretrained``): the same source again, refused if the file's sha256 changed."""
    if not is_library(model):
        raise HeteroError(f"--pretrained starts a tv:NAME or timm:NAME backbone from ImageNet weights; {model!r} is "
                          "hetero's own, with none: leave out --pretrained, or choose e.g. --model tv:mobilenet_v3_small")
    expected = None
    if isinstance(source, Mapping):
        expected, source = source.get("sha256"), source.get("source")
    if not isinstance(source, str) or not source.strip():
        raise HeteroError(f"--pretrained must be a weights file or a weight name such as DEFAULT, got {source!r:.80}")
    library_defaults(model)  # an unknown name: the close matches, before anything else
    p = Path(source).expanduser()
    if p.is_file() or p.suffix.lower() in FILE_SUFFIXES or "/" in source or "\\" in source:
        if not p.is_file():
            raise HeteroError(f"--pretrained {source}: no such file; pass a state dict file (.safetensors, or .pt read "
                              "with weights_only) or a weight name such as DEFAULT")
        path, weights = p, None
    else:
        path, weights = (_torchvision_cached if model.startswith(TORCHVISION) else _timm_cached)(model, source)
    sha = _sha256(path)
    if expected is not None and sha != expected:
        raise HeteroError(f"--pretrained {source} has changed since the run that recorded it (sha256 {sha[:12]}, "
                          f"recorded {str(expected)[:12]}); restore that file, or pass --pretrained again to use this one")
    return PretrainedFile(path, {"source": source, "file": path.name, "sha256": sha,
                                 **({"weights": weights} if weights else {})})


def _adapt_first_conv(w: torch.Tensor, channels: int) -> torch.Tensor:
    """RGB filters for ``channels`` input channels, as timm's adapt_input_conv: summed for one channel,
    else repeated and scaled so the response to a grey image keeps its size."""
    if channels == 1:
        return w.sum(dim=1, keepdim=True)
    reps = math.ceil(channels / w.shape[1])
    return w.repeat(1, reps, 1, 1)[:, :channels] * (w.shape[1] / channels)


def _few(keys: list[str]) -> str:
    # stable: weights first (they name the layers), buffers such as num_batches_tracked last
    keys = sorted(keys, key=lambda k: (not k.endswith(".weight"), k.endswith("num_batches_tracked")))
    return (", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")) if keys else "none"


def fit_state(backbone: LibraryBackbone, state: Mapping[str, torch.Tensor], what: str) -> tuple[dict[str, torch.Tensor],
                                                                                                list[str], list[str]]:
    """``state`` (library keys) made to fit ``backbone.net``: (state, keys left out, keys adapted)."""
    own = backbone.net.state_dict()
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    head = tuple(f"{c}." for c in backbone.classifier)
    left_out = sorted(k for k in state if k not in own and k.startswith(head))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and k not in left_out]
    if missing or unexpected:
        raise HeteroError(f"{what} does not fit {backbone.library_name}: missing keys {_few(missing)}; unexpected keys "
                          f"{_few(unexpected)}; pass the weights of this architecture (its library's own keys)")
    firsts = {f"{c}.weight" for c in backbone.first_conv}
    fitted, adapted, wrong = {}, [], []
    for k, mine in own.items():
        v = state[k]
        if v.shape != mine.shape and k in firsts and v.dim() == 4 and v.shape[0] == mine.shape[0] \
                and v.shape[2:] == mine.shape[2:]:
            v = _adapt_first_conv(v, mine.shape[1]).to(mine.dtype)
            adapted.append(k)
        elif v.shape != mine.shape:
            wrong.append(f"{k} {tuple(v.shape)} vs {tuple(mine.shape)}")
        fitted[k] = v
    if wrong:
        raise HeteroError(f"{what} does not fit {backbone.library_name}: shapes differ (file vs model) for "
                          f"{_few(wrong)}; pass the weights of this architecture and options (--model-kwargs)")
    return fitted, left_out, adapted


def load_pretrained(model: nn.Module, name: str, source: str | Mapping[str, Any]) -> dict[str, Any]:
    """Load ``--pretrained`` ``source`` into ``model``'s library backbone (``model`` may be the embedding
    model or its backbone; ``name``: its backbone name) and return the record of what was loaded, for the
    config: source, file, sha256 (, weights), and the keys left out (the classifier) or adapted (the
    first convolution, for another channel count)."""
    found = find_pretrained(name, source)
    backbone = getattr(model, "backbone", model)
    if not isinstance(backbone, LibraryBackbone):
        raise HeteroError(f"--pretrained needs a tv:NAME or timm:NAME backbone; {name!r} is not one")
    what = f"--pretrained {found.record['source']}"
    state = load_weights_file(found.path, flag="--pretrained")
    check_finite_weights(state, found.path, flag="--pretrained")
    fitted, left_out, adapted = fit_state(backbone, state, what)
    backbone.net.load_state_dict(fitted, strict=True)
    return {**found.record, "left_out": left_out, "adapted": adapted}


def describe(record: Mapping[str, Any], name: str) -> str:
    """One log line: what a run started from."""
    src = record.get("weights") or record.get("file")
    out = f"pretrained: {name} starts from {src} (sha256 {str(record.get('sha256'))[:12]})"
    if record.get("left_out"):
        out += f"; left out {', '.join(record['left_out'])} (the classifier hetero's head replaces)"
    if record.get("adapted"):
        out += f"; adapted {', '.join(record['adapted'])} to this channel count (timm's rule: RGB summed or repeated)"
    return out

"""Checkpoints: a directory with ``weights.safetensors`` and ``hetero.json`` (no pickle, ever).

``hetero.json`` holds the model description, preprocessing, classes, the training config, the
sha256 of the weights file (checked on load) and the **space fingerprint**: the cloud embedding
space the model's embeddings live in. A cloud model defines its own space; an edge model records
the fingerprint of the cloud it was trained into; a control model is its own space.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from devices.schema import CHECKPOINT_FILE, CHECKPOINT_FORMAT, WEIGHTS_FILE
from hetero._atomic import atomic_dir, check_output_dest, sha256_file, write_json_atomic
from hetero.data import Preprocess
from hetero.errors import HeteroError
from hetero.models import CosineClassifier, EmbeddingModel, ModelSpec, create_embedding_model
from hetero.models.external import FactoryError

FORMAT = CHECKPOINT_FORMAT
VERSION = 1
WEIGHTS = WEIGHTS_FILE
META = CHECKPOINT_FILE
ROLES = ("cloud", "edge", "control")
OWN_SPACE = ("cloud", "control")  # roles whose space is their own fingerprint (an edge's is its cloud's)


def fingerprint(model: EmbeddingModel, classifier: CosineClassifier | None, prep: Preprocess) -> str:
    """sha256 over the weights (and buffers) in sorted-name order, each as name, dtype, shape, bytes,
    followed by the canonical JSON of dim, classifier config and preprocessing."""
    h = hashlib.sha256()
    tensors = _state(model, classifier)
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    extra = {"dim": model.dim, "classifier": classifier.config() if classifier else None, "preprocess": prep.to_dict()}
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


def _state(model: EmbeddingModel, classifier: CosineClassifier | None) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    if classifier is not None:
        state.update({f"classifier.{k}": v for k, v in classifier.state_dict().items()})
    return state


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model, its optional classifier and the metadata."""

    role: str
    spec: ModelSpec
    model: EmbeddingModel
    classifier: CosineClassifier | None
    preprocess: Preprocess
    classes: tuple[str, ...]
    space: str  # fingerprint of the embedding space the model lives in
    config: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def fingerprint(self) -> str:
        """Fingerprint of this model's own weights (equals ``space`` for a cloud model)."""
        return fingerprint(self.model, self.classifier, self.preprocess)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.preprocess.channels, self.preprocess.size, self.preprocess.size)


def legacy_checkpoint_kind(d: Path) -> str | None:
    """'<role> checkpoint' for a checkpoint written before output markers (its hetero.json says so)."""
    try:
        meta = json.loads((d / META).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("role") in ROLES:
        return f"{meta['role']} checkpoint"
    return None


def check_checkpoint_dest(dest: str | Path, role: str, overwrite: bool) -> None:
    """Before any work: ``dest`` may be new, or (with ``overwrite``) an earlier checkpoint of this role."""
    check_output_dest(dest, f"{role} checkpoint", overwrite, legacy_checkpoint_kind)


def save_checkpoint(ckpt: Checkpoint, dest: str | Path, overwrite: bool = False) -> Path:
    """Write atomically: a reader sees the old checkpoint or the complete new one, never half of one."""
    if ckpt.role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    dest = Path(dest)
    with atomic_dir(dest, f"{ckpt.role} checkpoint", overwrite, legacy_checkpoint_kind) as tmp:
        state = {k: v.detach().to("cpu").contiguous() for k, v in _state(ckpt.model, ckpt.classifier).items()}
        try:
            save_file(state, str(tmp / WEIGHTS))
        except SafetensorError as e:  # e.g. a full disk; the message says which
            raise HeteroError(f"cannot write {dest / WEIGHTS} ({str(e).strip().splitlines()[0]})") from None
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "role": ckpt.role,
            "model": ckpt.spec.to_dict(),
            "classifier": ckpt.classifier.config() if ckpt.classifier is not None else None,
            "preprocess": ckpt.preprocess.to_dict(),
            "classes": list(ckpt.classes),
            "space": ckpt.space,
            "fingerprint": ckpt.fingerprint,
            "weights_sha256": sha256_file(tmp / WEIGHTS),
            "config": ckpt.config,
            "info": ckpt.info,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(tmp / META, meta)
    ckpt.path = dest
    return dest


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file() and p.name in (META, WEIGHTS):
        p = p.parent
    if not p.exists():
        raise HeteroError(f"checkpoint {path} does not exist; pass a directory written by `hetero train-cloud` or `hetero train-edge`")
    if not (p / META).is_file():
        raise HeteroError(f"{path} is not a hetero checkpoint (no {META}); pass a directory written by `hetero train-cloud` or `hetero train-edge`")
    return p


def load_checkpoint(path: str | Path, role: str | tuple[str, ...] | None = None) -> Checkpoint:
    """Load and verify a checkpoint: JSON format, weights hash, tensor names and shapes, fingerprint."""
    p = _resolve(path)
    try:
        meta = json.loads((p / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise HeteroError(f"{p / META} is not valid JSON ({e.__class__.__name__}); the checkpoint is corrupt, re-train or re-copy it") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise HeteroError(f"{p} is not a hetero checkpoint ({META} has no format={FORMAT!r})")
    if meta.get("version") != VERSION:
        raise HeteroError(f"{p}: checkpoint version {meta.get('version')} is not supported (expected {VERSION}); upgrade hetero")
    roles = (role,) if isinstance(role, str) else role
    if meta.get("role") not in ROLES:
        raise HeteroError(f"{p}: {META} has role {meta.get('role')!r}, not one of {', '.join(ROLES)}; the checkpoint is corrupt")
    for key, kind in (("classes", list), ("config", dict), ("info", dict), ("space", str), ("fingerprint", str)):
        if key in meta and not isinstance(meta[key], kind):
            raise HeteroError(f"{p}: {META} field {key!r} must be a {kind.__name__}; the checkpoint is corrupt")
    if not all(isinstance(c, str) for c in meta.get("classes", ())):
        raise HeteroError(f"{p}: {META} classes must be names; the checkpoint is corrupt")
    if roles and meta.get("role") not in roles:
        raise HeteroError(f"{p} is a {meta.get('role')} checkpoint, expected {' or '.join(roles)}")
    wpath = p / WEIGHTS
    if not wpath.is_file():
        raise HeteroError(f"{p} has no {WEIGHTS}; the checkpoint is incomplete, re-train or re-copy it")
    if sha256_file(wpath) != meta.get("weights_sha256"):
        raise HeteroError(f"{wpath} does not match the sha256 in {META}; the file is corrupt or was replaced, re-train or re-copy it")
    try:
        spec = ModelSpec.from_dict(meta["model"])
        prep = Preprocess.from_dict(meta["preprocess"])
        c = meta.get("classifier")
        if c is not None and not isinstance(c, dict):
            raise TypeError("classifier must be an object or null")

        def build():
            clf = CosineClassifier(spec.dim, int(c["num_classes"]), float(c["scale"]), float(c["margin"])) if c else None
            return create_embedding_model(spec, prep.channels), clf

        # shapes first, on the meta device: a damaged or hostile hetero.json (num_classes=50000000, a BYO
        # factory's dim=10**9) must not allocate anything before it is found not to fit the weights file
        with safe_open(str(wpath), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        want = _meta_shapes(build, spec)
        if want is None:  # a BYO factory that cannot build on the meta device: its integer options are bounded
            _bound_kwargs(spec, shapes, p)
        elif want != shapes:
            diff = sorted(set(want) ^ set(shapes)) or sorted(k for k in want if want[k] != shapes[k])
            raise HeteroError(f"{p}: {WEIGHTS} does not fit the model {META} describes (first difference: "
                              f"{diff[0]}); the checkpoint is corrupt")
        model, classifier = build()
        state = load_file(str(wpath))
    except (SafetensorError, KeyError, TypeError, ValueError, OverflowError, RuntimeError, MemoryError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise HeteroError(f"{p}: cannot rebuild the model ({first}); the checkpoint is corrupt") from None
    bad = _non_finite(state)
    if bad is not None:
        raise HeteroError(f"{p}: weight {bad[0]!r} holds {bad[1]} values (training diverged?); re-train with a lower --lr")
    model_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    cls_state = {k[len("classifier."):]: v for k, v in state.items() if k.startswith("classifier.")}
    try:
        model.load_state_dict(model_state, strict=True)
        if classifier is not None:
            classifier.load_state_dict(cls_state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise HeteroError(f"{p}: weights do not fit the described model ({first}); the checkpoint is corrupt") from None
    model.eval()
    ckpt = Checkpoint(
        role=meta["role"], spec=spec, model=model, classifier=classifier, preprocess=prep,
        classes=tuple(meta.get("classes", ())), space=str(meta.get("space", "")),
        config=meta.get("config", {}), info=meta.get("info", {}), path=p,
    )
    fp = ckpt.fingerprint
    if fp != meta.get("fingerprint"):
        raise HeteroError(f"{p}: weights fingerprint differs from the one recorded; the checkpoint is corrupt")
    if ckpt.role in OWN_SPACE:  # its space is its fingerprint: recomputed here, never taken from hetero.json
        if ckpt.space != fp:
            raise HeteroError(f"{p}: {META} claims space {ckpt.space[:12] or '(none)'}, but its weights are space "
                              f"{fp[:12]}; the field was edited or copied from another checkpoint, so do not use it: "
                              "re-copy the original checkpoint or re-train it")
        ckpt.space = fp
    return ckpt


def _non_finite(state: dict[str, torch.Tensor]) -> tuple[str, str] | None:
    """(name, 'NaN' or 'Inf') of the first floating-point tensor that is not all finite."""
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return k, "NaN" if bool(torch.isnan(v).any()) else "Inf"
    return None


def _meta_shapes(build, spec: ModelSpec) -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes of the model ``build()`` makes, built on the meta device (nothing allocated); None
    for a BYO factory that fails there (user code may need real tensors to construct itself)."""
    try:
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in _state(*build()).items()}
    except FactoryError:
        if spec.kind != "factory":
            raise
        return None


def _bound_kwargs(spec: ModelSpec, shapes: dict[str, tuple[int, ...]], p: Path) -> None:
    """No integer option of a BYO factory larger than the weights file's element count: a model whose
    width, class count or depth exceeds the number of weights it has is a hetero.json someone edited."""
    total = max(sum(math.prod(s) for s in shapes.values()), 1 << 16)

    def ints(v):
        if isinstance(v, bool):
            return
        if isinstance(v, int):
            yield v
        elif isinstance(v, (list, tuple)):
            for x in v:
                yield from ints(x)
        elif isinstance(v, dict):
            for x in v.values():
                yield from ints(x)

    for k, v in spec.backbone_kwargs.items():
        if any(abs(n) > total for n in ints(v)):
            raise HeteroError(f"{p}: {META} gives {spec.backbone} {k}={v!r}, more than the {total} weights in "
                              f"{WEIGHTS} could fit; the checkpoint is corrupt")


def check_same_space(edge: Checkpoint, cloud: Checkpoint) -> None:
    """Refuse to compare an edge model with a cloud it was not trained against."""
    if edge.space != cloud.space:
        raise HeteroError(
            f"edge checkpoint {edge.path} lives in cloud space {edge.space[:12]}, but the given cloud {cloud.path} is "
            f"{cloud.space[:12]}; pass the cloud checkpoint it was trained with (train-edge --cloud)"
        )

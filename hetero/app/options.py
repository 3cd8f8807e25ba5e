"""Options as people write them (``a=1,b=2``, a TOML/JSON file, ``0.5,0.4,0.3``) turned into values,
and the resolved training configuration: shared by the CLI, the Python API and the benchmarks."""
from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hetero._resume import plain
from hetero.errors import HeteroError
from hetero.train import TrainConfig


def load_config_file(path: str | Path | None) -> dict[str, Any]:
    """The table of training options in a TOML or JSON file (``{}`` for no file)."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise HeteroError(f"--config {path}: no such file; pass a TOML or JSON file of training options")
    try:
        text = p.read_text(encoding="utf-8")
        doc = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (ValueError, TypeError, RecursionError, OSError) as e:
        raise HeteroError(f"--config {path} cannot be parsed ({str(e).splitlines()[0] if str(e) else type(e).__name__}); fix the file") from None
    if not isinstance(doc, dict):
        raise HeteroError(f"--config {path} must hold a table (JSON object) of training options, got {type(doc).__name__}")
    return doc


def parse_kv(text: str | None, what: str) -> dict[str, Any] | None:
    """'a=1,b=2' -> {'a': 1, 'b': 2} (values read as JSON where they parse, else strings); a JSON
    object is accepted too. ``what`` names the option in errors."""
    if text is None:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            return dict(json.loads(text))
        except (ValueError, RecursionError) as e:
            raise HeteroError(f"{what}: invalid JSON ({type(e).__name__}: {str(e)[:100]})") from None
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise HeteroError(f"{what}: expected name=value pairs separated by commas, got {part!r}")
        k, v = part.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except (ValueError, RecursionError):
            out[k.strip()] = v.strip()
    return out


def nest(flat: dict[str, Any] | None) -> dict[str, dict[str, Any]] | None:
    """{'contrastive.temperature': 0.1} -> {'contrastive': {'temperature': 0.1}}."""
    if flat is None:
        return None
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if isinstance(value, dict):
            out.setdefault(key, {}).update(value)
            continue
        if "." not in key:
            raise HeteroError(f"--loss-options: expected loss.option=value (e.g. contrastive.temperature=0.1), got {key!r}")
        loss, opt = key.split(".", 1)
        out.setdefault(loss, {})[opt] = value
    return out


def floats(text: str, what: str, n: int) -> tuple[float, ...]:
    """'0.5' or '0.5,0.4,0.3' -> n floats (one value is repeated n times)."""
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise HeteroError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if len(vals) == 1:
        vals = vals * n
    if len(vals) != n:
        raise HeteroError(f"{what} needs 1 or {n} values (one per channel), got {len(vals)}")
    return vals


def int_list(text: str, what: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32): sorted, unique, each >= 1."""
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise HeteroError(f"{what} must be comma-separated whole numbers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise HeteroError(f"{what} must be whole numbers >= 1, got {text!r}")
    return tuple(sorted(set(vals)))


def option_flag(name: str) -> str:
    """The CLI flag of a TrainConfig field (``losses`` is ``--loss``)."""
    return "--loss" if name == "losses" else "--" + name.replace("_", "-")


def train_config(options: TrainConfig | Mapping[str, Any] | None, resume: dict[str, Any] | None = None,
                 **fixed: Any) -> TrainConfig:
    """The TrainConfig from ``options`` (fields of :class:`~hetero.train.TrainConfig`; None values are
    left at their defaults) and ``fixed``; with ``resume`` (an interrupted run's config) that one,
    after refusing any option that contradicts it."""
    values = asdict(options) if isinstance(options, TrainConfig) else {k: v for k, v in (options or {}).items()
                                                                        if v is not None}
    known = set(TrainConfig.__dataclass_fields__)
    unknown = set(values) - known
    if unknown:
        raise HeteroError(f"unknown training option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    values.update(fixed)
    if resume is not None:
        differ = [k for k, v in values.items() if plain(v) != resume.get(k)]
        if differ:
            flags = ", ".join(option_flag(k) for k in differ)
            k = differ[0]
            raise HeteroError(f"--resume: {flags} contradict(s) the interrupted run's options ({k} was {resume.get(k)!r}, "
                              f"now {values[k]!r}); leave them out (a resumed run keeps its own options)")
        values = dict(resume)
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise HeteroError(f"invalid training options ({e})") from None

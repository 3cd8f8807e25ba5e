"""Step-level training state, for resuming an interrupted run exactly where it stopped.

A state directory (by default ``<out>.resume/`` next to the run's ``--out``) holds ``state.pt``:
tensors and plain containers only (module and optimiser state dicts, scheduler state, RNG states,
the data position, the resolved config, the data digest), written with ``torch.save`` and read back
with ``torch.load(weights_only=True)``, so a state file can never run code. ``state.json`` is a
human-readable copy of its metadata (what was running, where it stopped); only ``state.pt`` counts.

Every write is atomic: a temporary file, fsync, rename, then fsync of the directory; the directory
itself appears by renaming a complete temporary one. A SIGKILL at any instant leaves either the
previous state or the new one.
"""
from __future__ import annotations

import datetime as _dt
import json
import pickle
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from devices.schema import TRAIN_STATE_FORMAT
from hetero._atomic import publish_dir, write_atomic
from hetero.data.loader import is_synthetic
from hetero.errors import HeteroError

FORMAT = TRAIN_STATE_FORMAT
VERSION = 1
STATE = "state.pt"
INFO = "state.json"
DEFAULT_SAVE_EVERY = 200


def default_dir(out: str | Path) -> Path:
    """``<out>.resume`` next to the output directory."""
    out = Path(out)
    return out.with_name(out.name + ".resume")


def rng_state() -> dict[str, Any]:
    """torch, numpy and python global RNG states, as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": _to_lists(random.getstate())}


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_to_tuples(s["python"]))


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """Atomically replace ``directory/state.pt`` (and its ``state.json`` summary); creates the
    directory atomically on first use."""
    directory = Path(directory)
    meta = state["meta"]
    info = json.dumps({k: v for k, v in meta.items() if k not in ("history",)}, indent=2, default=str).encode() + b"\n"
    if not directory.is_dir():
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            write_atomic(tmp / STATE, lambda f: torch.save(state, f), durable=False)
            write_atomic(tmp / INFO, info, durable=False)
            if not publish_dir(tmp, directory):
                raise HeteroError(f"{directory} appeared while the first training state was written; is another run "
                                  "using the same --state-dir?")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return
    write_atomic(directory / STATE, lambda f: torch.save(state, f))  # each: temp file, fsync, rename, fsync dir
    write_atomic(directory / INFO, info)


def read_state(directory: str | Path, flag: str = "--resume") -> dict[str, Any]:
    """The state written by :func:`write_state`, checked; one-line errors for a missing or broken one."""
    d = Path(directory)
    if not d.exists():
        raise HeteroError(f"{flag} {directory}: no such directory; pass the state directory of an interrupted run "
                          "(by default <out>.resume next to its --out)")
    if not (d / STATE).is_file():
        raise HeteroError(f"{flag} {directory}: no {STATE} in it, so it is not the state of an interrupted run; "
                          "pass the directory the run named (by default <out>.resume), or start again without --resume")
    try:
        state = torch.load(d / STATE, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, AttributeError, KeyError) as e:
        # not the torch message: for a damaged file it talks about weights_only, which misleads here
        raise HeteroError(f"{flag} {directory}: {STATE} is unreadable ({e.__class__.__name__}: damaged, or not written "
                          "by hetero); start the run again without --resume (and delete the directory)") from None
    meta = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise HeteroError(f"{flag} {directory}: {STATE} is not hetero training state; pass the directory an "
                          "interrupted `hetero train-*` run wrote")
    if meta.get("version") != VERSION:
        raise HeteroError(f"{flag} {directory}: training state version {meta.get('version')} is not {VERSION}, which "
                          "this hetero reads; resume with the hetero that wrote it, or start again")
    return state


def describe(meta: dict[str, Any]) -> str:
    p = meta.get("position", {})
    return f"epoch {p.get('epoch', 0) + 1}, step {p.get('step', 0)}/{meta.get('steps_per_epoch', '?')}"


@dataclass
class Snapshots:
    """Where and how often a training loop saves its state, and the state it continues from.

    ``run``: what identifies the run beyond config and data (the command, its output, its cloud), kept
    in the state so ``--resume DIR`` needs no other flag. ``loaded``: a state from :func:`read_state`."""

    directory: Path
    save_every: int = DEFAULT_SAVE_EVERY
    run: dict[str, Any] = field(default_factory=dict)
    loaded: dict[str, Any] | None = None
    enabled: bool = True  # False on every rank but 0 under torchrun: they compute, rank 0 writes

    def __post_init__(self):
        self.directory = Path(self.directory)
        if self.save_every < 0:
            raise HeteroError(f"--save-every must be >= 0 (0: at epoch ends only), got {self.save_every}")

    def due(self, global_step: int) -> bool:
        return self.save_every > 0 and global_step % self.save_every == 0

    def check(self, config: dict[str, Any], dataset_digest: str, world_size: int) -> dict[str, Any] | None:
        """The loaded state's metadata after checking it belongs to this run (same config, data, world size)."""
        if self.loaded is None:
            return None
        meta = self.loaded["meta"]
        d = self.directory
        if meta.get("config") != plain(config):
            diff = sorted(k for k in set(config) | set(meta.get("config", {}))
                          if plain(config.get(k)) != meta.get("config", {}).get(k))
            raise HeteroError(f"--resume {d}: the training options differ from the interrupted run's ({', '.join(diff)}); "
                              "resume without those flags (the run's own options are kept in its state)")
        if meta.get("dataset_digest") != dataset_digest:
            raise HeteroError(f"--resume {d}: the training data differ from the interrupted run's ({meta.get('dataset')}); "
                              "pass the same --data, or start again without --resume")
        if int(meta.get("world_size", 1)) != world_size:
            raise HeteroError(f"--resume {d}: the run was interrupted with {meta.get('world_size')} process(es), this is "
                              f"{world_size}; resume with the same torchrun --nproc_per_node")
        return meta

    def save(self, state: dict[str, Any]) -> None:
        if not self.enabled:
            return
        state["meta"] = {"format": FORMAT, "version": VERSION, "command": self.run.get("command"), "run": plain(self.run),
                         **state["meta"], "save_every": self.save_every,
                         "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        write_state(self.directory, state)

    def remove(self) -> None:
        """Delete the state directory (after the final output is safely written)."""
        if self.enabled and self.directory.is_dir() and (self.directory / STATE).is_file():
            shutil.rmtree(self.directory, ignore_errors=True)


    def saved(self) -> dict[str, Any] | None:
        """The metadata of the state on disk now, if any (what an interrupted run leaves)."""
        try:
            return read_state(self.directory)["meta"] if (self.directory / STATE).is_file() else None
        except HeteroError:
            return None


# --- the command line's side: fresh runs, --resume, interruptions ----------------------------------

def prepare_fresh(directory: Path, command: str, overwrite: bool, remove: bool = True) -> None:
    """Refuse to start over a run's leftover state unless ``overwrite`` (then, with ``remove``, delete it)."""
    if not directory.exists():
        return
    if not (directory / STATE).is_file():
        if directory.is_dir() and not any(directory.iterdir()):
            return
        raise HeteroError(f"{directory} exists and is not training state; pass another --state-dir (or delete it)")
    if not overwrite:
        try:
            where = f" ({describe(read_state(directory)['meta'])})"
        except HeteroError:
            where = ""
        raise HeteroError(f"{directory} holds the state of an interrupted run{where}; continue it with "
                          f"`hetero {command} --resume {directory}`, or pass --overwrite to start over")
    if remove:
        shutil.rmtree(directory)


def continue_from(directory: str, command: str) -> dict[str, Any]:
    """The state in ``directory`` (``--resume``), checked to belong to ``command``."""
    state = read_state(directory)
    was = state["meta"].get("command")
    if was != command:
        raise HeteroError(f"--resume {directory} is the state of `hetero {was}`, not {command}; continue it with "
                          f"`hetero {was} --resume {directory}`")
    return state


def recorded(flag: str, given: Any, value: Any) -> Any:
    """A run option on ``--resume``: the recorded ``value``, unless ``given`` explicitly and different (refused)."""
    if given is None or given is False or _same(given, value):
        return value
    raise HeteroError(f"--resume: {flag} {given} differs from the interrupted run's {value}; leave {flag} out "
                      "(a resumed run keeps its own options)")


def _same(a: Any, b: Any) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str):
        if is_synthetic(a) or is_synthetic(b):  # "synthetic" and "synthetic:" are the same set
            return is_synthetic(a) and is_synthetic(b)
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return False


def absolute(path: str | None) -> str | None:
    """A path recorded for ``--resume`` from anywhere: absolute (None and the built-in synthetic set,
    see :func:`hetero.data.loader.is_synthetic`, stay as they are)."""
    if path is None or is_synthetic(path):
        return path
    return str(Path(path).expanduser().resolve())


def interrupted(e: KeyboardInterrupt, snapshots: Snapshots | None, command: str) -> KeyboardInterrupt:
    """``e`` again, its message saying where the state is and how to resume (when some was saved)."""
    meta = snapshots.saved() if snapshots is not None and snapshots.enabled else None
    if meta is None:
        return e
    return e.__class__(f"the final output was not written; training state ({describe(meta)}) is in "
                       f"{snapshots.directory}; continue with: hetero {command} --resume {snapshots.directory}")


def plain(x):
    """JSON-like copy: tuples become lists (what a round trip through the state file gives)."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def snapshots_for(command: str, state: dict[str, Any] | None, run: dict[str, Any], *, out: str | Path,
                  resume: str | Path | None = None, state_dir: str | Path | None = None, save_every: int | None = None,
                  overwrite: bool = False, main: bool = True) -> Snapshots:
    """The Snapshots of a `hetero train-*` run: in ``resume`` (with the interrupted run's ``state``), or
    in ``state_dir`` (default: next to ``out``) for a fresh one, every ``save_every`` steps.
    ``main``: whether this process writes (rank 0 under torchrun)."""
    if state is not None:
        directory = Path(resume)
        if state_dir and not _same(str(state_dir), str(directory)):
            raise HeteroError("--state-dir: a resumed run keeps its state in the --resume directory; leave --state-dir out")
        every = save_every if save_every is not None else int(state["meta"].get("save_every", DEFAULT_SAVE_EVERY))
        return Snapshots(directory, every, run, loaded=state, enabled=main)
    directory = Path(state_dir) if state_dir else default_dir(out)
    snaps = Snapshots(directory, DEFAULT_SAVE_EVERY if save_every is None else save_every, run, enabled=main)
    if main:
        prepare_fresh(directory, command, overwrite)
    return snaps

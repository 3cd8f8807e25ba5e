"""Atomic outputs: a directory is built in a temporary sibling, then renamed into place; a file is
written through a unique temp file beside it (:func:`write_atomic`). Either replaces only an earlier
hetero output of its own kind (:func:`check_output_dest`, :func:`check_output_file`)."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from devices import outputs as _files
from devices.artifact import sha256_path
from devices.outputs import Data
from devices.schema import OUTPUT_MARKER, OUTPUT_MARKER_FORMAT, REPORT_FILE
from hetero.errors import HeteroError

MARKER, MARKER_FORMAT = OUTPUT_MARKER, OUTPUT_MARKER_FORMAT  # in every output directory: what kind of output it is
_BUILDING: set[Path] = set()  # temp dirs of atomic_dir()s in progress: fsynced as a whole tree at their end
KINDS = ("cloud checkpoint", "edge checkpoint", "control checkpoint", "export", "verify report", "evaluate report",
         "demo run", "search", "supernet")


def output_kind(d: Path, legacy: Callable[[Path], str | None] | None = None) -> str | None:
    """The kind of hetero output directory ``d`` is, from its marker (or, for outputs written before
    markers, what ``legacy`` recognises); None for anything else."""
    try:
        doc = json.loads((d / MARKER).read_text(encoding="utf-8"))
        if isinstance(doc, dict) and doc.get("format") == MARKER_FORMAT and doc.get("kind") in KINDS:
            return doc["kind"]
    except (OSError, ValueError, RecursionError):
        pass
    return legacy(d) if legacy is not None else None


def legacy_report(kind: str, title_prefix: str) -> Callable[[Path], str | None]:
    """A detector of reports written before output markers: a report.json whose title starts so."""
    def detect(d: Path) -> str | None:
        try:
            doc = json.loads((d / REPORT_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return None
        return kind if isinstance(doc, dict) and str(doc.get("title", "")).startswith(title_prefix) else None

    return detect


def check_output_dest(dest: str | Path, kind: str, overwrite: bool,
                      legacy: Callable[[Path], str | None] | None = None) -> None:
    """Refuse, before any work, an output path that would replace what hetero did not write. ``dest`` may
    be new or an empty directory; an earlier hetero output of the same ``kind`` is replaced only with
    ``overwrite``; anything else (a file, a user's directory, another kind of output) never."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    dest = Path(dest)
    if not os.path.lexists(dest):
        return
    if dest.is_symlink() or not dest.is_dir():
        raise HeteroError(f"{dest} exists and is a file or a link, not an output directory of hetero's; nothing was touched: "
                          "choose another output path")
    if not any(dest.iterdir()):
        return
    held = output_kind(dest, legacy)
    if held == kind:
        if not overwrite:
            raise HeteroError(f"{dest} already holds a hetero {kind}; pass --overwrite to replace it, or choose "
                              "another output path")
        return
    what = f"a hetero {held}" if held else "files hetero did not write"
    raise HeteroError(f"{dest} holds {what}; nothing was touched: choose another output path (--overwrite replaces "
                      f"only an earlier hetero {kind})")


def check_output_file(dest: str | Path, kind: str, overwrite: bool) -> None:
    """Refuse, before any work, a single-file output path that would replace what hetero did not
    write: ``dest`` may be new, or (with ``overwrite``) an earlier hetero file of the same ``kind``,
    recognised by its content (:mod:`devices.outputs`: a latency JSON by its schema, a runner zip by
    its comment); a user's file, a directory, a link or another kind, never."""
    why = _files.refusal(dest, kind, overwrite)
    if why is not None:
        raise HeteroError(why)


@contextlib.contextmanager
def atomic_dir(dest: str | Path, kind: str, overwrite: bool = False,
               legacy: Callable[[Path], str | None] | None = None) -> Iterator[Path]:
    """Yield a temp dir next to ``dest``; on success it replaces ``dest``, on error it is removed.

    ``dest`` is checked first (:func:`check_output_dest`) and the new output carries the marker of its
    ``kind``. Durable: every file and directory of the new output is fsynced before it takes the place
    of an old one (an atomic exchange on Linux), the parent after, and the old output is deleted only
    then, so a kill -9 or a power cut leaves the old output or the new one, never neither or a mix."""
    dest = Path(dest)
    check_output_dest(dest, kind, overwrite, legacy)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    old = None
    try:
        os.chmod(tmp, 0o777 & ~_files.umask())  # mkdtemp's 0700 would make the output private to its writer
        building = Path(os.path.abspath(tmp))
        _BUILDING.add(building)
        try:
            yield tmp
        finally:
            _BUILDING.discard(building)
        write_json_atomic(tmp / MARKER, {"format": MARKER_FORMAT, "kind": kind, "written_by": "hetero"}, durable=False)
        fsync_tree(tmp)
        check_output_dest(dest, kind, True, legacy)  # still ours to replace after the work (nobody swapped it)
        if not os.path.lexists(dest):
            os.replace(tmp, dest)
        elif _exchange(tmp, dest):  # one atomic step: dest holds the new output, tmp the old one
            old = tmp
        else:  # no atomic exchange on this system or filesystem: two renames, the old output put back on error
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            try:
                os.replace(tmp, dest)
            except BaseException:
                os.replace(old, dest)
                old = None
                raise
        _files.fsync_dir(dest.parent)  # the new output is durable before the old one goes
    except BaseException:
        if old is None or old != tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``), so that a kill
    or a power cut at any moment leaves one of them at ``b``; False where the system or the filesystem
    cannot (then the caller falls back to two renames, with a window between them)."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc before 2.28)
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def fsync_tree(root: Path) -> None:
    """fsync every regular file under ``root``, then every directory, deepest first."""
    dirs = []
    for here, _, files in os.walk(root):
        dirs.append(here)
        for name in files:
            path = os.path.join(here, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        _files.fsync_dir(d)


def publish_dir(tmp: Path, dest: Path) -> bool:
    """Give the finished temp directory ``tmp`` the new name ``dest``, durably (its files first, then the
    rename, then the parent). Never replaces: returns False, leaving ``tmp``, if ``dest`` exists."""
    fsync_tree(tmp)
    try:
        os.rename(tmp, dest)
    except OSError:
        if dest.exists():
            return False
        raise
    _files.fsync_dir(dest.parent)
    return True


def write_json_atomic(path: str | Path, obj: Any, durable: bool = True) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", durable=durable)


def write_text_atomic(path: str | Path, text: str, durable: bool = True) -> None:
    """:func:`write_atomic` of ``text`` as UTF-8, whatever the locale."""
    write_atomic(path, text.encode("utf-8"), durable=durable)


def write_atomic(path: str | Path, data: Data, durable: bool = True) -> None:
    """The one way hetero writes a file: ``data`` (bytes, or a callback writing to the open binary
    file: ``np.save``, ``torch.save``, a zip) goes to a unique temp file beside ``path``, created
    exclusively (never a planted file or link), and is renamed into place; the parent directory is
    created if missing. ``durable``: the file is fsynced before the rename and its directory after,
    except inside an :func:`atomic_dir` in progress, which fsyncs its whole tree once at its end. On
    any error, a full disk included, the temp file is removed (:func:`devices.outputs.write_atomic`)."""
    path = Path(path)
    durable = durable and not _BUILDING.intersection(Path(os.path.abspath(path)).parents)
    path.parent.mkdir(parents=True, exist_ok=True)
    _files.write_atomic(path, data, durable=durable)


# a temp file of write_atomic: ".<name>.<mkstemp's 8 characters>.tmp" (before mkstemp: ".<name>.<pid>.tmp")
_TEMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp$")
TEMP_MAX_AGE_S = 3600.0


def stale_temps(directory: str | Path, owned: Callable[[str], bool], max_age_s: float = TEMP_MAX_AGE_S) -> list[Path]:
    """Temp files :func:`write_atomic` left in ``directory`` (a writer killed mid-write) for a file
    name ``owned`` accepts, untouched for ``max_age_s``. Age, not a PID: a cache may be shared by
    several hosts, and a live writer touches its temp file with every chunk it writes."""
    directory = Path(directory)
    old = time.time() - max_age_s
    found = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    for e in entries:
        m = _TEMP.match(e.name)
        try:
            if m and owned(m["name"]) and e.is_file(follow_symlinks=False) and \
                    e.stat(follow_symlinks=False).st_mtime < old:
                found.append(Path(e.path))
        except OSError:
            continue
    return found


def remove_stale_temps(directory: str | Path, owned: Callable[[str], bool]) -> list[Path]:
    """Delete :func:`stale_temps`; returns them."""
    gone = stale_temps(directory, owned)
    for t in gone:
        t.unlink(missing_ok=True)
    return gone


def discard_damaged(path: Path, seen: os.stat_result, what: str, why: str) -> None:
    """A damaged cache entry (zero bytes, cut short, another shape): one warning line, and the file
    deleted unless it changed since it was examined (another process may have just replaced it with a
    good one); the caller rebuilds it."""
    print(f"warning: {what} {path} is damaged ({why}); deleting it and building it again", file=sys.stderr)
    try:
        now = os.stat(path, follow_symlinks=False)
        if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) == (seen.st_dev, seen.st_ino, seen.st_size,
                                                                       seen.st_mtime_ns):
            os.unlink(path)
    except OSError:
        pass


sha256_file = sha256_path  # the manifest's one digest, for checkpoints' and supernets' files too

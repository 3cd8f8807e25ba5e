"""User-facing errors: one line that names what was wrong and how to fix it."""
from __future__ import annotations

import importlib


class HeteroError(Exception):
    """An error caused by the user's input or environment, not by a bug.

    The CLI prints ``error: <message>`` to stderr without a traceback and exits with status 2.
    Messages are one line: what was wrong, what was expected, how to fix it.
    """

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so every cleanup path (atomic
    outputs, temp files, resume state) runs the same; the CLI exits 143 instead of 130."""


class MissingDependencyError(HeteroError):
    """An optional library is not installed; the message names the pip extra that brings it."""


def require(module: str, extra: str):
    """Import an optional heavy module lazily, or raise a one-line error naming the pip extra."""

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - exercised where the extra is absent
        raise MissingDependencyError(
            f"{module} is not installed ({e}); install it with: pip install 'hetero[{extra}]'"
        ) from None


_FULL = {28: "no space left on the device", 122: "disk quota exceeded", 30: "the file system is read-only"}  # ENOSPC, EDQUOT, EROFS


def write_failure(exc: BaseException) -> str | None:
    """What went wrong if ``exc`` was caused by a full (or read-only) disk, found anywhere in its
    cause/context chain (exporters wrap the OSError in their own errors), else None."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        errno = getattr(e, "errno", None) if isinstance(e, OSError) else None
        if errno not in _FULL:  # native writers (safetensors, protobuf) only say it in words
            errno = next((n for n, t in ((28, "No space left on device"), (122, "Disk quota exceeded"),
                                         (30, "Read-only file system")) if t in str(e)), None)
        if errno is not None:
            return _FULL[errno]
        e = e.__cause__ or e.__context__
    return None

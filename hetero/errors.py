"""User-facing errors: one line that names what was wrong and how to fix it."""
from __future__ import annotations


class HeteroError(Exception):
    """An error caused by the user's input or environment, not by a bug.

    The CLI prints ``error: <message>`` to stderr without a traceback and exits with status 2.
    Messages are one line: what was wrong, what was expected, how to fix it.
    """

    exit_code = 2


class MissingDependencyError(HeteroError):
    """An optional library is not installed; the message names the pip extra that brings it."""


def require(module: str, extra: str):
    """Import an optional heavy module lazily, or raise a one-line error naming the pip extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - exercised where the extra is absent
        raise MissingDependencyError(
            f"{module} is not installed ({e}); install it with: pip install 'hetero[{extra}]'"
        ) from None

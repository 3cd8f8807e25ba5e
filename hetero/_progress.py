"""Progress bars: live on a terminal, sparse in logs (CI, nohup, pipes), off with ``--quiet``."""
from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0  # when stderr is not a terminal, refresh at most this often


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """``tqdm`` to stderr; when stderr is not a terminal it refreshes every ``LOG_INTERVAL_S`` seconds
    instead of ten times a second, so a redirected log stays readable."""
    stream = kwargs.setdefault("file", sys.stderr)
    if not (hasattr(stream, "isatty") and stream.isatty()):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", LOG_INTERVAL_S * 2)
    return tqdm(iterable, **kwargs)

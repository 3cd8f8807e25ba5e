"""Progress bars: live on a terminal; in logs (CI, nohup, ``make demo > log``) one line per stage when
it ends, plus one every ``LOG_INTERVAL_S`` while a long stage runs; off with ``--quiet``."""
from __future__ import annotations

import io
import sys
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0  # when stderr is not a terminal, a line at most this often while a stage runs


class _LogBar(tqdm):
    """tqdm for a stream that is not a terminal: no ``0%`` line when it starts, no carriage returns;
    whole lines only, the last one when it closes (``leave=False`` or not)."""

    def __init__(self, *args: Any, file: Any, **kwargs: Any) -> None:
        self._log, self._closing = file, False
        kwargs.update(mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S * 2, delay=LOG_INTERVAL_S)
        super().__init__(*args, file=io.StringIO(), **kwargs)  # tqdm's own drawing goes nowhere

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is None and not self._closing:
            print(self, file=self._log, flush=True)
        return True

    def close(self) -> None:
        if not getattr(self, "disable", True) and not self._closing:
            self._closing = True
            print(self, file=self._log, flush=True)
        self._closing = True
        super().close()


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """``tqdm`` to stderr, live on a terminal; on anything else a :class:`_LogBar`."""
    stream = kwargs.pop("file", sys.stderr)
    if hasattr(stream, "isatty") and stream.isatty():
        return tqdm(iterable, file=stream, **kwargs)
    return _LogBar(iterable, file=stream, **kwargs)

"""The `hetero` command line: one module per command group, each parsing its flags, calling the
Python API (:mod:`hetero.app`) and printing. User errors print one line and exit 2; no tracebacks
for them."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Sequence

from devices.errors import DeviceError
from hetero.app.cli import check, data, demo, deploy, search, train
from hetero.errors import HeteroError, Terminated, write_failure
from hetero.version import __version__

# the order `hetero --help` lists them in
COMMANDS = (demo.add_demo, train.add_train_cloud, train.add_train_edge, train.add_train_supernet, search.add_search,
            deploy.add_export, check.add_evaluate, check.add_verify, train.add_import_cloud, train.add_fit_classifier,
            data.add_data, deploy.add_bench, deploy.add_devices, deploy.add_pack_runner, data.add_cache, data.add_models)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hetero", description="Train, export and verify edge models compatible with a cloud embedding space.")
    ap.add_argument("--version", action="version", version=f"hetero {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    old_handler = _catch_sigterm()
    try:
        return int(args.func(args) or 0)
    except BaseException as e:
        return _report(e, args)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


def _report(e: BaseException, args: argparse.Namespace) -> int:
    """Print the one ``error:`` line for what ended the command and return the exit status; anything
    that is neither bad input, a full disk nor an interruption is a bug and is raised again."""
    stop = _interruption(e)
    if stop is not None:  # Ctrl-C, or SIGTERM as Terminated; a message, if any, says what was kept
        # CPython quirk: a KeyboardInterrupt that passed through a string exec (torch's exporter makes
        # some) makes `python -m` die by SIGINT at exit whatever we return; any later string exec clears it
        exec("pass", {})
        what = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
        print(f"error: {what}; {str(stop) or 'partial outputs were discarded'}", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    if isinstance(e, (HeteroError, DeviceError)) or (isinstance(e, Exception) and _disk_full(e, args)):
        # a full or read-only disk is the environment's fault, not a bug: one line too
        print(f"error: {_disk_full(e, args) or e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    raise e


def _interruption(e: BaseException | None) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt that caused ``e``, if any (libraries such as torch.export wrap it)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _disk_full(e: BaseException, args: argparse.Namespace) -> str | None:
    why = write_failure(e)
    if why is None:
        return None
    out = getattr(args, "out", None) or getattr(args, "json", None)
    return f"{'cannot write ' + str(out) + ': ' if out else ''}{why}; free some space or choose another output path"


def _catch_sigterm():
    """Turn SIGTERM into :class:`Terminated` (once: a second one during the cleanup is ignored).
    Returns the handler to restore, or None off the main thread, where signals cannot be caught."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    return signal.signal(signal.SIGTERM, on_term)


if __name__ == "__main__":
    sys.exit(main())

"""The bad-input matrix's helpers (tests/app/bad_inputs/): run a command line as a user types it, and
check that it failed in one line and left every user file as it was.

Every :func:`cli` and :func:`interrupt` run hashes the trees in :data:`WATCHED` (the conftest puts the
handed-over files and the case's ``tmp_path`` there) before and after the command; :func:`fails_cleanly`
then asserts, besides one ``error:`` line, no traceback and the exit status, that no file changed,
appeared or vanished there (except paths the case allows, e.g. a training run's resume state).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

WATCHED: list[Path] = []  # the user's trees: byte-identical before and after a failing command

REPO = Path(__file__).resolve().parents[2]
TINY_TRAIN = ["--model", "test_resnet", "--epochs", "1", "--batch-size", "16", "--dim", "8", "--limit", "64", "--quiet"]

# Injected into the child processes through PYTHONPATH: a marker file on the first optimizer step (so
# a signal is sent once training really runs) and, where tmpfs cannot be mounted, ENOSPC on writes.
SHIM = r'''
import os
if os.environ.get("HETERO_TEST_MARK"):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    def _mark(opt, args, kwargs):
        open(os.environ["HETERO_TEST_MARK"], "a").close()

    register_optimizer_step_pre_hook(_mark)
if os.environ.get("HETERO_TEST_ENOSPC"):
    import builtins, errno
    _root, _open, _osopen = os.environ["HETERO_TEST_ENOSPC"], builtins.open, os.open

    def _full(path):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def _under(path):
        return not isinstance(path, int) and os.path.abspath(os.fspath(path)).startswith(_root)

    def open_(file, mode="r", *a, **k):
        if _under(file) and any(c in mode for c in "wax+"):
            raise _full(file)
        return _open(file, mode, *a, **k)

    def osopen(path, flags, *a, **k):
        if _under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise _full(path)
        return _osopen(path, flags, *a, **k)

    builtins.open, os.open = open_, osopen
    import safetensors.torch as _st
    _save = _st.save_file

    def save_file(tensors, filename, *a, **k):
        if _under(filename):
            raise _full(filename)
        return _save(tensors, filename, *a, **k)

    _st.save_file = save_file
'''


# ------------------------------------------------------------------------------------------- helpers

def child_env(extra: dict[str, str] | None = None, shim: Path | None = None) -> dict[str, str]:
    path = [str(shim)] if shim else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([*path, str(REPO)])}
    env.pop("HETERO_TEST_MARK", None)
    env.pop("HETERO_TEST_ENOSPC", None)
    return {**env, **(extra or {})}


def cli(*argv, module: str = "hetero", cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 120, path: Sequence[Path] = ()) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGV``: in this process through ``main(argv)``, with ``path`` on sys.path,
    or in a child process when it needs its own environment (``env``) or working directory."""
    before = snapshot()
    if env is not None or cwd is not None:
        p = subprocess.run([sys.executable, "-m", module, *map(str, argv)], capture_output=True, text=True,
                           cwd=cwd, env=env, timeout=timeout)
        p.changed = changes(before)
        return p
    if module == "hetero":
        from hetero.app.cli import main
    else:
        from devices.__main__ import main
    out, err = io.StringIO(), io.StringIO()
    sys.path[:0] = map(str, path)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 2
    finally:
        del sys.path[:len(path)]
    p = subprocess.CompletedProcess([module, *map(str, argv)], code, out.getvalue(), err.getvalue())
    p.changed = changes(before)
    return p


def listing(d: Path) -> dict[str, str]:
    """Every path under ``d`` with a digest of its content: 'unchanged' means byte for byte."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "other"
    return out


def snapshot() -> dict[str, str]:
    """Every path under the watched trees with a digest of its content."""
    out = {}
    for root in WATCHED:
        out.update({f"{root}/{k}": v for k, v in listing(root).items()})
    return out


def changes(before: dict[str, str]) -> list[str]:
    """The watched paths that changed, appeared or vanished since ``before``."""
    after = snapshot()
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def fails_cleanly(p: subprocess.CompletedProcess, *words: str, code: int = 2, allow: Iterable[str] = ()) -> str:
    """Exactly one ``error:`` line on stderr, no traceback, the expected exit status, and every watched
    user file byte-identical (a path with a component in ``allow`` may appear: e.g. ``c.resume``)."""
    allow = set(allow)
    changed = [k for k in getattr(p, "changed", ()) if not allow & set(Path(k).parts)]
    assert not changed, f"the command changed the user's files: {changed}"
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert p.returncode == code, (p.returncode, p.stderr)
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def interrupt(argv, started, sig, *, env=None, timeout=120):
    """Run ``hetero argv``, wait until ``started()`` says real work is under way, send ``sig``."""
    # SIGINT at its default in the child, as in a terminal: a shell running the suite in the background
    # (`make test &`) starts it ignored, and Python then never raises KeyboardInterrupt
    p = subprocess.Popen([sys.executable, "-m", "hetero", *map(str, argv)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env or child_env(),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + timeout
    while not started() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, f"finished before it could be interrupted: {p.stderr.read()}"
    time.sleep(0.3)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit_json(path: Path, fn) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def rehash(export: Path, name: str) -> None:
    """Record the current sha256 of ``name`` in the manifest: the damage is then past the hash check."""
    from devices.artifact import sha256_path

    edit_json(export / "manifest.json",
               lambda m: [a.update(sha256=sha256_path(export / name)) for a in m["artifacts"] if a.get("file") == name])


def resave_meta(ckpt: Path, fn) -> None:
    edit_json(ckpt / "hetero.json", fn)



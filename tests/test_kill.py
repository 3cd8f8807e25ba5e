"""kill -9 at any moment of export, verify, evaluate and demo leaves the old output or the new one, never
neither or a mix (issue 21). Each case starts from an earlier output of the same kind, reruns the command
over it in a child process and SIGKILLs it

- mid-work: as it writes its first text file (a report, a manifest, a checkpoint's hetero.json) into the
  new output, beside the output;
- before the swap: the new output complete and fsynced, about to take the old one's place;
- after the swap: the new output in place, the directory entry not yet fsynced, the old one not deleted.

Each point is reached exactly: a ``sitecustomize`` shim wraps ``hetero._atomic.write_text_atomic``, or
``hetero._atomic._exchange`` (the one step that puts a new output where an old one was), and kills the
process there.
Then the output is byte for byte the old one, or the new one complete (what a full run writes).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from badinput import REPO, listing
from clitest import PERMISSIVE_GATES
from hetero.app.cli import main

pytestmark = pytest.mark.slow

SHIM = r'''
import os, signal
from pathlib import Path
_point = os.environ.get("HETERO_TEST_KILL")
if _point == "mid-work":  # the first text file written into the new output (after its binary files, if any)
    import hetero._atomic as _atomic
    _write = _atomic.write_text_atomic

    def write_text_atomic(path, *a, **k):
        if any(d.name.startswith(".out.tmp-") for d in Path(os.path.abspath(path)).parents):
            os.kill(os.getpid(), signal.SIGKILL)
        return _write(path, *a, **k)

    _atomic.write_text_atomic = write_text_atomic
if _point in ("before-swap", "after-swap"):
    import hetero._atomic as _atomic
    _real = _atomic._exchange

    def _exchange(a, b):
        if _point == "before-swap":
            os.kill(os.getpid(), signal.SIGKILL)
        swapped = _real(a, b)
        if _point == "after-swap":
            os.kill(os.getpid(), signal.SIGKILL)
        return swapped

    _atomic._exchange = _exchange
'''

POINTS = ("mid-work", "before-swap", "after-swap")


@pytest.fixture(scope="module")
def kit(saved, tmp_path_factory):
    """The conftest's tiny cloud and edge, permissive gates, the shim."""
    root = tmp_path_factory.mktemp("kill")
    for name in ("cloud", "edge"):
        shutil.copytree(saved / name, root / name)
    (root / "gates.toml").write_text(PERMISSIVE_GATES)
    (root / "shim").mkdir()
    (root / "shim" / "sitecustomize.py").write_text(SHIM)
    return root


def killed(argv: list, out: Path, point: str, shim: Path) -> None:
    """Run ``hetero ARGV`` in a child and SIGKILL it at ``point``; it must not have finished."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(REPO)]), "HETERO_TEST_KILL": point}
    p = subprocess.Popen([sys.executable, "-m", "hetero", *map(str, argv)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    _, err = p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL, (p.returncode, err)


def old_or_new(out: Path, old: dict[str, str], new_names: set[str], is_new) -> str:
    """``out`` is byte for byte the old output, or a complete new one: "old" or "new"."""
    now = listing(out) if out.is_dir() else {}
    if now == old:
        return "old"
    assert set(now) == new_names, f"neither the old output nor the new one: {sorted(set(now) ^ new_names)}"
    assert is_new(out), "the new output is incomplete"
    return "new"


def check_kills(tmp_path, kit, first, again: list, is_new, points=POINTS, reference: bool = False) -> None:
    """``first`` writes the old output at tmp_path/out (argv run in this process, or a callable), ``again``
    the new one over it. The new output's names come from an uninterrupted run of ``again`` (or, without
    ``reference``, from the run killed after the swap, and ``is_new`` alone says it is complete)."""
    ref = tmp_path / "ref"
    if callable(first):
        first(tmp_path / "out")
    else:
        assert main([str(a) for a in first]) == 0
    shutil.copytree(tmp_path / "out", ref)
    old = listing(ref)
    new_names = None
    if reference:
        assert main([str(a) for a in again]) in (0, 1)  # 1: a failed gate still writes its report
        new_names = set(listing(tmp_path / "out"))
        assert is_new(tmp_path / "out") and listing(tmp_path / "out") != old
    seen = {}
    for point in sorted(points, key=lambda p: p != "after-swap"):  # the new output's names first
        shutil.rmtree(tmp_path / "out")
        shutil.copytree(ref, tmp_path / "out")
        killed(again, tmp_path / "out", point, kit / "shim")
        if new_names is None and point == "after-swap":
            new_names = set(listing(tmp_path / "out"))
        seen[point] = old_or_new(tmp_path / "out", old, new_names, is_new)
    expect = {"mid-work": "old", "before-swap": "old", "after-swap": "new"}
    assert seen == {p: expect[p] for p in points}


def test_kill_9_during_export(kit, tmp_path):
    out = tmp_path / "out"
    base = ["export", "--edge", kit / "edge", "--out", out, "--formats", "onnx", "--check-samples", "20", "--quiet"]

    def is_new(d: Path) -> bool:
        from devices.artifact import checked_file, load_manifest

        m = load_manifest(d)
        for a in m["artifacts"]:
            checked_file(d, a)  # present, inside, and its sha256 the manifest's
        return [a["file"] for a in m["artifacts"]] == ["new.onnx"]

    check_kills(tmp_path, kit, [*base, "--name", "old"], [*base, "--name", "new", "--overwrite"],
                is_new, points=("mid-work", "after-swap"))


def _report_with(n_queries: int):
    def is_new(d: Path) -> bool:
        return f"({n_queries})" in str(json.loads((d / "report.json").read_text())["queries"])
    return is_new


def test_kill_9_during_evaluate(kit, tmp_path):
    """Every point, and the new output's names checked against an uninterrupted run: the other commands
    go through the same swap, so they are killed mid-work and after it only (a child costs seconds)."""
    base = ["evaluate", "--cloud", kit / "cloud", "--edge", kit / "edge", "--data", "synthetic", "--out",
            tmp_path / "out", "--quiet"]
    check_kills(tmp_path, kit, [*base, "--query-limit", "40"], [*base, "--query-limit", "60"], _report_with(60),
                reference=True)


def test_kill_9_during_verify(kit, tmp_path):
    from export import export_checkpoint
    from hetero.checkpoint import load_checkpoint

    export_checkpoint(load_checkpoint(kit / "edge"), tmp_path / "x", name="edge", formats=("onnx",))
    base = ["verify", "--manifest", tmp_path / "x", "--cloud", kit / "cloud", "--data", "synthetic", "--gates",
            kit / "gates.toml", "--out", tmp_path / "out", "--no-latency", "--no-html", "--quiet"]
    check_kills(tmp_path, kit, [*base, "--query-limit", "40"], [*base, "--query-limit", "60"], _report_with(60),
                points=("mid-work", "after-swap"))


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir() and not os.environ.get("HETERO_DATA"),
                    reason="the demo runs on Fashion-MNIST: `make data` installs it")
def test_kill_9_during_demo(kit, tmp_path):
    """Over an earlier demo run (a stand-in: a directory marked as one), killed mid-work and just after the
    swap (as export and verify; evaluate is killed at every point). The new
    run is complete: its verify report inside it, naming the final paths."""
    from hetero._atomic import MARKER, write_json_atomic

    def earlier_run(out: Path) -> None:
        out.mkdir()
        write_json_atomic(out / MARKER, {"format": "hetero-output", "kind": "demo run", "written_by": "hetero"})
        (out / "report.md").write_text("# hetero demo: an earlier run\n")

    def is_new(d: Path) -> bool:
        report = json.loads((d / "report.json").read_text())
        checked = json.loads((d / "verify" / "report.json").read_text())
        return (report["config"]["query_limit"] == 60 and report["verify"]["verdict"] == checked["verdict"]
                and checked["manifest"] == str(d / "export") and ".out.tmp-" not in json.dumps(checked))

    again = ["demo", "--out", tmp_path / "out", "--train-limit", "200", "--gallery-limit", "300", "--query-limit", "60",
             "--edge-epochs", "1", "--control-epochs", "1", "--gates", kit / "gates.toml", "--quiet"]
    check_kills(tmp_path, kit, earlier_run, again, is_new, points=("mid-work", "after-swap"))

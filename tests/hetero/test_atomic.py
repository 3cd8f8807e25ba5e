"""Outputs: built in a temp directory beside the destination, marked with their kind, made durable,
renamed into place; a destination that hetero did not write (or of another kind) is never replaced."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from clitest import one_line_error, run
from hetero._atomic import MARKER, atomic_dir, check_output_dest, output_kind, write_json_atomic, write_text_atomic
from hetero.errors import HeteroError, Terminated


def tree(d: Path) -> dict[str, str]:
    """Every path under ``d`` with a digest of its bytes."""
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(d.rglob("*"))}


def earlier(d: Path, kind: str) -> Path:
    with atomic_dir(d, kind) as tmp:
        (tmp / "old.txt").write_text("old")
    return d


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, OSError, Terminated])
def test_atomic_dir_cleans_its_temp_dir_when_interrupted(tmp_path, exc):
    out = earlier(tmp_path / "out", "evaluate report")
    before = tree(out)
    with pytest.raises(exc):
        with atomic_dir(out, "evaluate report", overwrite=True) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 100)
            raise exc()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and tree(out) == before


def test_the_new_output_carries_its_kind_and_replaces_the_old(tmp_path):
    out = earlier(tmp_path / "out", "verify report")
    assert output_kind(out) == "verify report"
    assert json.loads((out / MARKER).read_text())["format"] == "hetero-output"
    with atomic_dir(out, "verify report", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no old copy or temp dir left


@pytest.mark.parametrize("kind", ["cloud checkpoint", "export", "verify report", "evaluate report", "demo run",
                                  "search", "supernet"])
def test_nothing_hetero_did_not_write_is_replaced(tmp_path, kind):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    (tmp_path / "file.txt").write_text("important")
    other = earlier(tmp_path / "other", "edge checkpoint" if kind != "edge checkpoint" else "export")
    before = tree(tmp_path)
    for dest, words in ((mine, "files hetero did not write"), (tmp_path / "file.txt", "is a file"),
                        (other, "holds a hetero edge checkpoint")):
        for overwrite in (False, True):
            with pytest.raises(HeteroError, match=words) as e:
                with atomic_dir(dest, kind, overwrite=overwrite) as tmp:
                    (tmp / "x").write_text("x")
            assert "\n" not in str(e.value) and "nothing was touched" in str(e.value)
    assert tree(tmp_path) == before


def test_same_kind_needs_overwrite_and_empty_or_new_paths_are_fine(tmp_path):
    out = earlier(tmp_path / "out", "cloud checkpoint")
    with pytest.raises(HeteroError, match="already holds a hetero cloud checkpoint; pass --overwrite"):
        check_output_dest(out, "cloud checkpoint", overwrite=False)
    check_output_dest(out, "cloud checkpoint", overwrite=True)
    (tmp_path / "empty").mkdir()
    check_output_dest(tmp_path / "empty", "export", overwrite=False)
    check_output_dest(tmp_path / "new" / "deeper", "export", overwrite=False)


def test_a_forged_or_damaged_marker_is_no_hetero_output(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for text in ('{"format": "hetero-output", "kind": "everything"}', "{not json", '["export"]'):
        (d / MARKER).write_text(text)
        assert output_kind(d) is None
        with pytest.raises(HeteroError, match="files hetero did not write"):
            check_output_dest(d, "export", overwrite=True)


def test_outputs_are_not_private_and_text_is_utf8(tmp_path, monkeypatch):
    """mkdtemp/mkstemp make 0700/0600; the renamed output follows the umask like any other file; text
    is written as UTF-8 whatever the locale."""
    mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out", "demo run") as tmp:
            write_json_atomic(tmp / "m.json", {})
            write_text_atomic(tmp / "r.md", "mAP@R — ✓")
    finally:
        os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "m.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out" / "r.md").read_bytes().decode("utf-8") == "mAP@R — ✓"


def test_evaluate_and_train_edge_refuse_what_is_not_theirs(saved, tmp_path, capsys):
    """The issue's report: evaluate --out over a user's directory deleted notes.txt, --out over a file
    made it a directory, and train-edge --out CLOUD --overwrite replaced the cloud. All refused now,
    with every file byte-identical."""
    import shutil

    shutil.copytree(saved / "cloud", tmp_path / "cloud")
    (tmp_path / "mywork").mkdir()
    (tmp_path / "mywork" / "notes.txt").write_text("precious")
    (tmp_path / "notes.txt").write_text("important")
    before = tree(tmp_path)
    common = ["--cloud", tmp_path / "cloud", "--edge", saved / "edge", "--data", "synthetic", "--quiet"]
    one_line_error(*run(capsys, "evaluate", *common, "--out", tmp_path / "mywork")[::2], "files hetero did not write")
    one_line_error(*run(capsys, "evaluate", *common, "--out", tmp_path / "notes.txt")[::2], "is a file")
    one_line_error(*run(capsys, "train-edge", "--cloud", tmp_path / "cloud", "--out", tmp_path / "cloud", "--overwrite",
                        "--data", "synthetic", "--epochs", "1", "--quiet")[::2], "holds a hetero cloud checkpoint")
    one_line_error(*run(capsys, "verify", "--manifest", saved / "export", "--cloud", tmp_path / "cloud", "--data",
                        "synthetic", "--out", tmp_path / "mywork", "--no-latency", "--quiet")[::2],
                   "files hetero did not write")
    assert tree(tmp_path) == before
    code, _, err = run(capsys, "evaluate", *common, "--out", tmp_path / "rep")
    assert code == 0, err
    assert output_kind(tmp_path / "rep") == "evaluate report"
    code, _, err = run(capsys, "evaluate", *common, "--out", tmp_path / "rep")  # an earlier report: replaced
    assert code == 0, err


def test_outputs_written_before_markers_are_recognised(tmp_path):
    """A runs/demo or an evaluate report from before markers is still hetero's to replace."""
    from hetero._atomic import legacy_report

    d = tmp_path / "demo"
    d.mkdir()
    (d / "report.json").write_text(json.dumps({"title": "hetero demo: Fashion-MNIST, cloud gallery x edge queries"}))
    check_output_dest(d, "demo run", True, legacy_report("demo run", "hetero demo:"))
    with pytest.raises(HeteroError, match="files hetero did not write"):
        check_output_dest(d, "evaluate report", True, legacy_report("evaluate report", "hetero evaluate:"))


def test_files_inside_an_atomic_dir_are_fsynced_once_by_the_tree(tmp_path, monkeypatch):
    """write_json_atomic inside atomic_dir leaves the fsync to the tree sync at its end; outside one it
    fsyncs the file itself."""
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    write_json_atomic(tmp_path / "alone.json", {"a": 1})
    assert len(calls) == 2  # the file and its directory
    calls.clear()
    with atomic_dir(tmp_path / "out", "export") as tmp:
        write_json_atomic(tmp / "sub" / "x.json", {"a": 1})
        assert calls == []
    assert len(calls) >= 4  # x.json, the marker, sub/, the temp dir (then the parent)


@pytest.mark.parametrize("exchange", ["renameat2", "two renames"])
def test_an_earlier_output_is_replaced_whole(tmp_path, monkeypatch, exchange):
    """Over an earlier output of its kind, the new one takes its place (in one atomic exchange on Linux;
    where the system lacks one, with two renames) and nothing of the old one is left, beside it either."""
    import hetero._atomic as atomic

    if exchange == "two renames":
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # as on a system without renameat2
    for content in ("old", "new"):
        with atomic_dir(tmp_path / "out", "export", overwrite=True) as tmp:
            (tmp / f"{content}.txt").write_text(content)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ------------------------------------------------------------------------------- single files

def test_write_atomic_writes_bytes_text_json_and_through_a_writer(tmp_path):
    import numpy as np

    from hetero._atomic import write_atomic

    write_atomic(tmp_path / "a.bin", b"\x00\x01")
    write_text_atomic(tmp_path / "deeper" / "b.md", "✓\n")  # the directory is made
    write_json_atomic(tmp_path / "c.json", {"k": [1, 2]})
    write_atomic(tmp_path / "d.npy", lambda f: np.save(f, np.arange(3, dtype=np.int64), allow_pickle=False))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "deeper" / "b.md").read_bytes() == "✓\n".encode("utf-8")
    assert json.loads((tmp_path / "c.json").read_text()) == {"k": [1, 2]}
    assert np.load(tmp_path / "d.npy").tolist() == [0, 1, 2]
    write_atomic(tmp_path / "a.bin", b"new")  # replaced
    assert (tmp_path / "a.bin").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.bin", "b.md", "c.json", "d.npy", "deeper"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError, ValueError])
def test_write_atomic_leaves_the_old_file_and_no_temp_on_an_error(tmp_path, exc):
    from hetero._atomic import write_atomic

    (tmp_path / "f.json").write_text("old")

    def half(f):
        f.write(b"half")
        raise exc("stopped")

    with pytest.raises(exc):
        write_atomic(tmp_path / "f.json", half)
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"] and (tmp_path / "f.json").read_text() == "old"


@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 KiB tmpfs (root can mount one): a real full disk."""
    import shutil
    import subprocess

    d = tmp_path / "tiny"
    d.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount") or \
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("needs root to mount a tmpfs (a real full disk)")
    yield d
    subprocess.run(["umount", str(d)], capture_output=True)


def test_write_atomic_removes_its_temp_file_on_a_full_disk(tiny_fs):
    import errno

    from hetero._atomic import write_atomic

    (tiny_fs / "f.bin").write_bytes(b"old")
    with pytest.raises(OSError) as e:
        write_atomic(tiny_fs / "f.bin", b"x" * (1 << 20))
    assert e.value.errno == errno.ENOSPC
    assert [p.name for p in tiny_fs.iterdir()] == ["f.bin"] and (tiny_fs / "f.bin").read_bytes() == b"old"


def test_write_atomic_never_follows_a_planted_link(tmp_path):
    """The temp name is unique and created exclusively: a link planted at the old, PID-named temp path
    (or any guess of it) is neither followed nor replaced."""
    from hetero._atomic import write_atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "cache").mkdir()
    planted = tmp_path / "cache" / f".entry.npy.{os.getpid()}.tmp"
    planted.symlink_to(victim)
    write_atomic(tmp_path / "cache" / "entry.npy", b"data")
    assert victim.read_text() == "precious" and planted.is_symlink()
    assert (tmp_path / "cache" / "entry.npy").read_bytes() == b"data"


def test_stale_temps_go_by_age_never_by_pid(tmp_path):
    """A temp file is another writer's (maybe on another host of a shared cache) until it is an hour old."""
    import time

    from hetero._atomic import remove_stale_temps

    old = time.time() - 2 * 3600
    files = {".a.npy.k2j4x9qa.tmp": old, ".a.npy.99999999.tmp": old,  # mkstemp's name and an old PID-named one
             ".a.npy.zz8yy7xx.tmp": time.time(),  # young: a live writer's
             ".b.npy.k2j4x9qa.tmp": old,  # a name the caller does not own
             "a.npy": old}
    for name, t in files.items():
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (t, t))
    (tmp_path / ".a.npy.linklink.tmp").symlink_to(tmp_path / "a.npy")
    os.utime(tmp_path / ".a.npy.linklink.tmp", (old, old), follow_symlinks=False)
    gone = remove_stale_temps(tmp_path, lambda name: name == "a.npy")
    assert sorted(p.name for p in gone) == [".a.npy.99999999.tmp", ".a.npy.k2j4x9qa.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.npy.linklink.tmp", ".a.npy.zz8yy7xx.tmp",
                                                          ".b.npy.k2j4x9qa.tmp", "a.npy"]


def test_single_file_outputs_replace_only_their_own_kind(tmp_path):
    """check_output_file: a new path, or with --overwrite an earlier file of the same kind; a user's file,
    a directory, a link or another kind never."""
    from hetero._atomic import check_output_file

    lat = tmp_path / "lat.json"
    lat.write_text(json.dumps({"schema": "hetero-latency/1", "results": []}))
    (tmp_path / "mine.json").write_text('{"schema": "mine"}')
    (tmp_path / "dir").mkdir()
    (tmp_path / "link.json").symlink_to(lat)
    check_output_file(tmp_path / "new.json", "latency JSON", overwrite=False)
    check_output_file(lat, "latency JSON", overwrite=True)
    with pytest.raises(HeteroError, match="already holds a hetero latency JSON; pass --overwrite"):
        check_output_file(lat, "latency JSON", overwrite=False)
    before = tree(tmp_path)
    for dest, kind, words in ((tmp_path / "mine.json", "latency JSON", "holds a file hetero did not write"),
                              (tmp_path / "dir", "latency JSON", "is a directory"),
                              (tmp_path / "link.json", "latency JSON", "is a link"),
                              (lat, "latency comparison", "holds a hetero latency JSON"),
                              (lat, "runner zip", "holds a hetero latency JSON")):
        with pytest.raises(HeteroError, match=words) as e:
            check_output_file(dest, kind, overwrite=True)
        assert "\n" not in str(e.value) and str(dest) in str(e.value) and "nothing was touched" in str(e.value)
    assert tree(tmp_path) == before


def test_an_old_output_is_deleted_only_after_the_new_one_and_its_parent_are_fsynced(tmp_path, monkeypatch):
    """The order a power cut cares about: every file and directory of the new output fsynced, then it
    takes the old one's place, then the parent fsynced, and only then the old output deleted."""
    import shutil

    events: list[tuple[str, str]] = []
    real_fsync, real_rmtree = os.fsync, shutil.rmtree
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(shutil, "rmtree", lambda p, *a, **k: (events.append(("rmtree", str(p))),
                                                              real_rmtree(p, *a, **k))[1])
    out = earlier(tmp_path / "out", "export")
    events.clear()
    with atomic_dir(out, "export", overwrite=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"new")
        name = tmp.name
    deleted = [i for i, (what, _) in enumerate(events) if what == "rmtree"]
    assert len(deleted) == 1 and not (tmp_path / "out" / "old.txt").exists()
    synced = [p for what, p in events[:deleted[0]] if what == "fsync"]
    assert synced[-1] == str(tmp_path)  # the parent, last, after the rename
    assert {Path(p).name for p in synced} >= {"w.bin", "sub", MARKER, name}  # the whole new tree before it

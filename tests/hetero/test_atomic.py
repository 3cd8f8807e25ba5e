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

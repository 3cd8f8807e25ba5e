"""The standalone runner's outputs (devices/outputs.py, devices/standalone.py): what counts as an
earlier output of hetero's, the durable write, and image names that no plain text line can hold."""
import json
import os
import zipfile

import numpy as np
import pytest

from devices.errors import DeviceError
from devices.outputs import embedding_rows, file_kind, listing_is_ours, refusal, run_refusal, write_all, write_atomic
from devices.standalone import image_list, pack_runner, quote_name, read_image_list, unquote_name

NAMES = ["plain.png", "with space.png", "caf\u00e9 \u2713.png", "a\nb.png", "tab\there.png", "cr\r.png",
         "sep\u2028.png", "nel\x85.png", os.fsdecode(b"latin1-\xe9.png"), os.fsdecode(b"\xff\xfe"), ' lead.png',
         "trail.png ", '"quoted".png', "#hash.png", 'back\\slash.png', "del\x7f.png", "x"]


def unit_rows(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("name", NAMES)
def test_every_name_is_one_line_that_reads_back_as_itself(name):
    line = quote_name(name)
    assert len((line + "\n").splitlines()) == 1 and line == line.strip() and line.isprintable()
    assert line.encode("utf-8")  # always writable as UTF-8
    assert unquote_name(line) == name
    if name in ("plain.png", "with space.png", "caf\u00e9 \u2713.png", "x"):
        assert line == name  # an ordinary name is written as it is


def test_the_image_list_keeps_rows_aligned_and_reads_back(tmp_path):
    files = []
    for i, name in enumerate(NAMES):
        p = tmp_path / name
        p.write_bytes(b"%d" % i)
        files.append(p)
    listing = tmp_path / "emb.txt"
    listing.write_bytes(image_list(files))
    assert listing.read_text(encoding="utf-8").count("\n") == len(files)
    assert read_image_list(listing) == files


@pytest.mark.parametrize("line", ['"unterminated', '"bad \\q escape"', '"a"b"', '"\\x4"'])
def test_a_badly_quoted_list_line_is_one_line_error(tmp_path, line):
    (tmp_path / "list.txt").write_text(f"# mine\n{line}\n")
    with pytest.raises(DeviceError, match=r"list.txt:2: a quoted name with a bad escape") as e:
        read_image_list(tmp_path / "list.txt")
    assert "\n" not in str(e.value)


def test_kinds_are_recognised_by_content(tmp_path):
    (tmp_path / "lat.json").write_text(json.dumps({"schema": "hetero-latency/1", "results": []}))
    (tmp_path / "cmp.json").write_text(json.dumps({"schema": "hetero-latency-compare/1"}))
    (tmp_path / "other.json").write_text(json.dumps({"schema": "hetero-latency-lut/1"}))
    (tmp_path / "list.json").write_text("[1, 2]")
    pack_runner(tmp_path / "runner.zip")
    with zipfile.ZipFile(tmp_path / "user.zip", "w") as z:
        z.writestr("__main__.py", "print('mine')\n")
    np.save(tmp_path / "emb.npy", unit_rows(5))
    np.save(tmp_path / "empty.npy", np.zeros((0, 8), np.float32))
    np.save(tmp_path / "features.npy", 3 * unit_rows(5))  # float32 [N, dim], rows not of unit length
    np.save(tmp_path / "batch.npy", np.zeros((2, 1, 4, 4), np.float32))
    np.save(tmp_path / "f64.npy", unit_rows(5).astype(np.float64))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "emb.npy").read_bytes()[:-4])
    (tmp_path / "empty.bin").write_bytes(b"")
    want = {"lat.json": "latency JSON", "cmp.json": "latency comparison", "runner.zip": "runner zip",
            "emb.npy": "runner embeddings", "empty.npy": "runner embeddings"}
    assert {p.name: file_kind(p) for p in tmp_path.iterdir() if file_kind(p)} == want
    assert embedding_rows(tmp_path / "emb.npy") == 5


def test_refusal_says_what_the_path_holds(tmp_path):
    np.save(tmp_path / "emb.npy", unit_rows(3))
    (tmp_path / "notes.npy").write_bytes(b"precious")
    (tmp_path / "d").mkdir()
    (tmp_path / "link.npy").symlink_to(tmp_path / "emb.npy")
    os.mkfifo(tmp_path / "fifo")
    assert refusal(tmp_path / "new.npy", "runner embeddings", False) is None
    assert refusal(tmp_path / "emb.npy", "runner embeddings", True) is None
    cases = {("emb.npy", False): "already holds a hetero runner embeddings; pass --overwrite",
             ("notes.npy", True): "holds a file hetero did not write (8 bytes)",
             ("d", True): "is a directory", ("link.npy", True): "is a link", ("fifo", True): "is not a regular file"}
    for (name, overwrite), words in cases.items():
        why = refusal(tmp_path / name, "runner embeddings", overwrite)
        assert why.startswith(str(tmp_path / name)) and words in why and "\n" not in why, why
    assert "holds a hetero runner embeddings" in refusal(tmp_path / "emb.npy", "latency JSON", True)


def test_the_image_list_is_ours_only_beside_its_embeddings(tmp_path):
    out, listing = tmp_path / "emb.npy", tmp_path / "emb.txt"
    listing.write_text("a.png\nb.png\n")
    assert "not the image list" in run_refusal(out, listing, True)  # no embeddings: a user's .txt
    np.save(out, unit_rows(2))
    assert listing_is_ours(listing, out) and run_refusal(out, listing, True) is None
    assert "pass --overwrite" in run_refusal(out, listing, False)
    listing.write_text("a.png\nb.png\nc.png\n")  # one line per row, or it is not the list of these rows
    assert not listing_is_ours(listing, out) and "not the image list" in run_refusal(out, listing, True)
    assert run_refusal(out, None, True) is None  # a .npy input writes no list: a .txt beside is left alone


def test_write_all_writes_every_file_or_none(tmp_path):
    (tmp_path / "a.npy").write_bytes(b"old")

    def fails(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_all({tmp_path / "a.npy": b"new", tmp_path / "a.txt": fails})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"] and (tmp_path / "a.npy").read_bytes() == b"old"
    write_all({tmp_path / "a.npy": b"new", tmp_path / "a.txt": lambda f: f.write(b"x\n")})
    assert (tmp_path / "a.npy").read_bytes() == b"new" and (tmp_path / "a.txt").read_bytes() == b"x\n"
    mask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "m.bin", b"")
    finally:
        os.umask(mask)
    assert (tmp_path / "m.bin").stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "a.txt", "m.bin"]

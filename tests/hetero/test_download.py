"""The Fashion-MNIST download against a real HTTP server on 127.0.0.1 (no network): pinned sha256s,
a bounded response, bounded decompression, nothing left behind on any failure; and the pinned
sha256s themselves, rebuilt from the Debian package's copy of the published files."""
from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from mirror import Server, isolate

from hetero.data import find_fashion_mnist, load_fashion_mnist, read_idx
from hetero.data import fashion_mnist as fm
from hetero.errors import HeteroError

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def idx(arr: np.ndarray) -> bytes:
    return struct.pack(f">BBBB{arr.ndim}i", 0, 0, 0x08, arr.ndim, *arr.shape) + arr.astype(">u1").tobytes()


def small_set(n_train: int = 6, n_test: int = 3) -> dict[str, bytes]:
    """Four IDX files of a tiny Fashion-MNIST-shaped set, gzipped: name -> .gz bytes."""
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        out[f"{prefix}-images-idx3-ubyte"] = gzip.compress(idx(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)))
        out[f"{prefix}-labels-idx1-ubyte"] = gzip.compress(idx(np.arange(n) % 10))
    return out


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def isolated(tmp_path, monkeypatch, server):
    """Lookups see an empty HOME, no HETERO_DATA, no system dataset; downloads go to ``server``."""
    return isolate(monkeypatch, tmp_path, server.url)


def pin(monkeypatch, files: dict[str, bytes], raw: dict[str, int] | None = None, n=(6, 3)) -> None:
    """Pin ``files`` as the published ones (sha256, size; decompressed size ``raw`` or the real one)."""
    table = {k: (hashlib.sha256(v).hexdigest(), len(v), (raw or {}).get(k, len(gzip.decompress(v))))
             for k, v in files.items()}
    monkeypatch.setattr(fm, "SHA256", table)
    monkeypatch.setattr(fm, "_EXPECTED", {"train": n[0], "t10k": n[1]})


def fails(match: str) -> str:
    with pytest.raises(HeteroError, match=match) as e:
        find_fashion_mnist(None)
    msg = str(e.value)
    assert "\n" not in msg and "HETERO_DATA" in msg, msg
    return msg


def test_download_checks_and_places_the_files(isolated, server, monkeypatch):
    files = small_set()
    pin(monkeypatch, files)
    server.serve(files)
    got = find_fashion_mnist(None)
    assert got == fm.download_dir() and sorted(server.hits) == sorted(f"/fm/{k}.gz" for k in files)
    assert len(load_fashion_mnist(got, "test")) == 3 and len(load_fashion_mnist(got, "train")) == 6
    assert [p.name for p in got.parent.iterdir()] == ["fashion-mnist"]  # no temp dir beside it
    assert {p.name: p.read_bytes() for p in got.iterdir()} == {f"{k}.gz": v for k, v in files.items()}


@pytest.mark.parametrize("damage", ["flipped", "truncated", "dropped", "longer"])
def test_damaged_download_is_refused_and_nothing_is_left(isolated, server, monkeypatch, damage):
    """A flipped byte fails the pinned sha256; a short file or a dropped connection, and a response
    longer than the published file, are refused by size. HOME is left as it was."""
    files = small_set()
    pin(monkeypatch, files)
    name = "train-images-idx3-ubyte"
    bad = dict(files)
    if damage == "flipped":
        bad[name] = files[name][:-5] + bytes([files[name][-5] ^ 1]) + files[name][-4:]
    elif damage == "truncated":
        bad[name] = files[name][: len(files[name]) // 2]
    elif damage == "longer":
        bad[name] = files[name] + b"\0" * 5000
    server.serve(bad)
    if damage == "dropped":
        server.short.add(f"/fm/{name}.gz")
    words = {"flipped": "has sha256 .* not the published", "truncated": "ended after", "dropped": "ended after",
             "longer": "larger than the"}[damage]
    assert name in fails(f"download failed: .*{words}")
    assert not isolated.exists()  # the cache folders the download made are gone again


def test_gzip_bomb_is_not_decompressed_past_the_known_size(isolated, server, monkeypatch):
    """Even a file matching its pin (a pin copied from a hostile mirror) decompresses no further than
    the size of the published file: an IDX header claiming 6 images, then 64 MiB of zeros."""
    files = small_set()
    name = "train-images-idx3-ubyte"
    real = gzip.decompress(files[name])
    files[name] = gzip.compress(real + b"\0" * (64 << 20), compresslevel=9)
    assert len(files[name]) < 200_000
    pin(monkeypatch, files, raw={name: len(real)})
    server.serve(files)
    fails(f"{name}.gz: IDX data is {len(real) - 16 + (1 << 20)}\\+ bytes but dims \\(6, 28, 28\\) need {6 * 784}")
    assert not isolated.exists()


def test_idx_header_claiming_more_than_allowed_is_refused_before_reading(tmp_path):
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(struct.pack(">BBBB3i", 0, 0, 0x08, 3, 60000, 28, 28)))
    with pytest.raises(HeteroError, match="claim 47,040,016 bytes, more than the 1,000 expected"):
        read_idx(p, max_bytes=1000)
    big = tmp_path / "big.gz"  # dims of 2^31-1 cubed: refused by the default bound, nothing allocated
    big.write_bytes(gzip.compress(struct.pack(">BBBB3i", 0, 0, 0x08, 3, 2**31 - 1, 2**31 - 1, 2**31 - 1)))
    with pytest.raises(HeteroError, match="more than the 2,147,483,648 expected"):
        read_idx(big)


@pytest.mark.parametrize("url", ["http://example.com/fm/", "ftp://127.0.0.1/", "file:///etc/"])
def test_mirror_must_be_https(isolated, monkeypatch, url):
    monkeypatch.setenv(fm.URL_ENV, url)
    fails(r"download failed: \$HETERO_FASHION_MNIST_URL=.* must be an https:// URL")


def _published(name: str) -> bytes:
    """The file as Zalando publishes it, rebuilt from the Debian package's copy: Debian re-wrote only
    the gzip header (no file name, its own time stamp); the deflate stream and trailer are the same."""
    deb = (SYSTEM_FMNIST / f"{name}.gz").read_bytes()
    assert deb[:4] == b"\x1f\x8b\x08\x00" and deb[8:10] == b"\x00\x03"  # deflate, no FNAME, unix
    mtime = 0x59A7E9DE if name.startswith("train") else 0x59A7E9F3  # upstream's, 2017-08-31
    return b"\x1f\x8b\x08\x08" + struct.pack("<I", mtime) + b"\x00\x03" + name.encode() + b"\x00" + deb[10:]


# the MD5s the upstream README (github.com/zalandoresearch/fashion-mnist) publishes
PUBLISHED_MD5 = {"train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                 "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
                 "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
                 "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310"}


@pytest.mark.skipif(not SYSTEM_FMNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_pinned_sha256s_are_the_published_files_and_download_with_the_real_pins(isolated, server):
    """The pins are right: the rebuilt files have the published MD5s and the pinned sha256s and sizes;
    served from 127.0.0.1, they download through the real pins and decompression bounds."""
    files = {name: _published(name) for name in fm.FILES}
    for name, data in files.items():
        sha, size, raw = fm.SHA256[name]
        assert hashlib.md5(data).hexdigest() == PUBLISHED_MD5[name]
        assert (hashlib.sha256(data).hexdigest(), len(data), len(gzip.decompress(data))) == (sha, size, raw)
    server.serve(files)
    got = find_fashion_mnist(None)
    ds = load_fashion_mnist(got, "test")
    assert len(ds) == 10000 and np.bincount(ds.labels).tolist() == [1000] * 10


def test_unreachable_mirror_is_one_line(isolated, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(fm.URL_ENV, f"http://127.0.0.1:{port}/")
    fails("download failed: .*[Cc]onnection refused")
    assert not isolated.exists()

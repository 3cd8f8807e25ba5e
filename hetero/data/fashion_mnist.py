"""Fashion-MNIST: find it on disk (or download it once), and load a split as an ImageSet."""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

from hetero._atomic import publish_dir
from hetero.data._idx import read_idx
from hetero.data.imageset import ImageSet
from hetero.errors import HeteroError
from hetero.locations import cache_dir

CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)
# the files as Zalando Research publishes them, in their GitHub repository (https; the S3 website
# endpoint earlier versions used serves plain http only); HETERO_FASHION_MNIST_URL names a mirror
URL = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
URL_ENV = "HETERO_FASHION_MNIST_URL"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_PREFIX = {"train": "train", "test": "t10k"}
# name -> (sha256 of the .gz as published, its size, its size decompressed). The sha256s are of the
# files whose MD5s the upstream README publishes (8d4fb7e6..., 25c81989..., bef4ecab..., bb300cfd...);
# tests/hetero/test_download.py rebuilds them from the Debian package's copies and checks all three.
SHA256: dict[str, tuple[str, int, int]] = {
    "train-images-idx3-ubyte": ("3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84", 26421880, 47040016),
    "train-labels-idx1-ubyte": ("a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845", 29515, 60008),
    "t10k-images-idx3-ubyte": ("346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073", 4422102, 7840016),
    "t10k-labels-idx1-ubyte": ("67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5", 5148, 10008),
}
# Expected sample counts per file prefix, checked after a download.
_EXPECTED = {"train": 60000, "t10k": 10000}
_TIMEOUT_S = 10.0


def download_dir() -> Path:
    """Where a downloaded copy lives: ``fashion-mnist`` in hetero's cache (``$HETERO_CACHE``, else
    ``~/.cache/hetero``)."""
    return cache_dir() / "fashion-mnist"


def _file(root: Path, name: str) -> Path | None:
    """``root/name`` or ``root/name.gz``, whichever exists (raw first)."""
    for cand in (root / name, root / f"{name}.gz"):
        if cand.is_file():
            return cand
    return None


def has_fashion_mnist(root: str | Path) -> bool:
    """True if ``root`` holds the four Fashion-MNIST IDX files (raw or .gz)."""
    root = Path(root)
    return root.is_dir() and all(_file(root, f) is not None for f in FILES)


def _candidates() -> list[Path]:
    out: list[Path] = []
    env = os.environ.get("HETERO_DATA")
    if env:
        out += [Path(env).expanduser(), Path(env).expanduser() / "fashion-mnist"]
    out += [download_dir(), SYSTEM_DIR]
    return out


def find_fashion_mnist(data: str | None = None, download: bool = True) -> Path:
    """Folder holding the four Fashion-MNIST IDX files; search order as in DESIGN.md, else download."""
    if data is not None:
        root = Path(data).expanduser()
        if has_fashion_mnist(root):
            return root
        missing = [f for f in FILES if _file(root, f) is None] if root.is_dir() else list(FILES)
        raise HeteroError(
            f"--data {data}: Fashion-MNIST files not found ({', '.join(missing)}[.gz] missing); "
            "pass a folder holding the four IDX files (raw or .gz)"
        )
    looked = _candidates()
    for root in looked:
        if has_fashion_mnist(root):
            return root
    reason = "download disabled"
    if download:
        try:
            return _download(download_dir())
        except (OSError, HeteroError, http.client.HTTPException, ValueError) as e:
            reason = f"download failed: {_one_line(e)}"
    where = ", ".join(str(p) for p in looked)
    raise HeteroError(
        f"Fashion-MNIST not found (looked in {where}; {reason}); install it with "
        "`apt-get install dataset-fashion-mnist`, or put the four IDX .gz files in a folder "
        "and pass --data DIR or set HETERO_DATA"
    )


def _one_line(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def base_url() -> str:
    """Where the four files are fetched from: :data:`URL`, or the mirror ``$HETERO_FASHION_MNIST_URL``
    names (https, or http on this machine only: a local mirror)."""
    url = os.environ.get(URL_ENV) or URL
    parts = urllib.parse.urlsplit(url)
    local = parts.hostname in ("localhost", "127.0.0.1", "::1")
    if parts.scheme != "https" and not (parts.scheme == "http" and local):
        raise HeteroError(f"${URL_ENV}={url} must be an https:// URL (http only for localhost)")
    return url if url.endswith("/") else url + "/"


def _fetch(url: str, dest: Path, size: int) -> None:
    """``url`` to ``dest``, refusing a response larger than ``size`` bytes (without reading it all)."""
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as r, open(dest, "wb") as f:
        left = size
        while True:
            chunk = r.read(min(1 << 20, left + 1))
            if not chunk:
                break
            if len(chunk) > left:
                raise HeteroError(f"{url} is larger than the {size:,} bytes of the published file; "
                                  "the server or a proxy sent something else")
            f.write(chunk)
            left -= len(chunk)
    if left:
        raise HeteroError(f"{url} ended after {size - left:,} of its {size:,} bytes (the connection dropped?); try again")


def _check_sha256(path: Path, url: str, want: str) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != want:
        raise HeteroError(f"{url} has sha256 {h.hexdigest()[:16]}..., not the published {want[:16]}... "
                          f"({path.stat().st_size:,} bytes); the download is damaged or not Fashion-MNIST, try again")


def _download(dest: Path) -> Path:
    """Fetch the four .gz files into a temp dir beside ``dest``, check their pinned sha256s, read them
    (decompressing no more than each file's known size), then rename into place. Nothing is left on
    any failure."""
    url = base_url()
    made = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]  # removed again on failure
    dest.parent.mkdir(parents=True, exist_ok=True)
    if sys.stderr.isatty():  # a notice for whoever waits at a terminal; a log or pipe gets only the outcome
        print(f"downloading Fashion-MNIST (30 MB) from {url} to {dest}", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=".fashion-mnist-", dir=dest.parent))
    done = False
    try:
        for name in FILES:
            sha, size, _ = SHA256[name]
            _fetch(f"{url}{name}.gz", tmp / f"{name}.gz", size)
            _check_sha256(tmp / f"{name}.gz", f"{url}{name}.gz", sha)
        for prefix, n in _EXPECTED.items():
            imgs = read_idx(tmp / f"{prefix}-images-idx3-ubyte.gz", max_bytes=SHA256[f"{prefix}-images-idx3-ubyte"][2])
            labels = read_idx(tmp / f"{prefix}-labels-idx1-ubyte.gz", max_bytes=SHA256[f"{prefix}-labels-idx1-ubyte"][2])
            if imgs.shape != (n, 28, 28) or labels.shape != (n,):
                raise HeteroError(
                    f"downloaded {prefix} files have shapes {imgs.shape}/{labels.shape}, expected ({n}, 28, 28)/({n},)"
                )
        # on disk before it is named: a power cut never leaves empty files at dest
        if not publish_dir(tmp, dest) and not has_fashion_mnist(dest):  # lost a race: fine if the other finished
            raise HeteroError(f"{dest} appeared during the download but holds no complete Fashion-MNIST; remove it "
                              "and run again")
        done = True
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in made if not done else ():
            try:
                d.rmdir()
            except OSError:
                break


def load_fashion_mnist(root: str | Path, split: str) -> ImageSet:
    """Load split ``"train"`` or ``"test"`` as uint8 ``[N, 28, 28, 1]`` images and int64 labels."""
    if split not in _PREFIX:
        raise HeteroError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    root = Path(root)
    prefix = _PREFIX[split]
    paths = []
    for kind in ("images-idx3", "labels-idx1"):
        p = _file(root, f"{prefix}-{kind}-ubyte")
        if p is None:
            raise HeteroError(
                f"{root}: {prefix}-{kind}-ubyte[.gz] not found; pass a folder holding the four Fashion-MNIST IDX files"
            )
        paths.append(p)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.dtype != np.uint8 or images.ndim != 3:
        raise HeteroError(
            f"{paths[0]}: expected 3-D unsigned-byte images [N, H, W], got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise HeteroError(f"{paths[1]}: expected 1-D integer labels [N], got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise HeteroError(
            f"{root}: {len(images)} images but {len(labels)} labels for split {split!r}; "
            "the files do not belong together"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise HeteroError(
            f"{paths[1]}: labels span {int(labels.min())}..{int(labels.max())}, expected 0..{len(CLASSES) - 1}"
        )
    return ImageSet(images[..., None], labels.astype(np.int64), CLASSES, f"fashion-mnist/{split}")

"""Fixtures of the bad-input matrix: the files a user hands over (built once per worker), a place for
each case's output, a full disk, and the watch on the user's trees (see tests/support/badinput.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import badinput
from badinput import SHIM, child_env, listing
from clitest import other_space_cloud


@pytest.fixture(autouse=True)
def _watch(request, tmp_path):
    """Every command a case runs must leave the handed-over files and the case's own tree as they were."""
    roots = [tmp_path]
    if "art" in request.fixturenames:
        roots.insert(0, request.getfixturevalue("art"))
    badinput.WATCHED[:] = roots
    yield
    badinput.WATCHED[:] = []


@pytest.fixture
def place(tmp_path):
    """A directory for one case's output; on exit, nothing may have appeared in it but what the
    case declared (``place.allow``)."""
    d = tmp_path / "place"
    d.mkdir()

    class Place:
        path = d
        allow: set[str] = set()

    before = listing(d)
    yield Place
    after = {k: v for k, v in listing(d).items() if k.split("/")[0] not in Place.allow}
    assert after == before, f"left behind: {sorted(set(after) - set(before))}"


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def art(saved, tmp_path_factory):
    """The conftest's tiny cloud and edge, another cloud (its own space), an export with ONNX and
    Core ML FP16, data folders, BYO weights and the child-process shim."""
    from export import export_checkpoint
    from hetero.checkpoint import load_checkpoint

    root = tmp_path_factory.mktemp("bad-inputs")
    for name in ("cloud", "edge"):
        shutil.copytree(saved / name, root / name)
    other_space_cloud(root / "cloud", root / "cloud2")
    export_checkpoint(load_checkpoint(root / "edge"), root / "export", name="edge", formats=("onnx", "coreml-fp16"))
    (root / "shim").mkdir()
    (root / "shim" / "sitecustomize.py").write_text(SHIM)
    _image_folders(root)
    _byo_files(root)
    return root


def _image_folders(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    modes = ["RGB", "L", "P", "RGBA", "LA", "1", "I;16", "CMYK"]
    for split, n in (("train", 12), ("test", 4)):
        for c in range(2):
            d = root / "mixed" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                w, h = (int(v) for v in rng.integers(12, 48, 2))
                rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                mode = modes[(i + c) % len(modes)]
                im = Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 250) if mode == "I;16" else rgb.convert(mode)
                im.save(d / f"{i}.{'jpg' if mode == 'CMYK' else 'png'}")
            (d / "README.txt").write_text("not an image: ignored")  # non-image files are skipped
    (root / "mixed" / "train" / "class1" / ".DS_Store").write_bytes(b"\0\1\2")
    shutil.copytree(root / "mixed", root / "truncated")
    png = (root / "mixed" / "train" / "class0" / "0.png").read_bytes()
    (root / "truncated" / "train" / "class0" / "0.png").write_bytes(png[: len(png) // 2])
    shutil.copytree(root / "mixed", root / "textjpg")
    (root / "textjpg" / "train" / "class1" / "photo.jpg").write_text("this is a text file, not a JPEG")
    (root / "empty").mkdir()


class _Evil:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _byo_files(root: Path) -> None:
    import pickle

    import torch
    from safetensors.torch import save_file

    (root / "byo").mkdir()
    (root / "byo" / "tinybyo.py").write_text(
        "import torch\n\ndef make(dim=8):\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), "
        "torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, dim))\n")
    sys.path.insert(0, str(root / "byo"))
    try:
        import tinybyo
    finally:
        sys.path.remove(str(root / "byo"))
    state = {k: v.contiguous() for k, v in tinybyo.make().state_dict().items()}
    save_file(state, str(root / "byo" / "good.safetensors"))
    good = (root / "byo" / "good.safetensors").read_bytes()
    (root / "byo" / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    nan = {k: v.clone() for k, v in state.items()}
    nan["0.weight"][0, 0, 0, 0] = float("nan")
    save_file(nan, str(root / "byo" / "nan.safetensors"))
    marker = root / "byo" / "PWNED"
    torch.save({**state, "extra": _Evil(marker)}, root / "byo" / "evil.pt")  # torch zip format
    with open(root / "byo" / "evil_legacy.pt", "wb") as f:  # a bare pickle stream
        pickle.dump(_Evil(marker), f)


# ------------------------------------------------------------------------------------------ full disk

@pytest.fixture
def full_disk(tmp_path, art):
    """Factory: a directory on a tiny tmpfs (root can mount one here), else one whose writes fail with
    ENOSPC through the child shim. Yields (dir, env)."""
    mounted: list[Path] = []

    def make(size: str) -> tuple[Path, dict[str, str] | None]:
        d = tmp_path / f"full-{size}"
        d.mkdir()
        if os.geteuid() == 0 and shutil.which("mount") and not os.environ.get("HETERO_TEST_NO_TMPFS"):
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
            if r.returncode == 0:
                mounted.append(d)
                return d, None  # a real full disk: the case runs in this process
        return d, child_env({"HETERO_TEST_ENOSPC": str(d)}, shim=art / "shim")

    yield make
    for d in mounted:
        subprocess.run(["umount", str(d)], capture_output=True)



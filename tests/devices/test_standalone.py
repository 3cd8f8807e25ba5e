"""The torch-free standalone runner (``python -m devices``, the packed ``runner.zip``), run in
subprocesses where torch, hetero and export cannot be imported."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import devices
from devices import DeviceError, create_runner
from devices.bench import check_result
from devices.standalone import load_image, main, pack_runner, preprocess_images

REPO = Path(devices.__file__).resolve().parents[1]

# Runs a module (-m NAME) or a script/zip with torch, hetero and export made unimportable (and any
# modules named by --block), and without the editable install's finder, so only what is on sys.path
# (the repo via PYTHONPATH, or a zip) can be imported. With --report FILE it writes, at exit, where
# each loaded devices module came from and which top-level modules were loaded.
BLOCKER = r'''
import atexit, json, runpy, sys
args = sys.argv[1:]
blocked = ["torch", "hetero", "export"]
report = None
while args and args[0] in ("--block", "--report"):
    if args[0] == "--block":
        blocked += args[1].split(",")
    else:
        report = args[1]
    args = args[2:]
for m in blocked:
    sys.modules[m] = None
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in (getattr(f, "__module__", "") or "")]
if report:
    def _report():
        mods = {k: getattr(v, "__file__", None) for k, v in list(sys.modules.items())
                if v is not None and k.split(".")[0] == "devices"}
        tops = sorted({k.split(".")[0] for k, v in list(sys.modules.items()) if v is not None})
        with open(report, "w") as f:
            json.dump({"devices": mods, "top": tops}, f)
    atexit.register(_report)
if args[0] == "-m":
    sys.argv = [args[1]] + args[2:]
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
else:
    sys.argv = args
    runpy.run_path(args[0], run_name="__main__")
'''
FORBIDDEN = {"torch", "hetero", "export"}


@pytest.fixture(scope="module")
def blocker(tmp_path_factory):
    path = tmp_path_factory.mktemp("blocker") / "blocker.py"
    path.write_text(BLOCKER)
    return path


def run_blocked(blocker, *args, cwd=None, env_path=str(REPO)):
    """``python blocker.py ARGS`` in a subprocess; PYTHONPATH is the repo (or ``env_path``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if env_path:
        env["PYTHONPATH"] = env_path
    return subprocess.run([sys.executable, str(blocker), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def make_images(root: Path) -> None:
    """Images of several sizes and modes under root/train/{a,b} and root/test/a, plus things to skip."""
    from PIL import Image

    rng = np.random.default_rng(0)
    specs = {"train/a/0.png": ("RGB", (40, 30)), "train/a/1.jpg": ("L", (28, 28)), "train/a/sub/2.png": ("P", (17, 50)),
             "train/b/3.png": ("RGBA", (64, 64)), "train/b/4.bmp": ("L", (9, 12)), "test/a/5.png": ("RGB", (28, 28))}
    for name, (mode, (w, h)) in specs.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        chans = {"RGB": 3, "RGBA": 4, "L": 1, "P": 1}[mode]
        arr = rng.integers(0, 256, (h, w, chans), dtype=np.uint8)
        im = Image.fromarray(arr[..., 0] if chans == 1 else arr, {"P": "L"}.get(mode, mode))
        if mode == "P":
            im = im.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        im.save(p)
    (root / "train/a/.hidden.png").write_bytes((root / "train/a/0.png").read_bytes())
    (root / "train/b/notes.txt").write_text("not an image\n")


def test_run_and_bench_without_torch_match_the_in_process_runner(tmp_path, saved, synth, prep, blocker):
    x = prep.apply(synth[1].images[:70])
    np.save(tmp_path / "x.npy", x)
    report = tmp_path / "report.json"
    proc = run_blocked(blocker, "--report", report, "-m", "devices", "run", saved / "export", "--input",
                       tmp_path / "x.npy", "--out", tmp_path / "emb.npy", "--batch-size", 32, "--threads", 1)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(report.read_text())
    assert "onnxruntime" in loaded["top"] and not FORBIDDEN & set(loaded["top"])
    got = np.load(tmp_path / "emb.npy")
    with create_runner(saved / "export", "onnxruntime", batch_size=32, threads=1) as r:
        ref = r.embed(x)
    assert got.dtype == np.float32 and got.shape == ref.shape == (70, 16)
    assert np.abs(got - ref).max() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy", "report.json", "x.npy"]  # no temp files left

    proc = run_blocked(blocker, "-m", "devices", "bench", saved / "export", "--batch", "1,4", "--iters", 3,
                       "--warmup", 1, "--threads", 1, "--json", tmp_path / "lat.json")
    assert proc.returncode == 0, proc.stderr
    res = check_result(json.loads((tmp_path / "lat.json").read_text()))
    assert [r["batch"] for r in res["results"]] == [1, 4] and all(r["iterations"] == 3 for r in res["results"])
    assert res["settings"] == {"threads": 1} and res["label"] == "measured" and res["artifact"]["format"] == "onnx"
    assert "p50" in proc.stdout  # the summary table

    proc = run_blocked(blocker, "-m", "devices", "bench", saved / "export", "--profile", "host-cpu-1thread",
                       "--batch", "2", "--budget", "0.05", "--warmup", 0, "--json", "-")
    assert proc.returncode == 0, proc.stderr
    res = check_result(json.loads(proc.stdout))
    assert res["profile"]["name"] == "host-cpu-1thread" and res["settings"] == {"threads": 1}
    assert res["protocol"]["budget_s"] == 0.05 and res["results"][0]["iterations"] >= 5


def runner_against_hetero(saved: Path, folder: Path, root: Path, out: Path, blocker, batch: int):
    """hetero's ImageFolder + Preprocess reference for ``folder`` (its "train" split) and its embeddings,
    then ``python -m devices run`` over ``root``: (manifest, reference inputs, reference embeddings,
    the runner's row names as paths)."""
    from hetero.data import Preprocess
    from hetero.data.image_folder import load_image_folder

    manifest = json.loads((saved / "export" / "manifest.json").read_text())
    prep = Preprocess.from_dict(manifest["preprocess"])
    ds = load_image_folder(folder, "train", size=prep.size, channels=prep.channels, progress=False)
    ref_x = prep.apply(ds.images)
    with create_runner(saved / "export", batch_size=batch) as r:
        ref = r.embed(ref_x)
    out.parent.mkdir()
    proc = run_blocked(blocker, "-m", "devices", "run", saved / "export", "--input", root, "--out", out,
                       "--batch-size", batch)
    assert proc.returncode == 0, proc.stderr
    assert np.abs(np.load(out) - ref).max() == 0
    return manifest, ref_x, ref, [Path(n) for n in out.with_suffix(".txt").read_text().splitlines()]


def test_images_are_preprocessed_exactly_as_hetero_does(tmp_path, saved, blocker):
    root = tmp_path / "imgs"
    make_images(root)
    # a directory: recursive, sorted, hidden files and non-images skipped, the paths written beside
    out = tmp_path / "out" / "emb.npy"
    manifest, ref_x, ref, names = runner_against_hetero(saved, root, root / "train", out, blocker, 2)
    assert [n.relative_to(root / "train").as_posix() for n in names] == \
        ["a/0.png", "a/1.jpg", "a/sub/2.png", "b/3.png", "b/4.bmp"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["emb.npy", "emb.txt"]
    # the preprocessing itself, bit for bit
    assert np.array_equal(preprocess_images(names, manifest["preprocess"]), ref_x)

    # a list file (relative to its directory, comments skipped) and a single image
    (root / "list.txt").write_text("# picked\ntrain/b/4.bmp\n\n" + str(root / "train/a/0.png") + "\n")
    proc = run_blocked(blocker, "-m", "devices", "run", saved / "export", "--input", root / "list.txt",
                       "--out", tmp_path / "l.npy", "--batch-size", 2)
    assert proc.returncode == 0, proc.stderr
    got = np.load(tmp_path / "l.npy")
    assert got.shape == (2, 16)
    np.testing.assert_allclose(got, ref[[4, 0]], rtol=0, atol=1e-6)  # other batches: equal up to rounding
    assert (tmp_path / "l.txt").read_text().splitlines() == [str(root / "train/b/4.bmp"), str(root / "train/a/0.png")]
    assert main(["run", str(saved / "export"), "--input", str(root / "train/b/3.png"), "--out", str(tmp_path / "one.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "one.npy"), ref[[3]], rtol=0, atol=1e-6)

    # without Pillow: one line naming the pip command, nothing written
    proc = run_blocked(blocker, "--block", "PIL", "-m", "devices", "run", saved / "export", "--input", root / "train",
                       "--out", tmp_path / "nopil.npy")
    assert_one_line_error(proc, "pip install pillow")
    assert not (tmp_path / "nopil.npy").exists()


def test_high_bit_depth_images_are_preprocessed_as_hetero_does_and_float_ones_refused_alike(tmp_path, saved, blocker):
    """16-bit PNG, 32-bit "I" TIFF, a .tiff: scaled by their type's range on the device as in training
    (never clipped), bit for bit; a float image is refused by both with the same one line."""
    from PIL import Image

    from hetero.data import Preprocess
    from hetero.data.image_folder import load_image_folder
    from hetero.errors import HeteroError

    root = tmp_path / "deep"
    (root / "train/a").mkdir(parents=True)
    (root / "train/b").mkdir(parents=True)
    g16 = np.array([[0, 257 * 64, 65535, 300], [1000, 40000, 128, 129]] * 2, dtype=np.uint16)
    Image.fromarray(g16).save(root / "train/a/g16.png")
    assert Image.open(root / "train/a/g16.png").mode == "I;16"
    i32 = np.array([[-(2**31), -1, 0, 2**31 - 1]] * 4, dtype=np.int32)
    Image.fromarray(i32).save(root / "train/a/i32.tif")
    assert Image.open(root / "train/a/i32.tif").mode == "I"
    rgb = np.random.default_rng(1).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "train/b/rgb.tiff")
    # at its own size: 257*64 -> 64, not the 255 a clip gives; 32 bits over their signed range
    assert load_image(root / "train/a/g16.png", 4, 1)[:2, :, 0].tolist() == [[0, 64, 255, 1], [4, 156, 0, 1]]
    assert load_image(root / "train/a/i32.tif", 4, 1)[0, :, 0].tolist() == [0, 127, 128, 255]

    # root/train as a flat ImageFolder (classes a, b): its "train" split is every file here
    manifest, ref_x, ref, names = runner_against_hetero(saved, root / "train", root / "train", tmp_path / "out" / "emb.npy",
                                                        blocker, 4)
    assert [n.relative_to(root / "train").as_posix() for n in names] == ["a/g16.png", "a/i32.tif", "b/rgb.tiff"]
    assert np.array_equal(preprocess_images(names, manifest["preprocess"]), ref_x)
    # and in colour, at another size
    prep3 = Preprocess(11, 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    ds3 = load_image_folder(root / "train", "train", size=11, channels=3, progress=False)
    assert np.array_equal(preprocess_images(names, prep3.to_dict()), prep3.apply(ds3.images))

    # a float image: the same one line from the runner and from hetero, naming the file
    Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)).save(root / "train/b/depth.tif")
    with pytest.raises(HeteroError) as e:
        load_image_folder(root / "train", "train", progress=False)
    assert "\n" not in str(e.value) and "depth.tif: a floating-point image (mode F)" in str(e.value)
    proc = run_blocked(blocker, "-m", "devices", "run", saved / "export", "--input", root / "train",
                       "--out", tmp_path / "f.npy")
    assert_one_line_error(proc, "depth.tif: a floating-point image (mode F)", "convert it")
    assert proc.stderr.strip() == f"error: {e.value}"
    with pytest.raises(DeviceError, match=r"^\S*depth\.tif: a floating-point image") as d:
        preprocess_images([root / "train/b/depth.tif"], manifest["preprocess"])
    assert str(d.value) == str(e.value) and not (tmp_path / "f.npy").exists()


def test_errors_are_one_line_and_leave_nothing_half_written(tmp_path, saved, blocker, capsys):
    x = np.zeros((3, 1, 28, 28), np.float32)
    np.save(tmp_path / "x.npy", x)
    mine = tmp_path / "emb.npy"  # a user's file: never replaced
    mine.write_bytes(b"old")
    out = tmp_path / "new.npy"  # never written: every command below fails
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not a png")

    # subprocess: bad arguments and a device error, no traceback
    assert_one_line_error(run_blocked(blocker, "-m", "devices", "bench", saved / "export", "--batch", "1,x"), "--batch")
    assert_one_line_error(run_blocked(blocker, "-m", "devices", "run", saved / "export", "--input", tmp_path / "imgs",
                                      "--out", out), "bad.png", "cannot read image")
    assert_one_line_error(run_blocked(blocker, "-m", "devices", "frobnicate"), "invalid choice")
    assert mine.read_bytes() == b"old" and not out.exists()

    cases = [
        (["run", str(tmp_path), "--input", str(tmp_path / "x.npy"), "--out", str(out)], "no manifest.json"),
        (["run", str(saved / "export"), "--input", str(tmp_path / "nope.npy"), "--out", str(out)], "no such file"),
        (["run", str(saved / "export"), "--input", str(tmp_path / "x.npy"), "--out", str(tmp_path / "no" / "e.npy")],
         "does not exist"),
        (["run", str(saved / "export"), "--input", str(tmp_path / "x.npy"), "--out", str(out), "--precision", "int8"],
         "no onnx artifact of precision int8"),
        (["run", str(saved / "export"), "--input", str(tmp_path / "x.npy"), "--out", str(out), "--runtime", "tflite"],
         "unknown runtime"),
        (["run", str(saved / "export"), "--input", str(tmp_path / "x.npy"), "--out", str(out), "--threads", "0"],
         "--threads"),
        (["bench", str(saved / "export"), "--iters", "3", "--budget", "1"], "not allowed with"),
        (["bench", str(saved / "export"), "--profile", "nokia-3310"], "unknown device profile"),
        (["bench", str(saved / "export"), "--warmup", "-1"], "--warmup"),
        (["run", str(saved / "export"), "--input", str(tmp_path / "x.npy"), "--out", str(mine)],
         "holds a file hetero did not write"),
        (["run", str(saved / "export"), "--input", str(tmp_path / "x.npy"), "--out", str(mine), "--overwrite"],
         "holds a file hetero did not write"),
    ]
    for argv, needle in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (argv, err)
    assert mine.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy", "imgs", "x.npy"]
    with np.testing.assert_raises(SystemExit):
        main(["--help"])


def test_packed_runner_runs_alone_and_gives_the_same_embeddings(tmp_path, saved, synth, prep, blocker):
    z = pack_runner(tmp_path / "runner.zip")
    names = zipfile.ZipFile(z).namelist()
    core = sorted(f"devices/{p.name}" for p in (REPO / "devices").glob("*.py") if p.name != "remote.py")
    assert names == ["__main__.py", *core]
    assert not any("__pycache__" in n or "test" in n for n in names)
    assert pack_runner(tmp_path / "again.zip").read_bytes() == z.read_bytes()  # reproducible

    x = prep.apply(synth[1].images[:20])
    work = tmp_path / "elsewhere"
    work.mkdir()
    np.save(work / "x.npy", x)
    report = work / "report.json"
    proc = run_blocked(blocker, "--report", report, z, "run", saved / "export", "--input", "x.npy", "--out", "e.npy",
                       cwd=work, env_path=None)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(report.read_text())
    assert loaded["devices"] and all(f.startswith(str(z)) for f in loaded["devices"].values()), loaded["devices"]
    assert not FORBIDDEN & set(loaded["top"])
    with create_runner(saved / "export") as r:
        assert np.abs(np.load(work / "e.npy") - r.embed(x)).max() == 0

    proc = run_blocked(blocker, z, "bench", saved / "export", "--batch", "1", "--iters", 2, "--warmup", 0, "--json", "-",
                       cwd=work, env_path=None)
    assert proc.returncode == 0, proc.stderr
    assert check_result(json.loads(proc.stdout))["results"][0]["iterations"] == 2
    proc = run_blocked(blocker, z, "bench", tmp_path, cwd=work, env_path=None)
    assert_one_line_error(proc, "no manifest.json")
    proc = run_blocked(blocker, "--block", "numpy", z, "--help", cwd=work, env_path=None)
    assert_one_line_error(proc, "pip install numpy")

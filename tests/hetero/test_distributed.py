"""train-edge under torchrun (2 processes, gloo on the CPU) against one process, and evaluate's gallery
embedding split over the ranks: same retrieval metrics, and rank 0 alone writes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clitest import PERMISSIVE_GATES, run
from hetero.app.cli import main
from hetero.app.evaluate import evaluate

pytestmark = pytest.mark.slow  # torchrun launches

EDGE = ["--data", "synthetic", "--model", "test_mobilenet", "--epochs", "3", "--loss", "influence=1,alignment=1",
        "--batch-size", "32", "--quiet"]


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HETERO_CACHE": str(cache),
            "PYTHONPATH": str(Path(__file__).parents[2])}


def launch(*args, cwd: Path, nproc: int | None = None, cache: Path) -> subprocess.CompletedProcess:
    """`python -m hetero ARGS`, or under torchrun with ``nproc`` processes (free rendezvous port: --standalone)."""
    pre = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    r = subprocess.run([sys.executable, *pre, "-m", "hetero", *map(str, args)], cwd=cwd, env=_env(cache),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def trained(saved, tmp_path_factory):
    """The conftest's tiny cloud; an edge trained on it in this process (one thread) and one under torchrun."""
    import shutil

    import torch

    d = tmp_path_factory.mktemp("ddp")
    shutil.copytree(saved / "cloud", d / "cloud")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # the same global batch: 32 in one process, 2 x 16 under torchrun (--batch-size is the global batch)
        assert main(["train-edge", "--cloud", str(d / "cloud"), "--out", str(d / "one"), *EDGE]) == 0
    finally:
        torch.set_num_threads(threads)
    two = launch("train-edge", "--cloud", "cloud", "--out", "two", *EDGE, cwd=d, nproc=2, cache=d / "cache")
    return d, two


def test_torchrun_training_matches_one_process(trained, one_thread):
    d, two = trained
    # only rank 0 wrote: one checkpoint line, no stray temporary or state directories, the same files
    assert two.stdout.count("checkpoint:") == 1
    assert sorted(p.name for p in d.iterdir()) == ["cache", "cloud", "one", "two"]
    assert sorted(p.name for p in (d / "two").iterdir()) == sorted(p.name for p in (d / "one").iterdir())
    meta = {n: json.loads((d / n / "hetero.json").read_text()) for n in ("one", "two")}
    assert meta["two"]["config"]["batch_size"] == 32 and len(meta["two"]["info"]["history"]) == 3
    # The same steps over the same samples: the per-epoch losses follow the one-process run's. Not the
    # retrieval metrics: under torchrun BatchNorm normalises over each rank's 16 images instead of 32 and
    # sums in another order, and a tiny run's mAP@R moves by several points with any such perturbation
    # (0.07 between two CPUs' kernels), while its losses move by a few per cent.
    hist = {n: [h["total"] for h in meta[n]["info"]["history"]] for n in ("one", "two")}
    for n in ("one", "two"):
        assert hist[n][-1] < hist[n][0], (n, hist[n])  # it trained
    for a, b in zip(hist["one"], hist["two"], strict=True):
        assert b == pytest.approx(a, abs=0.1 * hist["one"][0]), hist
    # both score through evaluate (the one-process model with the torch runner, as a sanity check of the files)
    for name in ("one", "two"):
        rep = evaluate(str(d / "cloud"), str(d / name), data="synthetic", progress=False, log=lambda s: None)
        assert {(r["query_model"], r["gallery_model"]) for r in rep["retrieval"]} >= {("edge", "cloud"), ("edge", "edge")}


def test_torchrun_evaluate_splits_the_gallery_and_gathers_it(trained, tmp_path, capsys, monkeypatch, one_thread):
    d, _ = trained
    # an empty cache: the two ranks embed half the gallery (and queries) each, gather the rows, and
    # rank 0 writes them to the cache; a later run (here one process) reads them from there
    args = ("evaluate", "--cloud", d / "cloud", "--edge", d / "two", "--data", "synthetic", "--quiet")
    r = launch(*args, "--out", tmp_path / "rep", cwd=tmp_path, nproc=2, cache=tmp_path / "empty-cache")
    assert r.stdout.count("report:") == 1  # rank 0 alone logs and writes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty-cache", "rep"]
    def entries():
        return {p.name: p.stat().st_mtime_ns for p in (tmp_path / "empty-cache" / "targets").iterdir()}

    first = entries()
    assert len(first) == 4 and not any(n.startswith(".") for n in first)  # cloud gallery/queries, edge queries/gallery
    one = evaluate(str(d / "cloud"), str(d / "two"), data="synthetic", progress=False, log=lambda s: None)["retrieval"]
    monkeypatch.setenv("HETERO_CACHE", str(tmp_path / "empty-cache"))
    code, _, err = run(capsys, *args, "--out", tmp_path / "rep2")
    assert code == 0, err
    assert entries() == first  # read, not rewritten
    two = json.loads((tmp_path / "rep" / "report.json").read_text())["retrieval"]
    again = json.loads((tmp_path / "rep2" / "report.json").read_text())["retrieval"]
    for a, b, c in zip(one, two, again, strict=True):
        for k in ("map_at_r", "recall_at_1", "recall_at_10"):
            # the same model, embedded in other batch shapes: equal up to a near-tie swap (one query)
            assert a[k] == pytest.approx(b[k], abs=1 / 500), (a, b)
            # the same cached rows, scored in another process set-up (faiss and the mean may sum in another order)
            assert c[k] == pytest.approx(b[k], abs=1e-6), (c, b)


def test_shard_and_chunk_cover_every_row():
    import numpy as np

    from hetero.distributed import chunk, shard

    order = np.random.default_rng(0).permutation(11)
    parts = [shard(order, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 4]  # padded to 12 by wrapping around: every rank steps alike
    assert sorted(np.concatenate(parts).tolist()) == sorted(order.tolist() + [order[0]])
    # step k of all ranks together covers the rows of step k of one process with a 3x larger batch
    assert sorted(np.concatenate([p[:2] for p in parts]).tolist()) == sorted(order[:6].tolist())
    assert np.array_equal(shard(order, 0, 1), order)
    assert np.array_equal(np.concatenate([chunk(11, r, 3) for r in range(3)]), np.arange(11))


def test_torchrun_verify_shares_the_embedding_and_rank_0_reports(trained, tmp_path, capsys, one_thread):
    """Permissive gates make the verdict PASS by construction, whichever side of the default gates a tiny
    run lands on: the test compares what rank 0 reported with the one-process report."""
    d, _ = trained
    (tmp_path / "gates.toml").write_text(PERMISSIVE_GATES)
    code, _, err = run(capsys, "export", "--edge", d / "two", "--cloud", d / "cloud", "--out", tmp_path / "exp",
                       "--formats", "onnx", "--quiet")
    assert code == 0, err
    common = ["verify", "--manifest", tmp_path / "exp", "--cloud", d / "cloud", "--data", "synthetic", "--no-latency",
              "--no-html", "--gates", tmp_path / "gates.toml", "--quiet"]
    code, _, err = run(capsys, *common, "--out", tmp_path / "v1")
    assert code == 0, err
    r = launch(*common, "--out", tmp_path / "v2", cwd=tmp_path, nproc=2, cache=tmp_path / "empty-cache")
    assert sorted(p.name for p in tmp_path.iterdir() if "cache" not in p.name) == ["exp", "gates.toml", "v1", "v2"]
    assert r.stdout.count("verdict") <= 1  # rank 0 alone reports
    one = json.loads((tmp_path / "v1" / "report.json").read_text())
    two = json.loads((tmp_path / "v2" / "report.json").read_text())
    assert one["verdict"]["exit_code"] == two["verdict"]["exit_code"] == 0
    key = lambda p: (p["name"], p["runner"])  # noqa: E731
    ran = 0
    for a, b in zip(sorted(one["pairs"], key=key), sorted(two["pairs"], key=key), strict=True):
        assert key(a) == key(b) and a["status"] == b["status"]
        if a["status"] == "ok":
            ran += 1
            for k in ("map_at_r", "recall_at_1"):
                assert a["metrics"][k] == pytest.approx(b["metrics"][k], abs=1 / 500), (a["name"], k)  # a near-tie
    assert ran >= 2  # the torch edge and the ONNX export at least


def test_the_training_device_is_chosen_by_its_own_variable_and_the_old_name_still_works(monkeypatch):
    import torch

    from hetero import distributed
    from hetero.errors import HeteroError

    monkeypatch.delenv("HETERO_DEVICE", raising=False)
    monkeypatch.setenv("HETERO_TRAIN_DEVICE", "cpu")
    assert distributed.device() == torch.device("cpu")
    monkeypatch.setenv("HETERO_TRAIN_DEVICE", "gpu")
    with pytest.raises(HeteroError, match=r"\$HETERO_TRAIN_DEVICE must be cpu or cuda, got 'gpu'"):
        distributed.device()
    monkeypatch.delenv("HETERO_TRAIN_DEVICE")
    monkeypatch.setenv("HETERO_DEVICE", "tpu")  # the name before issue 22
    with pytest.raises(HeteroError, match=r"\$HETERO_DEVICE must be cpu or cuda"):
        distributed.device()
    monkeypatch.setenv("HETERO_DEVICE", "cpu")
    assert distributed.device() == torch.device("cpu")

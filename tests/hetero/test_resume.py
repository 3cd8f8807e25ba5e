"""Step-level resume of train-cloud/train-edge: killed mid-epoch (SIGKILL, Ctrl-C), resumed with --resume,
the final weights equal an uninterrupted run's exactly; a resume that does not fit is refused in one line."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hetero._resume import INFO, STATE, read_state
from clitest import one_line_error, run
from hetero.app.cli import main
from hetero.errors import HeteroError

# 3 epochs of 30 steps: the first state appears at step 7, long before the first epoch ends
SMALL = ["--data", "synthetic", "--dim", "16", "--epochs", "3", "--batch-size", "8", "--limit", "240",
         "--save-every", "7", "--quiet"]
# in-process runs: 2 epochs of 25 steps
TINY = ["--data", "synthetic", "--dim", "16", "--epochs", "2", "--batch-size", "8", "--limit", "200",
        "--save-every", "7", "--quiet"]


def _env() -> dict[str, str]:
    # one thread: the same kernels in every process, so an interrupted and an uninterrupted run agree to the bit
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}


def hetero(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hetero", *map(str, args)], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=300)


def kill_once_saved(args, cwd: Path, state_dir: Path) -> dict:
    """Start `hetero ARGS`, SIGKILL it as soon as it has saved a mid-epoch state; return that state's metadata."""
    p = subprocess.Popen([sys.executable, "-m", "hetero", *map(str, args)], cwd=cwd, env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (state_dir / INFO).is_file():
        assert p.poll() is None, f"the run ended before saving any state: {p.stderr.read()}"
        assert time.monotonic() < deadline, "no state file within 120 s"
        time.sleep(0.005)
    p.kill()
    assert p.wait(timeout=60) == -9
    return read_state(state_dir)["meta"]


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "weights.safetensors")), load_file(str(b / "weights.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # exactly: atol 0


@pytest.fixture(scope="module")
def cloud(saved, tmp_path_factory):
    """The conftest's tiny cloud, in a directory of its own."""
    import shutil

    d = tmp_path_factory.mktemp("resume")
    shutil.copytree(saved / "cloud", d / "cloud")
    return d / "cloud"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train-edge", "train-cloud"])
def test_sigkill_then_resume_gives_the_uninterrupted_weights(command, cloud, tmp_path):
    # train-edge with --augment (online cloud targets, per-step augmentation seeds); train-cloud without
    args = (["train-edge", "--cloud", cloud, "--model", "test_mobilenet", "--augment"] if command == "train-edge"
            else ["train-cloud", "--model", "test_resnet"]) + SMALL
    r = hetero(*args, "--out", "full", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "full.resume").exists()  # removed once the checkpoint is written

    meta = kill_once_saved([*args, "--out", "part"], tmp_path, tmp_path / "part.resume")
    assert meta["position"]["epoch"] < 3 and meta["position"]["step"] > 0  # killed mid-epoch
    assert not (tmp_path / "part").exists()  # the final output is written atomically at the end only

    r = hetero(command, "--resume", "part.resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "part.resume").exists()
    same_weights(tmp_path / "full", tmp_path / "part")
    full = json.loads((tmp_path / "full" / "hetero.json").read_text())
    part = json.loads((tmp_path / "part" / "hetero.json").read_text())
    assert full["config"] == part["config"]
    assert [{k: v for k, v in h.items() if k != "img_per_s"} for h in full["info"]["history"]] == \
           [{k: v for k, v in h.items() if k != "img_per_s"} for h in part["info"]["history"]]



@pytest.fixture
def interrupted(cloud, tmp_path, capsys, monkeypatch, one_thread):
    """An in-process train-edge stopped by Ctrl-C at its 30th step (epoch 2): its state dir, and what it printed."""
    import hetero.train

    real, seen = hetero.train.iterate_batches, []

    def ctrl_c_at_step_30(*a, **kw):
        for b in real(*a, **kw):
            seen.append(1)
            if len(seen) == 30:
                raise KeyboardInterrupt
            yield b

    monkeypatch.setattr(hetero.train, "iterate_batches", ctrl_c_at_step_30)
    code, _, err = run(capsys, "train-edge", "--cloud", cloud, "--model", "test_mobilenet", "--out", tmp_path / "e",
                       *TINY)
    monkeypatch.setattr(hetero.train, "iterate_batches", real)
    assert code == 130 and not (tmp_path / "e").exists()
    return tmp_path / "e.resume", err


def test_ctrl_c_says_how_to_resume_and_resume_matches(interrupted, cloud, tmp_path, capsys):
    state, err = interrupted
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"training state (epoch 2, step 3/25) is in {state}; continue with: hetero train-edge --resume {state}" in err
    assert read_state(state)["meta"]["position"] == {"epoch": 1, "step": 3}  # the last save: global step 28 = 4 x 7
    code, out, err = run(capsys, "train-edge", "--resume", state)
    assert code == 0, err
    code, _, err = run(capsys, "train-edge", "--cloud", cloud, "--model", "test_mobilenet", "--out", tmp_path / "f",
                       *TINY)
    assert code == 0, err
    same_weights(tmp_path / "e", tmp_path / "f")


def test_resume_refusals(interrupted, cloud, tmp_path, capsys):
    state, _ = interrupted
    before = (state / STATE).read_bytes()
    msg = one_line_error(*run(capsys, "train-edge", "--resume", state, "--lr", "0.5")[::2])
    assert "--lr" in msg and "was 0.1, now 0.5" in msg
    msg = one_line_error(*run(capsys, "train-edge", "--resume", state, "--out", tmp_path / "other")[::2])
    assert "--out" in msg and "leave --out out" in msg
    msg = one_line_error(*run(capsys, "train-cloud", "--resume", state)[::2])
    assert "state of `hetero train-edge`" in msg
    # a fresh run over the leftover state points at --resume
    msg = one_line_error(*run(capsys, "train-edge", "--cloud", cloud, "--model", "test_mobilenet", "--out",
                              tmp_path / "e", *TINY)[::2])
    assert f"continue it with `hetero train-edge --resume {state}`" in msg
    msg = one_line_error(*run(capsys, "train-edge", "--resume", tmp_path / "missing")[::2])
    assert "no such directory" in msg
    assert (state / STATE).read_bytes() == before and not (tmp_path / "e").exists()

    # other data than the run's (its digest in the state no longer matches)
    s = torch.load(state / STATE, weights_only=True)
    s["meta"]["dataset_digest"] = "0" * 64
    torch.save(s, state / STATE)
    msg = one_line_error(*run(capsys, "train-edge", "--resume", state)[::2])
    assert "training data differ" in msg

    (state / STATE).write_bytes(before[: len(before) // 2])  # damaged (truncated)
    msg = one_line_error(*run(capsys, "train-edge", "--resume", state)[::2])
    assert "unreadable" in msg and "without --resume" in msg
    (state / STATE).unlink()
    msg = one_line_error(*run(capsys, "train-edge", "--resume", state)[::2])
    assert "not the state of an interrupted run" in msg
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("stop_at, position", [(10, {"epoch": 1, "step": 1}), (5, {"epoch": 0, "step": 3})])
def test_supernet_resumes_from_the_last_step(cloud, tmp_path, monkeypatch, one_thread, small_space, stop_at, position):
    """train-supernet saves mid-epoch too (out/steps); a resume there ends with the uninterrupted weights.
    Stopped in epoch 2 (after epoch 1's output), and in epoch 1 (nothing but the step state yet)."""
    import hetero.data
    from hetero.checkpoint import load_checkpoint
    from hetero.data import load_dataset
    from hetero.nas import train as nt

    c, data = load_checkpoint(cloud), load_dataset("synthetic", "train")
    cfg = nt.SupernetConfig(epochs=2, batch_size=32, limit=300, val_size=60, n_random=1,  # 8 steps per epoch
                            space=small_space)
    quiet = lambda s: None  # noqa: E731
    nt.train_supernet(cfg, c, data, tmp_path / "full", progress=False, log=quiet, save_every=3)
    real, seen = hetero.data.iterate_batches, []

    def ctrl_c(*a, **kw):
        for b in real(*a, **kw):
            seen.append(1)
            if len(seen) == stop_at:
                raise KeyboardInterrupt
            yield b

    monkeypatch.setattr(hetero.data, "iterate_batches", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        nt.train_supernet(cfg, c, data, tmp_path / "cut", progress=False, log=quiet, save_every=3)
    monkeypatch.setattr(hetero.data, "iterate_batches", real)
    assert read_state(tmp_path / "cut" / nt.STEPS)["meta"]["position"] == position
    assert (tmp_path / "cut" / nt.META).is_file() == (position["epoch"] == 1)
    with pytest.raises(HeteroError, match="differ"):
        nt.train_supernet(nt.SupernetConfig(epochs=2, batch_size=32, limit=300, val_size=60, n_random=2, space=small_space), c, data,
                          tmp_path / "cut", resume=True, progress=False, log=quiet)
    nt.train_supernet(cfg, c, data, tmp_path / "cut", resume=True, progress=False, log=quiet, save_every=3)
    assert not (tmp_path / "cut" / nt.STEPS).exists() and not (tmp_path / "cut" / nt.STATE).exists()
    a, b = nt.load_supernet(tmp_path / "full")[0].state_dict(), nt.load_supernet(tmp_path / "cut")[0].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

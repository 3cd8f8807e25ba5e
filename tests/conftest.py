"""Shared fixtures: tiny models trained for one epoch on synthetic data, a private cache dir."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# one thread per pytest-xdist worker when the workers fill the cores (make test runs one per core)
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
torch.set_num_threads(THREADS)
if WORKERS > 1:
    # and as many in the processes the tests start (the CLI, torchrun): OpenMP threads beyond the cores
    # spin against the other worker's and slow both
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


def pytest_collection_modifyitems(config, items) -> None:
    """Files with a test marked ``slow`` first, and among them the end-to-end ones at the top of tests/
    (the README, the demo slice, kill -9: the longest single tests): pytest-xdist hands out whole files in
    this order, so the long ones start at once and the workers finish together instead of one running a
    long tail."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    top = Path(__file__).parent
    items.sort(key=lambda item: (item.path not in slow, item.path.parent != top))  # stable within a file


def pytest_report_header(config) -> list[str]:
    """The kernels this run uses: .ci/run selects AVX2 ones on every CPU (see there why)."""
    from devices.bench import cpu_model

    cpu = cpu_model()
    env = ", ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                                       "FAISS_OPT_LEVEL"))
    return [f"cpu: {cpu}; torch kernels: {torch.backends.cpu.get_cpu_capability()}; {env}"]


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """A private cache and config directory (the BYO trust list): no test touches the user's."""
    names = ("HETERO_CACHE", "XDG_CONFIG_HOME")
    old = {k: os.environ.get(k) for k in names}
    for k in names:
        os.environ[k] = str(tmp_path_factory.mktemp(k.lower()))
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def synth():
    from hetero.data import synthetic_dataset

    return synthetic_dataset(600, seed=0, name="synthetic/train"), synthetic_dataset(200, seed=1, name="synthetic/test")


@pytest.fixture(scope="session")
def prep():
    from hetero.data import FASHION_MNIST_PREPROCESS

    return FASHION_MNIST_PREPROCESS


@pytest.fixture(scope="session")
def tiny_cloud(synth, prep):
    from hetero.train import TrainConfig, train_cloud

    return train_cloud(TrainConfig(model="test_resnet", dim=16, epochs=6, batch_size=32), synth[0], prep, progress=False)


@pytest.fixture(scope="session")
def tiny_edge(tiny_cloud, synth):
    from hetero.train import TrainConfig, train_edge

    # the recipe these tests were written with; the default recipe has its own test in test_train
    cfg = TrainConfig(model="test_mobilenet", dim=16, epochs=5, batch_size=32, losses={"influence": 1.0, "alignment": 1.0})
    return train_edge(cfg, tiny_cloud, synth[0], progress=False)


@pytest.fixture(scope="session")
def saved(tmp_path_factory, tiny_cloud, tiny_edge):
    """The tiny cloud and edge saved as checkpoints, plus an ONNX export of the edge."""
    from export import export_checkpoint
    from hetero.checkpoint import load_checkpoint, save_checkpoint

    root = tmp_path_factory.mktemp("saved")
    save_checkpoint(tiny_cloud, root / "cloud")
    save_checkpoint(tiny_edge, root / "edge")
    export_checkpoint(load_checkpoint(root / "edge"), root / "export", name="edge")
    return root


# A NAS space with every gene still elastic (width, depth, kernel, expand, squeeze-excite) at a few
# times less compute than the default one: supernet tests check the pipeline, not what a full space finds
SMALL_SPACE = {"stem": 8, "stages": [[8, 1, 1], [16, 2, 2], [24, 2, 2]], "kernels": [3, 5], "expands": [2, 3],
               "widths": [0.5, 1.0]}


@pytest.fixture(scope="session")
def small_space() -> dict:
    return SMALL_SPACE


@pytest.fixture
def one_thread():
    """torch on one thread for the test (deterministic sums; the subprocesses it compares with use one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

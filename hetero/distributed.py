"""Multi-process training and embedding under ``torchrun``, on torch.distributed (gloo on CPU, nccl on GPU).

Nothing here does anything in a single process: ``init`` only starts a process group when torchrun's
``WORLD_SIZE`` is above 1, and every helper degrades to the one-process answer. Rank 0 is the one
that writes (checkpoints, resume state, reports, progress bars); the others compute and wait.

The device is ``cuda:LOCAL_RANK`` (backend nccl) when the process group spans several processes and
CUDA is available, else the CPU (backend gloo); ``HETERO_TRAIN_DEVICE=cpu`` forces the CPU.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hetero.errors import HeteroError


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise HeteroError(f"${name} must be a whole number, got {os.environ[name]!r}; launch with torchrun") from None


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return _env_int("WORLD_SIZE", 1) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes outputs, logs and progress bars."""
    return rank() == 0


TRAIN_DEVICE_ENV = "HETERO_TRAIN_DEVICE"  # where training runs; the runtime devices of artifacts are another thing
OLD_TRAIN_DEVICE_ENV = "HETERO_DEVICE"  # its name before issue 22, still read


def device() -> torch.device:
    """Where this process trains: its own GPU under torchrun when CUDA is there, else the CPU;
    ``$HETERO_TRAIN_DEVICE`` (cpu or cuda) chooses."""
    name = TRAIN_DEVICE_ENV if os.environ.get(TRAIN_DEVICE_ENV) else OLD_TRAIN_DEVICE_ENV
    want = os.environ.get(name, "").strip().lower()
    if want not in ("", "cpu", "cuda"):
        raise HeteroError(f"${name} must be cpu or cuda, got {want!r}")
    if want == "cpu" or not torch.cuda.is_available() or (want == "" and not launched()):
        return torch.device("cpu")
    return torch.device("cuda", _env_int("LOCAL_RANK", 0) % torch.cuda.device_count())


def init() -> bool:
    """Join torchrun's process group (env:// rendezvous) when ``WORLD_SIZE`` > 1; idempotent.

    Returns whether this is a multi-process run."""
    if active():
        return True
    if not launched():
        return False
    if not dist.is_available():
        raise HeteroError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run a single process")
    dev = device()
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    try:
        # ranks wait at barriers while rank 0 fills a cache (cloud targets of a large set): more than the 10-min default
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None,
                                timeout=datetime.timedelta(minutes=60))
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise HeteroError(f"cannot join the torchrun process group ({backend}: {first}); launch with "
                          "`torchrun --nproc_per_node=N -m hetero ...`") from None
    atexit.register(shutdown)
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills a cache file), then the other ranks run it (and read it)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def shard(order: np.ndarray, rank_: int | None = None, world: int | None = None) -> np.ndarray:
    """This rank's share of ``order``, DistributedSampler-style: padded by wrapping around to a multiple
    of the world size, then every ``world``-th item from position ``rank``, so every rank gets the
    same count and step ``k`` of all ranks together covers the same rows as step ``k`` of one process
    with a ``world`` times larger batch."""
    world = world_size() if world is None else world
    rank_ = rank() if rank_ is None else rank_
    order = np.asarray(order, dtype=np.int64)
    if world == 1:
        return order
    if len(order) == 0:
        return order
    per = -(-len(order) // world)
    padded = np.resize(order, per * world)  # np.resize repeats from the start
    return padded[rank_::world]


def chunk(n: int, rank_: int | None = None, world: int | None = None) -> np.ndarray:
    """Contiguous rows ``[start, stop)`` of ``n`` for this rank (sizes differ by at most one)."""
    world = world_size() if world is None else world
    rank_ = rank() if rank_ is None else rank_
    bounds = np.linspace(0, n, world + 1).round().astype(np.int64)
    return np.arange(bounds[rank_], bounds[rank_ + 1], dtype=np.int64)


def gather_rows(local: np.ndarray, n: int) -> np.ndarray:
    """Concatenate every rank's contiguous chunk (:func:`chunk`) of an ``[n, ...]`` array, on every rank."""
    if not active():
        return local
    world = world_size()
    sizes = [len(chunk(n, r, world)) for r in range(world)]
    if len(local) != sizes[rank()]:
        raise RuntimeError(f"rank {rank()} holds {len(local)} rows, expected {sizes[rank()]}")
    dev = _comm_device()
    big = max(sizes)
    buf = torch.zeros((big, *local.shape[1:]), dtype=torch.from_numpy(np.ascontiguousarray(local[:0])).dtype, device=dev)
    buf[:len(local)] = torch.from_numpy(np.ascontiguousarray(local)).to(dev)
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf)
    return np.concatenate([p[:s].cpu().numpy() for p, s in zip(parts, sizes)])


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of a list of numbers over the ranks (float64)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def all_gather_object(obj):
    """Every rank's ``obj`` (small, picklable values of our own: RNG states), in rank order."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of the gradients over the ranks, in one flat all-reduce (missing gradients count as zero).

    For loops that DistributedDataParallel cannot wrap, e.g. the supernet's several subnet passes per step."""
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p in params:
        k = p.numel()
        p.grad = flat[offset:offset + k].view_as(p).clone()
        offset += k


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if not active():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def ddp(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` wrapped in DistributedDataParallel when several processes train, else itself."""
    if not active():
        return module

    dev = next((p.device for p in module.parameters()), torch.device("cpu"))
    return DistributedDataParallel(module, device_ids=[dev] if dev.type == "cuda" else None)

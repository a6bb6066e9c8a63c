"""Data-parallel training under ``torchrun``: one DistributedDataParallel run, not N copies.

``torchrun --nproc-per-node N --no-python ssl train DATA --out RUN`` starts N processes with
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; :func:`setup` reads them and
joins the process group (NCCL on CUDA GPUs, one per local rank; gloo on the CPU).  Without
those variables (a plain ``ssl train``) nothing here does anything: one process, world size 1.

How the run is shared out:

- every rank reads the same data and the same RUN/folds.json (rank 0 writes it, the others wait
  at a barrier); the ranks first compare a hash of their resolved config, so a launch whose
  ranks disagree fails on every rank with one line;
- within a fold the ranks split the training batches (a DistributedSampler over the fold's
  training set; gradients are averaged by DDP), so one epoch takes 1/N of the steps;
- validation is split as well and its probabilities are all-reduced, so every rank computes the
  same macro F1 and takes the same early-stopping and best-checkpoint decisions;
- only rank 0 writes: checkpoints, metrics, out-of-fold files, ensemble.json, the report; steps
  that train nothing (pseudo-labelling, MAE pre-training) run on rank 0 while the others wait;
- the frozen-stem feature cache is computed once, by rank 0, and read by the others after a
  barrier (:func:`compute_once`).

Multi-node: the same command on every node with ``--nnodes M --node-rank I`` and a rendezvous
(``--rdzv-backend c10d --rdzv-endpoint HOST:PORT``); RUN must then be on a file system every
node sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from semivit.errors import UserError


@dataclass
class Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: Optional[str] = None  # "gloo" | "nccl" when world_size > 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_STATE = Dist()


def current() -> Dist:
    return _STATE


def is_main() -> bool:
    return _STATE.is_main


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def setup(device_name: str = "auto") -> Dist:
    """Join the process group when started by torchrun with WORLD_SIZE > 1 (idempotent).

    Returns the :class:`Dist`; the device each rank trains on is :func:`device`."""
    global _STATE
    if _STATE.enabled or not launched_by_torchrun():
        return _STATE
    import torch.distributed as td

    try:
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise UserError("WORLD_SIZE is set but RANK is not: start distributed training with torchrun") from None
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise UserError("--device cuda under torchrun, but this machine has no CUDA GPU")
        if local >= torch.cuda.device_count():
            raise UserError(f"local rank {local} has no GPU of its own ({torch.cuda.device_count()} GPUs here): "
                            f"use --nproc-per-node {torch.cuda.device_count()} or fewer")
        torch.cuda.set_device(local)
    backend = "nccl" if use_cuda else "gloo"
    minutes = float(os.environ.get("SEMIVIT_DIST_TIMEOUT_MIN", "120"))  # rank 0 alone may pseudo-label for long
    try:
        td.init_process_group(backend=backend, timeout=timedelta(minutes=minutes))
    except Exception as e:  # noqa: BLE001 - rendezvous failures come in many types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot join the torchrun process group ({backend}): {msg}") from None
    _STATE = Dist(world, rank, local, backend)
    if rank != 0:
        os.environ["SEMIVIT_QUIET"] = "1"  # progress bars: rank 0 only
        from semivit import utils

        utils.console.quiet = True  # info and warning lines: rank 0 only (rank_log still reaches stderr)
    return _STATE


def device(default: torch.device) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK under NCCL, else ``default``."""
    if _STATE.backend == "nccl":
        return torch.device("cuda", _STATE.local_rank)
    return default


def teardown() -> None:
    global _STATE
    if _STATE.enabled:
        import torch.distributed as td

        if td.is_initialized():
            import gc

            gc.collect()  # DDP wrappers hold the group: free them now, not at interpreter exit
            td.destroy_process_group()
    _STATE = Dist()


def barrier() -> None:
    if _STATE.enabled:
        import torch.distributed as td

        if _STATE.backend == "nccl":
            td.barrier(device_ids=[_STATE.local_rank])
        else:
            td.barrier()


def rank_log(msg: str) -> None:
    """A line on this rank's stderr, on every rank (``[rank R/N] ...``), quiet mode or not."""
    if _STATE.enabled:
        sys.stderr.write(f"[rank {_STATE.rank}/{_STATE.world_size}] {msg}\n")
        sys.stderr.flush()


def config_hash(cfg, data: Optional[Path], stages: list[str]) -> str:
    doc = {"config": cfg.model_dump(mode="json"), "data": str(data) if data else None, "stages": stages}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same_config(digest: str) -> None:
    """Every rank must have resolved the same config: compare hashes (all_gather)."""
    if not _STATE.enabled:
        return
    import torch.distributed as td

    got: list = [None] * _STATE.world_size
    td.all_gather_object(got, digest)
    if len(set(got)) > 1:
        by_rank = ", ".join(f"rank {r}: {h}" for r, h in enumerate(got))
        raise UserError(f"the torchrun ranks disagree on the config ({by_rank}): launch every rank with the "
                        f"same DATA, --preset, --config, --set, --stages and --seed")


def main_first(fn: Callable[[], object]):
    """Run ``fn`` on rank 0 while the others wait at a barrier; returns its value on rank 0
    (None elsewhere).  An exception on rank 0 still releases the others (they then fail on the
    missing files or their own barrier, not hang)."""
    if not _STATE.enabled:
        return fn()
    try:
        return fn() if _STATE.is_main else None
    finally:
        barrier()


def compute_once(path: Path, fn: Callable[[], np.ndarray]) -> np.ndarray:
    """An array computed by rank 0 and shared through ``path`` (.npy): the others wait at a
    barrier and memory-map it.  Single process: ``fn()``, nothing written."""
    if not _STATE.enabled:
        return fn()
    path = Path(path)
    if _STATE.is_main:
        arr = fn()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npy")
        np.save(tmp, arr)
        os.replace(tmp, path)
    barrier()
    if not _STATE.is_main:
        arr = np.load(path, mmap_mode="r")
    return arr


def shard_indices(n: int) -> np.ndarray:
    """This rank's share of ``n`` items (rank, rank + N, ...)."""
    return np.arange(_STATE.rank, n, _STATE.world_size)


def all_reduce_rows(full: np.ndarray) -> np.ndarray:
    """Sum ``full`` (each rank filled its own rows, zeros elsewhere) over the ranks."""
    if not _STATE.enabled:
        return full
    import torch.distributed as td

    dev = torch.device("cuda", _STATE.local_rank) if _STATE.backend == "nccl" else torch.device("cpu")
    t = torch.from_numpy(np.ascontiguousarray(full, dtype=np.float64)).to(dev)
    td.all_reduce(t, op=td.ReduceOp.SUM)
    return t.cpu().numpy().astype(full.dtype)


def wrap(model: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel (the parameters that train now); itself alone."""
    if not _STATE.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [dev.index] if dev.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=False)


class DistributedWeightedSampler(torch.utils.data.Sampler):
    """Class-balanced sampling split over the ranks.  torch has a DistributedSampler and a
    WeightedRandomSampler but no both-at-once: every rank draws the same ``num_samples`` weighted
    indices (same seed and epoch) and keeps every N-th, so the ranks' shares are disjoint draws
    of one balanced epoch."""

    def __init__(self, weights, num_samples: int, seed: int):
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.total = int(num_samples) - int(num_samples) % _STATE.world_size or _STATE.world_size
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        idx = torch.multinomial(self.weights, self.total, replacement=True, generator=g).tolist()
        return iter(idx[_STATE.rank::_STATE.world_size])

    def __len__(self) -> int:
        return self.total // _STATE.world_size


def sampler(ds, shuffle: bool, seed: int, weights=None):
    """The sampler for a training loader on this rank (None: the loader's own shuffling)."""
    if not _STATE.enabled:
        return None
    if weights is not None:
        return DistributedWeightedSampler(weights, len(ds), seed)
    from torch.utils.data.distributed import DistributedSampler

    return DistributedSampler(ds, num_replicas=_STATE.world_size, rank=_STATE.rank, shuffle=shuffle, seed=seed)

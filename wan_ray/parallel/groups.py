"""Process groups of a gang: who does sequence parallelism with whom, and who pairs up for CFG."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

# NVLink multicast (NVLS) must stay off on the machines we run on; inherited by every rank process.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class GangGroups:
    """With N ranks and CFG parallelism, ranks [0, N/2) run the conditional pass and [N/2, N) the
    unconditional one, each half sequence-parallel on its own; rank i pairs with i + N/2 for CFG."""

    world_size: int
    rank: int
    ulysses: dist.ProcessGroup
    cfg: dist.ProcessGroup | None


def init_gang(rank: int, world_size: int, address: str, backend: str | None = None,
              timeout: timedelta = timedelta(minutes=10)) -> None:
    """Join the gang's default process group (NCCL on GPUs, gloo otherwise) at tcp://`address`.

    The timeout bounds one collective, not a video: a rank that waits longer than that for a dead peer
    fails instead of hanging, and the gang is rebuilt.
    """
    import torch

    os.environ.update(NCCL_ENV)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank, world_size=world_size,
                            timeout=timeout)


def make_groups(cfg_parallel: bool) -> GangGroups:
    """Sub-groups of the default group; every rank must call this, in the same order."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if cfg_parallel and world % 2:
        raise ValueError(f"CFG parallelism needs an even number of ranks, got {world}")
    span = world // 2 if cfg_parallel else world
    ulysses = cfg = None
    for start in range(0, world, span):
        group = dist.new_group(list(range(start, start + span)))
        if start <= rank < start + span:
            ulysses = group
    if cfg_parallel:
        for i in range(span):
            group = dist.new_group([i, i + span])
            if rank in (i, i + span):
                cfg = group
    return GangGroups(world, rank, ulysses, cfg)

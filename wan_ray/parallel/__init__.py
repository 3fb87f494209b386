"""Parallelism applied to a single-device `WanDiT` from outside: Ulysses sequence parallelism, CFG
parallelism and FSDP-style weight sharding. Knows torch.distributed, not Ray.

`load_parallel_dit` is what a gang rank calls: every rank of the gang loads the same expert, each only
what it needs, and the model it returns is called exactly like the single-device one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..models.checkpoint import load_dit
from .cfg import CFGParallel
from .groups import NCCL_ENV, GangGroups, init_gang, make_groups
from .shard import load_sharded_dit, shard_dit
from .ulysses import UlyssesAttention, apply_ulysses

__all__ = ["NCCL_ENV", "CFGParallel", "GangGroups", "UlyssesAttention", "apply_ulysses", "init_gang",
           "load_parallel_dit", "make_groups", "shard_dit"]


def load_parallel_dit(folder: str | Path, groups: GangGroups, *, device: torch.device | str,
                      dtype: torch.dtype | None = None, shard_weights: bool = False) -> nn.Module:
    """One rank's copy of an expert, parallelised over the gang: Ulysses over `groups.ulysses`, weights
    sharded over the whole gang when asked, and the CFG halves split over `groups.cfg` if it is set."""
    if shard_weights:
        model = load_sharded_dit(folder, device, dtype,
                                 before_shard=lambda m: apply_ulysses(m, groups.ulysses))
    else:
        model = apply_ulysses(load_dit(folder, device, dtype), groups.ulysses)
    return CFGParallel(model, groups.cfg) if groups.cfg is not None else model

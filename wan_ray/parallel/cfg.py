"""CFG parallelism: the conditional and unconditional halves of a batched-CFG forward on two rank groups."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class CFGParallel(nn.Module):
    """Wraps a DiT called with batch 2B ([cond; uncond], as `guided_velocity(batched=True)` makes it):
    this rank runs its half, the pair all-gathers, and every rank returns the full 2B output."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup):
        super().__init__()
        self.model = model
        self.group = group
        self.half = dist.get_rank(group)  # 0: conditional, 1: unconditional

    @property
    def config(self):
        return self.model.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[0] % 2:  # no unconditional pass (guidance 1): nothing to split
            return self.model(x, t, context, y=y)
        pick = lambda a: None if a is None else a.chunk(2)[self.half]
        out = self.model(pick(x), pick(t), pick(context), y=pick(y)).contiguous()
        halves = [torch.empty_like(out) for _ in range(2)]
        dist.all_gather(halves, out, group=self.group)
        return torch.cat(halves)

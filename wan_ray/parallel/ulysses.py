"""Ulysses sequence parallelism for `WanDiT`, applied from outside the model.

Each of the P ranks of a sequence-parallel group holds 1/P of the video tokens through the blocks. Inside
self-attention an all-to-all trades that for 1/P of the heads over the whole sequence, attention runs, and a
second all-to-all trades back. Cross-attention, the FFN and the modulation are per token and need no
communication. The token sequence is padded to a multiple of P; padded keys are dropped before attention
and padded tokens are dropped when the head's output is gathered.

`apply_ulysses(model, group)` installs it with forward hooks and by wrapping each self-attention's
`Attention` module; the model's own forward is not touched:

| where | what |
|---|---|
| `time_embedding` output (per-token timesteps only) | split the tokens |
| `rope` output (cos, sin tables) | pad with the identity rotation, split |
| `blocks.0` input `x` | pad with zero tokens, split |
| `blocks.*.self_attn.attn` | replaced by `UlyssesAttention` |
| `head` output | gather the tokens, drop the padding |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..models.attention import Attention
from ..models.dit import WanDiT


@dataclass
class _Shard:
    """Per-forward facts shared by the hooks: the true token count and the padded one."""

    group: dist.ProcessGroup
    size: int
    rank: int
    length: int = 0  # real tokens
    padded: int = 0  # a multiple of size

    def split(self, x: torch.Tensor, dim: int, fill: float = 0.0) -> torch.Tensor:
        """Pad `dim` from `length` to `padded` with `fill`, keep this rank's contiguous chunk."""
        pad = self.padded - x.shape[dim]
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_full(shape, fill)], dim=dim)
        return x.chunk(self.size, dim=dim)[self.rank].contiguous()

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, self.length)


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split `x` into P chunks along `scatter_dim`, send chunk i to rank i, concatenate what arrives along
    `gather_dim` in rank order."""
    size = dist.get_world_size(group)
    chunks = [c.contiguous() for c in x.chunk(size, dim=scatter_dim)]
    received = [torch.empty_like(c) for c in chunks]
    dist.all_to_all(received, chunks, group=group)
    return torch.cat(received, dim=gather_dim)


class UlyssesAttention(nn.Module):
    """Sequence-parallel attention around an inner `Attention`: [B, L/P, N, d] in and out."""

    def __init__(self, inner: Attention, shard: _Shard):
        super().__init__()
        self.inner = inner
        self.shard = shard

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        group, length = self.shard.group, self.shard.length
        q, k, v = (all_to_all(t, group, scatter_dim=2, gather_dim=1) for t in (q, k, v))  # [B, L_pad, N/P, d]
        out = self.inner(q, k[:, :length], v[:, :length])  # padded keys take no part
        return all_to_all(out, group, scatter_dim=1, gather_dim=2)  # [B, L_pad/P, N, d]


def check_heads(heads: int, size: int) -> None:
    """Ulysses scatters whole heads across ranks: the group size must divide the head count."""
    if heads % size:
        raise ValueError(f"sequence-parallel size {size} does not divide the model's {heads} heads; "
                         f"sizes that do: {[n for n in range(1, heads + 1) if heads % n == 0]}")


def apply_ulysses(model: WanDiT, group: dist.ProcessGroup) -> WanDiT:
    """Make `model` run P-way sequence parallel over `group` (every rank calls it with the same inputs)."""
    size = dist.get_world_size(group)
    check_heads(model.config.num_heads, size)
    if size == 1:
        return model
    shard = _Shard(group, size, dist.get_rank(group))

    def measure(length: int) -> None:
        shard.length, shard.padded = length, -(-length // size) * size

    def split_time(module, args, e):  # [B, 1 or L, D]; runs first: per-token embeddings follow their tokens
        if e.shape[1] == 1:
            return e
        measure(e.shape[1])
        return shard.split(e, dim=1)

    def split_rope(module, args, rope):
        cos, sin = rope
        measure(cos.shape[0])
        return shard.split(cos, 0, fill=1.0), shard.split(sin, 0, fill=0.0)  # identity on padding

    def split_tokens(module, args, kwargs):
        x, *rest = args
        return (shard.split(x, dim=1), *rest), kwargs

    def gather_tokens(module, args, out):
        return shard.gather(out, dim=1)

    model.time_embedding.register_forward_hook(split_time)
    model.rope.register_forward_hook(split_rope)
    model.blocks[0].register_forward_pre_hook(split_tokens, with_kwargs=True)
    model.head.register_forward_hook(gather_tokens)
    for block in model.blocks:
        block.self_attn.attn = UlyssesAttention(block.self_attn.attn, shard)
    return model

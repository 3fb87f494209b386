"""Step caching (opt-in, lossy): skip a DiT's blocks on steps where their input barely changed.

In the spirit of TeaCache: the input of the first block after its timestep modulation,
`norm1(x) · (1 + scale) + shift`, moves little between neighbouring sampling steps over much of the
trajectory, and so does what the block stack adds to the residual stream. With `apply_step_cache(model, t)`
each forward compares that modulated input with the one of the last *computed* step; while the accumulated
relative L1 change stays under `t`, the blocks are skipped and their last residual (output minus input of
the stack) is added instead. Embeddings and the head always run.

Applied from outside: the model's parameter-free `stack` module is replaced by a `CachedStack`; the
weights and the state dict do not change. Call `reset_step_cache(model)` when a new video starts.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.dit import BlockStack


class CachedStack(BlockStack):
    """The block stack, run in full or replayed from its last residual."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold
        self.computed = 0
        self.skipped = 0
        self.reset()

    def reset(self) -> None:
        self._last_input: torch.Tensor | None = None  # modulated first-block input of the last computed step
        self._residual: torch.Tensor | None = None
        self._change = 0.0  # relative change accumulated since that step

    def forward(self, blocks: nn.ModuleList, x: torch.Tensor, e0: torch.Tensor, rope, context: torch.Tensor
                ) -> torch.Tensor:
        first = blocks[0]
        shift, scale = (first.modulation.float() + e0).unbind(2)[:2]
        probe = first.norm1(x) * (1 + scale) + shift  # what block 0 sees
        if self._residual is not None and self._residual.shape == x.shape:
            delta = ((probe - self._last_input).abs().mean() / self._last_input.abs().mean()).item()
            if self._change + delta < self.threshold:
                self._change += delta
                self.skipped += 1
                return x + self._residual
        out = super().forward(blocks, x, e0, rope, context)
        self._last_input, self._residual, self._change = probe, out - x, 0.0
        self.computed += 1
        return out


def apply_step_cache(model: nn.Module, threshold: float) -> nn.Module:
    """Give a `WanDiT` step caching with this threshold (0 never skips); returns the model."""
    if threshold < 0:
        raise ValueError(f"step cache threshold must be >= 0, got {threshold}")
    model.stack = CachedStack(threshold)
    return model


def reset_step_cache(model: nn.Module) -> None:
    """Forget the cached residual: a new video must never replay the previous one's."""
    for module in model.modules():
        if isinstance(module, CachedStack):
            module.reset()

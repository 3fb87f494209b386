"""Denoiser: one expert's segment of the sampling loop, from the state the previous stage left."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..models.attention import set_attention_backend
from ..models.checkpoint import Checkpoint
from ..models.dit import WanDiT, compile_blocks
from ..models.fp8 import quantize_fp8
from ..sampling.cache import apply_step_cache, reset_step_cache
from ..sampling.loop import DenoiseState, run_segment, seeded_noise, start_state
from ..sampling.plan import plan_request
from .base import Stage, default_device, default_dtype
from .records import Item

Progress = Callable[[str, int, int], None]  # (item id, steps done, total steps)


def use_attention(model: torch.nn.Module, attention: str, device: str) -> None:
    """Set the expert's attention backend as the stage runs it. With ``"quantized"`` only the self-attention
    gets our kernel: over the 512 text keys of the cross-attention, cuDNN's bf16 kernel is faster than
    quantising them first (docs/benchmarks.md), so on CUDA that one runs in cuDNN."""
    cross = "cudnn" if attention == "quantized" and device.startswith("cuda") else None
    set_attention_backend(model, attention, cross_attention=cross)


class Denoiser(Stage):
    """Runs the steps of one expert ("high", "low" or "single"). The first denoiser of a video starts it.

    `model` may be the loaded expert or a parallelised wrapper of it (wan_ray.parallel): the stage only
    calls it. On a gang every rank runs this same stage on the same item.
    """

    def __init__(self, checkpoint: Checkpoint, expert: str, device: str | None = None,
                 dtype: torch.dtype | None = None, *, model: torch.nn.Module | None = None,
                 batched_cfg: bool = True, progress: Progress | None = None, gpus: float | None = None,
                 compile: bool | None = None, fp8: bool = False, step_cache: float | None = None,
                 attention: str | None = None):
        self.task = checkpoint.task
        self.expert = expert
        self.name = f"denoise_{expert}"
        device = device or default_device()
        if model is None:
            dtype = dtype or default_dtype(device)
            model = checkpoint.load_expert(expert, device, dtype)
            if fp8:  # opt-in, lossy: docs/benchmarks.md gives its error
                quantize_fp8(model)
            if attention:  # e.g. "quantized": opt-in, lossy (docs/benchmarks.md)
                use_attention(model, attention, device)
            if step_cache:  # opt-in, lossy: skips the blocks on steps whose input barely changed
                apply_step_cache(model, step_cache)
            if compile if compile is not None else device.startswith("cuda"):
                compile_blocks(model)  # compiled on the first call, then reused by every video
        self.model: WanDiT = model
        self.device = device
        self.batched_cfg = batched_cfg
        self.progress = progress
        self.gpus = gpus if gpus is not None else (1.0 if device.startswith("cuda") else 0.0)

    def start(self, item: Item) -> DenoiseState:
        """Step 0 of a video: its plan, seeded noise, and the image conditioning if any."""
        request, image = item.request, item.image
        plan = plan_request(request, self.task, *((image.width, image.height) if image else (None, None)))
        noise = seeded_noise((1, *plan.latent_shape), request.seed)
        return start_state(plan, noise, image.condition if image else None)

    def process(self, item: Item) -> Item:
        reset_step_cache(self.model)
        state = item.state or self.start(item)
        segment = state.plan.segment(self.expert)
        if segment is None:  # e.g. every step was above the boundary: nothing for the low-noise expert
            return item.replace(state=state)
        on_step = None if self.progress is None else (lambda done, total: self.progress(item.id, done, total))
        embeds = item.embeds
        state = run_segment(state, segment, self.model, embeds.context[None], embeds.context_null[None],
                            batched_cfg=self.batched_cfg, on_step=on_step)
        return item.replace(state=state.to("cpu"))

"""Decoder: the final latent to frames (VAE), then to MP4 and thumbnail bytes. Frames never leave here."""

from __future__ import annotations

import numpy as np
import torch

from ..io.media import encode_mp4, thumbnail
from ..models.checkpoint import Checkpoint
from ..models.vae import compile_norms, fold_time_into_channels
from ..sampling.loop import DenoiseState
from .base import Stage, default_device, default_dtype
from .records import Item, Video


class Decoder(Stage):
    name = "decode"

    def __init__(self, checkpoint: Checkpoint, device: str | None = None, dtype: torch.dtype | None = None,
                 compile: bool | None = None):
        device = device or default_device()
        # bf16 on a GPU (the convolutions sum in float32 and the frames are made in float32: WanVAE), float32
        # on a CPU. docs/benchmarks.md gives what bf16 costs against a float32 decode.
        self.vae = checkpoint.load_vae(device, dtype or default_dtype(device))
        fold_time_into_channels(self.vae)  # same values up to rounding; faster on every device measured
        if compile if compile is not None else device.startswith("cuda"):
            compile_norms(self.vae)  # fused norm + SiLU
        # 2.1 at 720p, uint8 out (H200, 2026-12-05, diffusers in the same run): 0.92x diffusers' time eager,
        # 0.89x fused, 0.75x fused and folded (0.57x its peak memory). The tiny model on 2 CPU cores: twice as
        # fast folded. docs/benchmarks.md
        self.device = device
        self.gpus = 1.0 if device.startswith("cuda") else 0.0

    @torch.no_grad()
    def frames(self, state: DenoiseState) -> np.ndarray:
        if not state.done:
            raise RuntimeError(f"the latent is at step {state.step} of {state.plan.num_steps}: not finished")
        return self.vae.decode_uint8(state.latent.to(self.device))[0].cpu().numpy()  # [F, H, W, 3]

    def process(self, item: Item) -> Item:
        frames = self.frames(item.state)
        fps = item.request.fps
        video = Video(mp4=encode_mp4(frames, fps), thumbnail=thumbnail(frames), num_frames=frames.shape[0],
                      fps=fps, width=frames.shape[2], height=frames.shape[1], plan=item.state.plan)
        return item.replace(video=video, state=None, embeds=None, image=None)

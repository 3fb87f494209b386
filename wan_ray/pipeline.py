"""`Generator`: the whole pipeline in one process on one device, built from the same stages the
distributed jobs run. It is the reference that the batch job and the endpoint must match.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .io.media import encode_mp4
from .models.checkpoint import Checkpoint, open_checkpoint
from .sampling.plan import Plan
from .sampling.request import Request, make_request, safe_id
from .stages import Decoder, Denoiser, ImageEncoder, Item, Stage, TextEncoder
from .stages.base import default_device, default_dtype


@dataclass(frozen=True)
class GeneratedVideo:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    fps: int
    request: Request
    plan: Plan
    timings: dict[str, float]  # seconds per stage

    def mp4(self) -> bytes:
        return encode_mp4(self.frames, self.fps)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.mp4())
        return path


class Generator:
    """Load a model once, then make videos one at a time.

    `model` is a bundled name (`"tiny"`) or a release folder (official or diffusers layout). Memory options
    for a single smaller GPU, as the official code offers them: `offload_model` keeps only the active expert
    on the GPU (the others wait on the CPU), `t5_cpu` runs the text encoder on the CPU; weights are always
    converted to the compute `dtype` as they load (default bf16 on a GPU, float32 on a CPU), except the image
    encoder's VAE, which encodes the one conditioning image in float32. `fp8` swaps
    the experts' big projections for FP8 ones, and `step_cache` skips their blocks on steps whose input barely
    changed (both lossy and opt-in: `wan_ray.models.fp8`, `wan_ray.sampling.cache`); `attention` picks the
    experts' attention backend (`wan_ray.models.attention`; "quantized" is lossy and opt-in).
    """

    def __init__(self, model: str | Path | Checkpoint = "tiny", *, device: str | None = None,
                 dtype: torch.dtype | None = None, offload_model: bool = False, t5_cpu: bool = False,
                 batched_cfg: bool = True, fp8: bool = False, step_cache: float | None = None,
                 attention: str | None = None):
        self.checkpoint = model if isinstance(model, Checkpoint) else open_checkpoint(model)
        self.task = self.checkpoint.task
        self.device = device or default_device()
        on_gpu = self.device.startswith("cuda")
        dtype = dtype or default_dtype(self.device)
        self.offload_model = offload_model and on_gpu
        self.text = TextEncoder(self.checkpoint, "cpu" if t5_cpu else self.device, dtype)
        self.image = ImageEncoder(self.checkpoint, self.device) if self.task.dit.model_type != "t2v" else None
        expert_device = "cpu" if self.offload_model else self.device
        self.denoisers = [Denoiser(self.checkpoint, name, expert_device, dtype, batched_cfg=batched_cfg,
                                   fp8=fp8, step_cache=step_cache, attention=attention)
                          for name in self.checkpoint.experts]
        self.decoder = Decoder(self.checkpoint, self.device, dtype)

    def request(self, prompt: str, **fields: Any) -> Request:
        """Validate one request against this model (raises `RequestError` naming what is accepted)."""
        return make_request(self.task, prompt=prompt, **fields)

    def generate(self, prompt: str, *, negative_prompt: str | None = None, size: Any = None,
                 frames: int | None = None, steps: int | None = None, shift: float | None = None,
                 guide_scale: float | tuple[float, float] | None = None, solver: str | None = None,
                 seed: int | None = None, image: str | None = None, fps: int | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> GeneratedVideo:
        request = self.request(prompt, negative_prompt=negative_prompt, size=size, frames=frames, steps=steps,
                               shift=shift, guide_scale=guide_scale, solver=solver, seed=seed, image=image,
                               fps=fps)
        return self.run(request, on_step=on_step)

    @torch.no_grad()
    def run(self, request: Request, on_step: Callable[[int, int], None] | None = None) -> GeneratedVideo:
        item = Item(id=request.id, key=safe_id(request.id), request=request)
        timings: dict[str, float] = {}
        stages: list[Stage] = [self.text, *([self.image] if self.image else []), *self.denoisers]
        for stage in stages:
            if isinstance(stage, Denoiser):
                stage.progress = None if on_step is None else (lambda _id, done, total: on_step(done, total))
            with self._resident(stage), _timer(timings, stage.name):
                item = stage.process_batch([item])[0]
        with _timer(timings, "decode"):
            frames = self.decoder.frames(item.state)
        return GeneratedVideo(frames, request.fps, request, item.state.plan, timings)

    @contextlib.contextmanager
    def _resident(self, stage: Stage) -> Iterator[None]:
        """With `offload_model`, an expert visits the GPU only for its own segment."""
        if not (self.offload_model and isinstance(stage, Denoiser)):
            yield
            return
        stage.model.to(self.device)
        try:
            yield
        finally:
            stage.model.to("cpu")
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _timer(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start

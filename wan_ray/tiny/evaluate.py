"""How well the tiny model follows its prompts: generate videos for captions, read them back, score.

`generate` is the one place that turns prompts into frames here (the text encoder, the two-expert sampling
loop, the VAE decode), batched for speed; everything else is prompts in and accuracies out. The default
prompt set (`eval_prompts`) holds every combination held out of training plus seen ones, each with its own
seed. `python -m wan_ray.tiny.evaluate` prints the accuracy per attribute, for all prompts and for the
held-out ones, and the time per video.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models.checkpoint import open_checkpoint
from ..models.config import TaskSpec
from ..models.text_encoder import UMT5TextEncoder
from ..models.vae import WanVAE, to_uint8
from ..sampling.loop import pad_contexts, sample, seeded_noise
from ..sampling.plan import latent_shape, make_plan
from ..sampling.request import make_request
from . import TASK, data
from .detect import Detection, accuracy, detect


@dataclass
class TinyPipeline:
    """The loaded components of a release, on one device, in float32."""

    task: TaskSpec
    experts: dict[str, nn.Module]
    vae: WanVAE
    text: UMT5TextEncoder

    @classmethod
    def load(cls, model: str | Path = TASK, device: str = "cpu") -> TinyPipeline:
        ckpt = open_checkpoint(model)
        experts = {name: ckpt.load_expert(name, device, torch.float32) for name in ckpt.experts}
        return cls(ckpt.task, experts, ckpt.load_vae(device), ckpt.load_text_encoder(device))


@torch.no_grad()
def generate(pipe: TinyPipeline, prompts: Sequence[str], seeds: Sequence[int], *, steps: int | None = None,
             shift: float | None = None, guide_scale: float | tuple[float, float] | None = None,
             solver: str | None = None, experts: Mapping[str, nn.Module] | None = None) -> np.ndarray:
    """uint8 videos [B, F, H, W, 3] at the task's default size and length, one per (prompt, seed).

    Settings default to the task's. `guide_scale` goes straight into the plan (any value, so guidance can be
    switched off or inverted on purpose); `experts` replaces the loaded ones (e.g. swapped).
    """
    task = pipe.task
    requests = [make_request(task, prompt=p, seed=s, steps=steps, shift=shift, solver=solver)
                for p, s in zip(prompts, seeds, strict=True)]
    r = requests[0]
    shape = latent_shape(task, r.width, r.height, r.frames)
    plan = make_plan(r.steps, r.shift, r.solver, task.boundary, r.guide_scale if guide_scale is None
                     else guide_scale, task.num_train_timesteps, latent_shape=shape)
    noise = torch.stack([seeded_noise(shape, q.seed) for q in requests])  # [B, C, T, h, w]
    device = next(pipe.vae.parameters()).device
    context = pad_contexts(pipe.text.encode(list(prompts))).float()
    null = pad_contexts(pipe.text.encode([q.negative_prompt for q in requests])).float()
    latent = sample(experts or pipe.experts, noise.to(device), context, null, plan)
    return np.stack([to_uint8(v) for v in pipe.vae.decode(latent)])


def eval_prompts(seen: int = 12, seed: int = 0) -> list[tuple[str, int]]:
    """Every held-out combination plus `seen` training combinations, as (caption, seed) pairs."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(data.TRAIN_COMBOS), size=seen, replace=False)
    combos = [*data.HELD_OUT, *(data.TRAIN_COMBOS[i] for i in sorted(picks))]
    return [(data.caption(*c), 1000 + seed * 1000 + i) for i, c in enumerate(combos)]


@dataclass
class EvalReport:
    prompts: list[str]
    seeds: list[int]
    detections: list[Detection]
    seconds_per_video: float
    held_out: list[bool] = field(init=False)

    def __post_init__(self) -> None:
        self.held_out = [data.parse_caption(p) in data.HELD_OUT for p in self.prompts]

    def accuracy(self, held_out_only: bool = False) -> dict[str, float]:
        rows = [i for i, h in enumerate(self.held_out) if h or not held_out_only]
        expected = [data.parse_caption(self.prompts[i]) for i in rows]
        return accuracy([self.detections[i] for i in rows], expected)

    def table(self) -> str:
        every, held = self.accuracy(), self.accuracy(held_out_only=True) if any(self.held_out) else None
        lines = [f"{'attribute':<12}{f'all ({len(self.prompts)})':>12}"
                 + (f"{f'held-out ({sum(self.held_out)})':>16}" if held else "")]
        for name in data.ATTRIBUTES:
            lines.append(f"{name:<12}{every[name]:>11.1%} " + (f"{held[name]:>15.1%}" if held else ""))
        lines.append(f"{self.seconds_per_video:.2f} s per video")
        return "\n".join(lines)


def evaluate(model: str | Path | TinyPipeline = TASK, prompts: Sequence[tuple[str, int]] | None = None, *,
             batch_size: int = 8, device: str = "cpu", **settings) -> EvalReport:
    """Generate a video per (caption, seed) (default: `eval_prompts()`), detect, and report accuracies.

    `settings` go to `generate` (steps, shift, guide_scale, solver, experts).
    """
    pipe = model if isinstance(model, TinyPipeline) else TinyPipeline.load(model, device)
    prompts = list(prompts or eval_prompts())
    for caption, _ in prompts:
        data.parse_caption(caption)  # only vocabulary captions can be scored
    start, detections = time.perf_counter(), []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        videos = generate(pipe, [p for p, _ in chunk], [s for _, s in chunk], **settings)
        detections += [detect(v) for v in videos]
    seconds = (time.perf_counter() - start) / len(prompts)
    return EvalReport([p for p, _ in prompts], [s for _, s in prompts], detections, seconds)


def time_one_video(pipe: TinyPipeline, threads: int = 1, repeats: int = 3) -> float:
    """Best wall time (s) of one default video, prompt to frames, with `threads` CPU threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        prompt = data.caption(*data.HELD_OUT[0])
        generate(pipe, [prompt], [0])  # warm-up: first-call allocations, RoPE tables
        best = float("inf")
        for seed in range(repeats):
            start = time.perf_counter()
            generate(pipe, [prompt], [seed])
            best = min(best, time.perf_counter() - start)
        return best
    finally:
        torch.set_num_threads(previous)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=TASK, help="bundled name or release folder (default: the bundled tiny)")
    p.add_argument("--seen", type=int, default=12, help="training combinations added to the held-out ones")
    p.add_argument("--seed", type=int, default=0, help="picks the seen combinations and the noise seeds")
    p.add_argument("--steps", type=int)
    p.add_argument("--shift", type=float)
    p.add_argument("--guide-scale", type=float, nargs="+", help="one value, or LOW HIGH for the two experts")
    p.add_argument("--solver", choices=("unipc", "dpm++", "euler"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--time", action="store_true", help="also time one video on one CPU thread")


def run(args: argparse.Namespace) -> EvalReport:
    """Evaluate as the parsed arguments say; prints the accuracy table (and the one-thread time)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    guide = None if not args.guide_scale else (
        args.guide_scale[0] if len(args.guide_scale) == 1 else tuple(args.guide_scale[:2]))
    pipe = TinyPipeline.load(args.model, args.device)
    report = evaluate(pipe, eval_prompts(args.seen, args.seed), batch_size=args.batch, steps=args.steps,
                      shift=args.shift, guide_scale=guide, solver=args.solver)
    print(report.table())
    if args.time:
        print(f"one video ({pipe.task.frame_num} frames, {pipe.task.sizes[0][0]}x{pipe.task.sizes[0][1]}, "
              f"{args.steps or pipe.task.sample_steps} steps) on one CPU thread: "
              f"{time_one_video(pipe):.2f} s")
    return report


def main(argv: Sequence[str] | None = None) -> EvalReport:
    p = argparse.ArgumentParser(prog="python -m wan_ray.tiny.evaluate", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()

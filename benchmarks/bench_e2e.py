"""End to end on one GPU: videos from prompt embeddings to frames, our loop against diffusers' WanPipeline.

Both sides get the same work and the same weights: Wan2.2 T2V-A14B's two experts (random bf16 weights at
the true size, shared tensor for tensor between our `WanDiT` and diffusers' `WanTransformer3DModel`), a
Wan2.1 VAE (random, the same weights on both sides), precomputed prompt embeddings (the real umT5
tokenizer cannot be downloaded here, so text encoding is left out of both), the same initial noise, UniPC
with shift, CFG with the (low-noise, high-noise) guidance pair and the expert switch at the same boundary.

- ours: `wan_ray.sampling.sample` (blocks compiled as the denoise stage does on CUDA) and
  `WanVAE.decode_uint8` (bf16, time folded into channels and norms compiled on CUDA, as the decode stage
  runs it), in one or more variants written `linear/attention/cfg`: linear `bf16` or `fp8` (FP8 linear
  layers, lossy), attention a backend as the denoise stage's `attention` option sets it (e.g. `cudnn`, or
  `quantized`: lossy), cfg `batched` (one batch-2 forward per step, the default of the stage) or `two`
  (two batch-1 forwards, to measure what batching gains);
- diffusers: `WanPipeline(transformer, transformer_2, boundary_ratio)` with `prompt_embeds` and
  `negative_prompt_embeds`, `output_type="np"`.

Each side makes one warm-up video (compilation, autotuning), then `--videos` timed ones; the table gives
seconds per video, videos per hour and the ratio, and the relative L2 between the two sides' frames as a
check that they did the same work (bf16 and two solver implementations: a few percent is expected). For our
side it also splits the time into sampling (per step) and decode, and extrapolates the official setting of
40 steps from them: GPU-seconds per video = 40 × s/step + decode. FP8 variants run after the bf16 ones
(quantising is one-way), once diffusers' copies of the bf16 weights are dropped, so that two experts and
their FP8 copies never share an 80 GB card.

    python benchmarks/bench_e2e.py --size 832x480 --frames 81 --steps 10 --videos 2 --out e2e.json
    python benchmarks/bench_e2e.py --ours bf16/cudnn/batched,bf16/cudnn/two,fp8/quantized/batched
    python benchmarks/bench_e2e.py --tiny          # a CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_dit
import bench_vae

from wan_ray.models.config import PRESETS
from wan_ray.models.dit import compile_blocks
from wan_ray.models.fp8 import quantize_fp8
from wan_ray.models.vae import build_vae, compile_norms, fold_time_into_channels
from wan_ray.sampling.loop import sample, seeded_noise
from wan_ray.sampling.plan import make_plan
from wan_ray.stages.denoise import use_attention

TASK = PRESETS["t2v-A14B"]
CFG_MODES = ("batched", "two")


@dataclass(frozen=True)
class Variant:
    """One way of running our side: `linear/attention/cfg`."""

    linear: str
    attention: str
    cfg: str

    @classmethod
    def parse(cls, spec: str) -> Variant:
        parts = spec.split("/")
        if len(parts) != 3 or parts[0] not in ("bf16", "fp8") or parts[2] not in CFG_MODES:
            raise ValueError(f"variant {spec!r}: expected linear/attention/cfg with linear bf16 or fp8 and "
                             f"cfg one of {CFG_MODES}, e.g. bf16/cudnn/batched")
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.linear}/{self.attention}/{self.cfg}"


def build_experts(device: str, tiny: bool) -> dict:
    experts = {}
    for i, name in enumerate(("high", "low")):
        torch.manual_seed(i)  # two different random experts
        experts[name] = bench_dit.build_ours("t2v-A14B", device, tiny)
    return experts


def build_vae_pair(device: str, tiny: bool, dtype: torch.dtype):
    """A random Wan2.1 VAE (the official latent statistics) and diffusers' copy of it, both in `dtype`."""
    config = dict((bench_vae.TINY if tiny else bench_vae.REAL)["2.1"])
    torch.manual_seed(2)
    ours = build_vae("2.1", **config).eval()
    theirs = bench_vae.diffusers_twin(ours, "2.1", config).eval()
    return ours.to(device, dtype), theirs.to(device, dtype)


def diffusers_pipeline(experts: dict, vae, shift: float):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=shift, num_train_timesteps=1000)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler,
                       transformer=bench_dit.diffusers_twin(experts["high"]),
                       transformer_2=bench_dit.diffusers_twin(experts["low"]), boundary_ratio=TASK.boundary)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(float) - b) / np.linalg.norm(b.astype(float)))


def timed(fn, device: str) -> tuple[float, object]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="832x480", help="WxH of the videos")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=10, help="sampling steps (the real default is 40)")
    p.add_argument("--videos", type=int, default=2, help="timed videos per side, after one warm-up video")
    p.add_argument("--ours", default="bf16/sdpa/batched", help="our variants, comma-separated "
                   "linear/attention/cfg (linear bf16|fp8, cfg batched|two; fp8 ones run last)")
    p.add_argument("--tiny", action="store_true", help="tiny models at 64x64, 5 frames, on the CPU")
    p.add_argument("--out")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the decode stage's dtype
    width, height = (64, 64) if args.tiny else map(int, args.size.lower().split("x"))
    frames = 5 if args.tiny else args.frames
    low_guide, high_guide = TASK.guide_scale
    shift = TASK.sample_shift

    experts = build_experts(device, args.tiny)
    vae, their_vae = build_vae_pair(device, args.tiny, dtype)
    if device == "cuda":  # as the decode stage runs it
        compile_norms(fold_time_into_channels(vae))
    pipe = diffusers_pipeline(experts, their_vae, shift)
    variants = sorted(map(Variant.parse, args.ours.split(",")), key=lambda v: v.linear == "fp8")
    text_dim = experts["high"].config.text_dim
    latent = (experts["high"].config.out_dim, (frames - 1) // 4 + 1, height // 8, width // 8)
    plan = make_plan(args.steps, shift, "unipc", TASK.boundary, (low_guide, high_guide), latent_shape=latent)

    def inputs(seed: int):
        g = torch.Generator().manual_seed(seed)
        context = torch.randn(1, 64, text_dim, generator=g).to(device, torch.bfloat16)
        null = torch.randn(1, 96, text_dim, generator=g).to(device, torch.bfloat16)
        return seeded_noise(latent, seed).unsqueeze(0).to(device), context, null

    parts: dict[str, list[float]] = {}  # our side's time per phase, per timed video

    def ours(variant: Variant):
        @torch.no_grad()
        def make_video(seed: int) -> np.ndarray:
            noise, context, null = inputs(seed)
            t_sample, latent = timed(lambda: sample(experts, noise, context, null, plan,
                                                    batched_cfg=variant.cfg == "batched"), device)
            t_decode, frames = timed(lambda: vae.decode_uint8(latent)[0].cpu().numpy(), device)  # [F,H,W,3]
            parts.setdefault("sample", []).append(t_sample)
            parts.setdefault("decode", []).append(t_decode)
            return frames
        return make_video

    @torch.no_grad()
    def theirs(seed: int) -> np.ndarray:
        noise, context, null = inputs(seed)
        out = pipe(prompt_embeds=context, negative_prompt_embeds=null, latents=noise.float(), height=height,
                   width=width, num_frames=frames, num_inference_steps=args.steps, guidance_scale=high_guide,
                   guidance_scale_2=low_guide, output_type="np").frames[0]  # [F, H, W, 3] in [0, 1]
        return (np.asarray(out) * 255).round().astype(np.uint8)

    def prepare(variant: Variant) -> None:
        """Set our experts up as the denoise stage would run `variant`."""
        nonlocal pipe
        torch._dynamo.reset()  # each variant compiles afresh in its warm-up, as a new worker would
        if variant.linear == "fp8" and pipe is not None:  # the first FP8 variant quantises, once
            pipe = None  # diffusers' twins hold the bf16 weights: let them go before the FP8 copies exist
            gc.collect()
            for model in experts.values():
                quantize_fp8(model)
        for model in experts.values():
            use_attention(model, variant.attention, device)
            if device == "cuda":
                compile_blocks(model)

    sides = [("diffusers", theirs, None)] + [(f"ours {v}", ours(v), v) for v in variants]
    rows, videos = [], {}
    for name, fn, variant in sides:
        if variant:
            prepare(variant)
        fn(0)  # warm-up
        parts.clear()
        times = []
        for seed in range(1, args.videos + 1):
            seconds, videos[name, seed] = timed(lambda seed=seed, fn=fn: fn(seed), device)
            times.append(seconds)
        row = dict(impl=name, seconds_per_video=statistics.median(times), times=times)
        if parts:  # our side: per step and decode, and the official 40-step video extrapolated from them
            per_step = statistics.median(parts["sample"]) / args.steps
            decode = statistics.median(parts["decode"])
            row.update(seconds_per_step=per_step, decode_seconds=decode,
                       seconds_at_40_steps=40 * per_step + decode)
        rows.append(row)
    base = rows[0]["seconds_per_video"]
    timed_seeds = range(1, args.videos + 1)
    mean_rel_l2 = lambda a, b: float(np.mean([rel_l2(videos[a, s], videos[b, s]) for s in timed_seeds]))
    first_ours = rows[1]["impl"]
    info = bench_dit.run_info(device)
    print(f"{width}x{height}x{frames}, {args.steps} steps, CFG, two experts")
    print(f"{'impl':<29}{'s/video':>9}{'videos/h':>10}{'ratio':>7}{'s/step':>8}{'decode':>8}{'40 steps':>10}"
          f"{'rel L2':>9}{'vs ours':>9}")
    for row in rows:
        row["ratio"] = row["seconds_per_video"] / base
        row["frames_rel_l2_vs_diffusers"] = mean_rel_l2(row["impl"], "diffusers")
        extra = f"{'':>35}"
        if "seconds_per_step" in row:
            row["frames_rel_l2_vs_first_ours"] = mean_rel_l2(row["impl"], first_ours)
            extra = (f"{row['seconds_per_step']:>8.2f}{row['decode_seconds']:>8.2f}"
                     f"{row['seconds_at_40_steps']:>10.1f}{row['frames_rel_l2_vs_diffusers']:>9.2e}"
                     f"{row['frames_rel_l2_vs_first_ours']:>9.2e}")
        print(f"{row['impl']:<29}{row['seconds_per_video']:>9.2f}{3600 / row['seconds_per_video']:>10.1f}"
              f"{row['ratio']:>7.2f}{extra}")
    print(f"rel L2: the frames against diffusers'; vs ours: against {first_ours}'s")
    setting = {"size": [width, height], "frames": frames, "steps": args.steps}
    bench_dit.save_rows(args.out, {**info, **setting}, rows)


if __name__ == "__main__":
    main()

"""Peak GPU memory of one TI2V-5B video (1280×704, 121 frames) with the allocator capped, as on a 24 GB card.

Random bf16 weights at the true sizes: the TI2V-5B DiT (5.0 B parameters, 10 GB) and the Wan2.2 VAE. The
allocator is capped with `torch.cuda.set_per_process_memory_fraction`, so going over the cap raises an
out-of-memory error instead of borrowing the rest of the card. The work is what `Generator` does for a
text-to-video request on this model: sampling with batched CFG (one batch-2 forward per step; the step
count does not change the peak, so `--steps` is small), then the bf16 VAE decode to uint8 frames as the
decode stage runs it (time folded into channels, norms compiled on CUDA). The umT5 text encoder is left
out: with `t5_cpu` it never touches the GPU (its embeddings stand in here).
The decode is measured twice: with the DiT still on the GPU (no memory options) and after moving it to the
CPU, which is what `offload_model` does between the denoise segment and the decode.

    python benchmarks/bench_memory.py --cap-gib 24 --out memory.json
    python benchmarks/bench_memory.py --tiny          # a CPU smoke run of the same code (no cap)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_dit
import bench_vae

from wan_ray.models.config import PRESETS
from wan_ray.models.dit import compile_blocks
from wan_ray.models.vae import build_vae, compile_norms, fold_time_into_channels
from wan_ray.sampling.loop import sample, seeded_noise
from wan_ray.sampling.plan import make_plan

TASK = PRESETS["ti2v-5B"]
GIB = 2**30


def phase(name: str, fn, device: str, rows: list[dict]):
    """Run `fn`, record its wall time and the peak memory allocated while it ran."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / GIB if device == "cuda" else 0.0
    rows.append(dict(phase=name, seconds=time.perf_counter() - start, peak_gib=peak))
    print(f"{name:<34}{rows[-1]['seconds']:>8.2f} s{peak:>9.2f} GiB", flush=True)
    return out


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cap-gib", type=float, default=24.0, help="allocator cap (GiB of the card's memory)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="compiled blocks, as the denoise stage runs them")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    width, height, frames = (64, 64, 5) if args.tiny else (1280, 704, 121)
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total))
        print(f"{card}: allocator capped at {args.cap_gib:.1f} GiB of {total / GIB:.1f}")

    rows: list[dict] = []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dit = phase("build DiT (bf16 on a GPU)", lambda: bench_dit.build_ours("ti2v-5B", device, args.tiny),
                device, rows)
    if args.compile:
        compile_blocks(dit)
    config = dict((bench_vae.TINY if args.tiny else bench_vae.REAL)["2.2"])
    vae = phase("build VAE 2.2", lambda: build_vae("2.2", **config).eval().to(device, dtype), device, rows)
    fold_time_into_channels(vae)  # as the decode stage runs it
    if device == "cuda":
        compile_norms(vae)

    latent = (dit.config.out_dim, (frames - 1) // 4 + 1, height // 16, width // 16)
    plan = make_plan(args.steps, TASK.sample_shift, "unipc", None, TASK.guide_scale, latent_shape=latent)
    g = torch.Generator().manual_seed(0)
    context = torch.randn(1, TASK.text_len, dit.config.text_dim, generator=g).to(device, torch.bfloat16)
    null = torch.randn(1, TASK.text_len, dit.config.text_dim, generator=g).to(device, torch.bfloat16)
    noise = seeded_noise(latent, 0).unsqueeze(0).to(device)
    experts = {"single": dit}
    sample_fn = lambda: sample(experts, noise, context, null, plan)
    if args.compile:
        phase("compile warm-up (one video)", sample_fn, device, rows)
    z = phase(f"sample ({args.steps} steps, batched CFG)", sample_fn, device, rows)
    decode = lambda: vae.decode_uint8(z)[0]  # [F, H, W, 3] uint8
    phase("decode + frames, DiT resident", decode, device, rows)
    phase("offload DiT to the CPU", lambda: dit.to("cpu"), device, rows)
    if device == "cuda":
        torch.cuda.empty_cache()
    frames_out = phase("decode + frames, DiT offloaded", decode, device, rows)
    assert frames_out.shape == (frames, height, width, 3)

    no_options = max(r["peak_gib"] for r in rows if "offloaded" not in r["phase"])
    with_offload = ("sample", "decode + frames, DiT offloaded")
    offloaded = max(r["peak_gib"] for r in rows if r["phase"].startswith(with_offload))
    print(f"peak for one video: {no_options:.2f} GiB with everything resident, {offloaded:.2f} GiB with the "
          f"DiT offloaded for the decode (cap {args.cap_gib:.1f} GiB)")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(card=card, torch=torch.__version__, cap_gib=args.cap_gib,
                                                  size=[width, height], frames=frames, rows=rows,
                                                  peak_resident_gib=no_options, peak_offloaded_gib=offloaded),
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()

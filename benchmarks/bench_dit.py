"""DiT forward time at real shapes: our WanDiT against diffusers' WanTransformer3DModel, same card, same run.

Random bf16 weights at the true sizes (an A14B expert is 14.3 B parameters, 28.6 GB). Both models share
the big weight tensors, so they compute the same function and both fit one 80 GB card; the output's
relative L2 between them is printed as a check. Timing: CUDA events around each forward, a warm-up
forward first, the median of `--repeat`.

    python benchmarks/bench_dit.py --shapes 480p,720p,ti2v --out results.json
    python benchmarks/bench_dit.py --tiny            # a CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan_ray.models.attention import set_attention_backend
from wan_ray.models.config import PRESETS
from wan_ray.models.dit import WanDiT, cast_dit, dit_key_to_diffusers

# name -> (task, latent [C, T, h, w])
SHAPES = {
    "480p": ("t2v-A14B", (16, 21, 60, 104)),  # 832x480, 81 frames: 32,760 tokens
    "720p": ("t2v-A14B", (16, 21, 90, 160)),  # 1280x720, 81 frames: 75,600 tokens
    "ti2v": ("ti2v-5B", (48, 31, 44, 80)),  # 1280x704, 121 frames: 27,280 tokens
}
TINY = dict(dim=256, ffn_dim=512, num_heads=4, num_layers=2, text_dim=64, freq_dim=32)


def token_count(latent: tuple[int, ...]) -> int:
    """Tokens of a latent [C, T, h, w] after the DiT's 1x2x2 patches."""
    return latent[1] * latent[2] // 2 * latent[3] // 2


def flops(cfg, tokens: int, text: int = 512) -> float:
    """Dense FLOPs of one forward (matmuls and attention; elementwise work left out)."""
    D, F = cfg.dim, cfg.ffn_dim
    per_block = (2 * tokens * D * D * 4  # self-attention q, k, v, o
                 + 4 * tokens * tokens * D  # QK^T and PV
                 + 2 * tokens * D * D * 2 + 2 * text * D * D * 2  # cross-attention q, o and k, v
                 + 4 * tokens * text * D  # cross attention
                 + 2 * tokens * D * F * 2)  # FFN
    return cfg.num_layers * per_block


def dit_config(task: str, tiny: bool) -> dict:
    """The task's DiT config, or with `tiny` the same variant and channels at the TINY size."""
    real = PRESETS[task].dit
    return real.to_dict() if not tiny else {"model_type": real.model_type, "in_dim": real.in_dim,
                                            "out_dim": real.out_dim, **TINY}


def randomize_(module: torch.nn.Module, device: str) -> torch.nn.Module:
    """Fill a DiT (or one block) with random weights in place: std 1/sqrt(fan-in) for matrices, 0.02 for
    vectors, norm weights 1; each parameter keeps its dtype."""
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = 1.0 / p.shape[-1] ** 0.5 if p.ndim >= 2 else 0.02
            p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * std)
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm3.weight" in name:
                p.fill_(1.0)
    return module.eval()


def build_ours(task: str, device: str, tiny: bool) -> WanDiT:
    with torch.device("meta"):
        model = WanDiT(**dit_config(task, tiny))
    cast_dit(model, torch.bfloat16)
    model.to_empty(device=device)
    return randomize_(model, device)


def diffusers_twin(ours: WanDiT):
    """diffusers' model over the same tensors (cast only where its dtype rules differ: small tensors)."""
    from diffusers import WanTransformer3DModel

    cfg = ours.config
    with torch.device("meta"):
        theirs = WanTransformer3DModel(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
                                       attention_head_dim=cfg.head_dim, in_channels=cfg.in_dim,
                                       out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                                       ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers)
    keep_fp32 = getattr(WanTransformer3DModel, "_keep_in_fp32_modules", None) or []
    state = {}
    for key, tensor in ours.state_dict().items():
        name = dit_key_to_diffusers(key)
        fp32 = any(f".{m}." in f".{name}" or name.startswith(f"{m}") for m in keep_fp32)
        state[name] = tensor.to(torch.float32 if fp32 else torch.bfloat16)
    theirs.load_state_dict(state, strict=True, assign=True)
    device = next(ours.parameters()).device
    with torch.device(device):  # its RoPE tables are buffers outside the state dict: rebuild them
        theirs.rope = type(theirs.rope)(cfg.head_dim, cfg.patch_size, 1024)
    return theirs.eval()


def run_info(device: str) -> dict:
    """The card, torch version and date of this run: printed above each table and saved with its rows."""
    info = {"card": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}
    print(f"card: {info['card']}  torch {info['torch']}  {info['date']}")
    return info


def save_rows(path: str | None, info: dict, rows: list[dict]) -> None:
    if path:
        Path(path).write_text(json.dumps({**info, "rows": rows}, indent=2))


def time_forward(fn, repeat: int) -> list[float]:
    times = []
    for i in range(repeat + 1):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1000
        else:
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
        if i:  # the first call warms up
            times.append(elapsed)
    return times


def run_shape(shape: str, args: argparse.Namespace, device: str) -> list[dict]:
    task, latent = SHAPES[shape]
    if args.tiny:
        latent = (latent[0], 2, 8, 8)
    ours = build_ours(task, device, args.tiny)
    theirs = diffusers_twin(ours)
    x = torch.randn(1, ours.config.out_dim, *latent[1:], device=device)
    y = None
    if ours.config.in_dim > ours.config.out_dim:
        y = torch.randn(1, ours.config.in_dim - ours.config.out_dim, *latent[1:], device=device)
    t = torch.tensor([700.0], device=device)
    ctx = torch.randn(1, 512, ours.config.text_dim, device=device, dtype=torch.bfloat16)
    tokens = token_count(latent)
    total = flops(ours.config, tokens)
    rows = []
    with torch.no_grad():
        ref = theirs(x.to(torch.bfloat16), t, ctx, return_dict=False)[0].float()
        times = time_forward(lambda: theirs(x.to(torch.bfloat16), t, ctx, return_dict=False), args.repeat)
        base = statistics.median(times)
        rows.append(dict(shape=shape, impl="diffusers", attn="sdpa", seconds=base, times=times, tokens=tokens,
                         tflops=total / base / 1e12))
        bf16 = ours(x, t, ctx, y=y).float()  # our exact bf16 output (SDPA, eager): what lossy options cost

        def measure(label: str) -> None:
            out = ours(x, t, ctx, y=y).float()  # also the warm-up (and compilation)
            times = time_forward(lambda: ours(x, t, ctx, y=y), args.repeat)
            median = statistics.median(times)
            rows.append(dict(shape=shape, impl="ours", attn=label, seconds=median, times=times, tokens=tokens,
                             rel_l2_vs_diffusers=((out - ref).norm() / ref.norm()).item(),
                             rel_l2_vs_ours_bf16=((out - bf16).norm() / bf16.norm()).item(),
                             tflops=total / median / 1e12, ratio=median / base))

        backends = args.attn.split(",")
        for backend in backends:
            set_attention_backend(ours, backend, cross_attention=args.cross_attn)
            if not args.skip_eager:
                measure(backend)
        if shape in args.compile.split(","):
            for block in ours.blocks:
                block.compile()
            measure(f"{backends[-1]}+compile")
        if args.fp8:
            from wan_ray.models.dit import compile_blocks
            from wan_ray.models.fp8 import quantize_fp8

            quantize_fp8(ours, fast_accum=not args.exact_accum)
            if device == "cuda":  # inductor's CPU code generator fails on these graphs (torch 2.13)
                compile_blocks(ours)
            measure(f"{backends[-1]}" + (f"/{args.cross_attn}" if args.cross_attn else "") + "+fp8"
                    + ("+exactacc" if args.exact_accum else "") + ("+compile" if device == "cuda" else ""))
    if device == "cuda":
        rows[-1]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="480p,720p,ti2v")
    parser.add_argument("--attn", default="sdpa,cudnn", help="our attention backends to time (the last one "
                        "is also the backend of the compiled and FP8 rows), e.g. cudnn or quantized")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-eager", action="store_true", help="time only the compiled variant of ours")
    parser.add_argument("--fp8", action="store_true", help="also time ours with FP8 linear layers, compiled")
    parser.add_argument("--exact-accum", action="store_true", help="FP8 products without fast accumulation")
    parser.add_argument("--cross-attn", default=None, help="the cross-attentions' backend, if not the last "
                        "of --attn (the denoise stage runs cudnn there with --attn quantized)")
    parser.add_argument("--compile", default="", help="shapes where the last backend is also timed with "
                        "each block compiled (torch.compile fuses the float32 elementwise work)")
    parser.add_argument("--tiny", action="store_true", help="small model and shapes, for a CPU smoke run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for shape in args.shapes.split(","):
        rows += run_shape(shape, args, device)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    info = run_info(device)
    print(f"{'shape':6} {'impl':9} {'attn':14} {'seconds':>8} {'TFLOP/s':>8} {'ratio':>6} {'rel L2':>8} "
          f"{'vs bf16':>8}")
    for r in rows:
        print(f"{r['shape']:6} {r['impl']:9} {r['attn']:14} {r['seconds']:8.3f} {r['tflops']:8.1f} "
              f"{r.get('ratio', 1.0):6.3f} {r.get('rel_l2_vs_diffusers', 0.0):8.2e} "
              f"{r.get('rel_l2_vs_ours_bf16', float('nan')):8.2e}")
    save_rows(args.out, info, rows)


if __name__ == "__main__":
    main()

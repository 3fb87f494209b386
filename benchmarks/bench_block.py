"""One DiT block at a real shape, compiled as the denoise stage runs it: its time, and where the time goes.

A forward of the A14B expert is its 40 blocks and little else, so one block (random bf16 weights at the
expert's width) is enough to compare variants of the block's numerics quickly and to see which kernels
take the time. Each variant is written `linear/self-attention/cross-attention[/option...]`:

- linear: ``bf16`` or ``fp8`` (`quantize_fp8`'s projections);
- self- and cross-attention: an attention backend each (``cudnn``, ``quantized``, ...);
- options: ``dynamic`` compiles for dynamic shapes (what torch.compile falls back to after a block has seen
  a second shape), ``cdt`` turns on inductor's coordinate-descent tuning of its generated kernels,
  ``exactacc`` runs the FP8 products without fast accumulation (promoting partial sums to float32).

Each row is the median of `--repeat` forwards (CUDA events, after two warm-up forwards that compile). With
`--profile`, one more forward runs under torch.profiler and its GPU kernels are summed by kind: our
attention kernel, SDPA's, matrix products, inductor's fused kernels, the rest.

    python benchmarks/bench_block.py --shapes 480p,720p --variants fp8/quantized/quantized --profile
    python benchmarks/bench_block.py --tiny --variants bf16/math/math   # a CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_dit

from wan_ray.models.attention import set_attention_backend
from wan_ray.models.config import DiTConfig
from wan_ray.models.dit import RotaryEmbedding3D, WanBlock, cast_dit
from wan_ray.models.fp8 import quantize_block_fp8

KERNEL_KINDS = (  # (kind, substrings of a kernel's name), first match wins
    ("attention (ours)", ("quantized_attention",)),
    ("attention (sdpa)", ("cudnn", "fmha", "flash", "attention")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "scaled_mm", "sm90_")),
    ("fused (inductor)", ("triton_",)),
)

OPTIONS = ("dynamic", "cdt", "exactacc")


@dataclass(frozen=True)
class Variant:
    linear: str
    self_attn: str
    cross_attn: str
    options: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> Variant:
        linear, self_attn, cross_attn, *options = spec.split("/")
        if linear not in ("bf16", "fp8"):
            raise ValueError(f"variant {spec!r}: linear must be bf16 or fp8")
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise ValueError(f"variant {spec!r}: unknown options {sorted(unknown)}; accepted: {OPTIONS}")
        return cls(linear, self_attn, cross_attn, tuple(options))

    def __str__(self) -> str:
        return "/".join((self.linear, self.self_attn, self.cross_attn, *self.options))


def build_block(cfg: DiTConfig, device: str) -> WanBlock:
    """A block cast as `cast_dit` casts the DiT (modulation float32, the rest bf16), with bench_dit's random
    weights."""
    with torch.device("meta"):
        block = WanBlock(cfg)
    cast_dit(block, torch.bfloat16)
    block.to_empty(device=device)
    return bench_dit.randomize_(block, device)


def prepare(master: WanBlock, variant: Variant, device: str) -> WanBlock:
    block = copy.deepcopy(master)
    if variant.linear == "fp8":
        quantize_block_fp8(block, fast_accum="exactacc" not in variant.options)
    set_attention_backend(block, variant.self_attn, cross_attention=variant.cross_attn)
    if device == "cuda":
        block.compile(dynamic="dynamic" in variant.options,
                      options={"coordinate_descent_tuning": True} if "cdt" in variant.options else None)
    return block


def kernel_profile(fn) -> list[dict]:
    """GPU kernels of one call of `fn`: name, launches and total milliseconds, the largest first."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [dict(name=e.key, launches=e.count, ms=e.device_time_total / 1e3)
               for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    return sorted(kernels, key=lambda k: -k["ms"])


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in lowered for k in keys)), "other")


def run_shape(shape: str, args: argparse.Namespace, device: str) -> list[dict]:
    task, latent = bench_dit.SHAPES[shape]
    cfg = DiTConfig.from_dict(bench_dit.dit_config(task, args.tiny))
    grid = (2, 4, 4) if args.tiny else (latent[1], latent[2] // 2, latent[3] // 2)
    tokens = grid[0] * grid[1] * grid[2]
    master = build_block(cfg, device)
    x = torch.randn(1, tokens, cfg.dim, device=device)
    e0 = torch.randn(1, 1, 6, cfg.dim, device=device) * 0.1
    rope = RotaryEmbedding3D(cfg.head_dim)(grid, torch.device(device))
    context = torch.randn(1, 512, cfg.dim, device=device, dtype=torch.bfloat16)
    total = bench_dit.flops(cfg, tokens) / cfg.num_layers
    rows, reference = [], None
    for spec in args.variants.split(","):
        variant = Variant.parse(spec)
        torch._dynamo.reset()  # each variant compiles for its own shape, as a fresh worker would
        block = prepare(master, variant, device)
        with torch.no_grad():
            def forward(block: WanBlock = block) -> torch.Tensor:
                return block(x, e0, rope, context)

            out = forward()  # also compiles
            reference = out if reference is None else reference
            times = bench_dit.time_forward(forward, args.repeat)
            median = statistics.median(times)
            row = dict(shape=shape, variant=str(variant), tokens=tokens, seconds=median, times=times,
                       tflops=total / median / 1e12,
                       rel_l2_vs_first=((out - reference).norm() / reference.norm()).item())
            if args.profile and device == "cuda":
                kernels = kernel_profile(forward)
                by_kind: dict[str, float] = {}
                for k in kernels:
                    kind = kernel_kind(k["name"])
                    by_kind[kind] = by_kind.get(kind, 0.0) + k["ms"]
                row.update(kernels=kernels, ms_by_kind=by_kind)
        rows.append(row)
        del block
    return rows


def print_rows(rows: list[dict], top: int) -> None:
    print(f"{'shape':6} {'variant':34} {'ms':>8} {'TFLOP/s':>8} {'rel L2':>8}  (rel L2: against the first)")
    for r in rows:
        print(f"{r['shape']:6} {r['variant']:34} {r['seconds'] * 1e3:8.2f} {r['tflops']:8.1f} "
              f"{r['rel_l2_vs_first']:8.2e}")
    for r in rows:
        if "kernels" not in r:
            continue
        total = sum(k["ms"] for k in r["kernels"])
        by_kind = sorted(r["ms_by_kind"].items(), key=lambda item: -item[1])
        kinds = ", ".join(f"{kind} {ms:.2f}" for kind, ms in by_kind)
        print(f"\n{r['shape']} {r['variant']}: kernels {total:.2f} ms ({kinds})")
        for k in r["kernels"][:top]:
            print(f"  {k['ms']:8.3f} ms {k['launches']:3}x  {k['name'][:110]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="480p,720p")
    parser.add_argument("--variants", default="bf16/cudnn/cudnn,fp8/quantized/quantized",
                        help="comma-separated linear/self-attention/cross-attention[/option...] specs")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="also sum one forward's kernels by kind")
    parser.add_argument("--top", type=int, default=14, help="kernels listed per profiled row")
    parser.add_argument("--tiny", action="store_true", help="a small block, for a CPU smoke run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [row for shape in args.shapes.split(",") for row in run_shape(shape, args, device)]
    info = bench_dit.run_info(device)
    print_rows(rows, args.top)
    bench_dit.save_rows(args.out, info, rows)


if __name__ == "__main__":
    main()

"""Self-attention alone at the DiT shapes: torch's cuDNN and flash kernels against our quantized kernel.

Random bf16 q, k, v as one self-attention of the benchmarked DiT shapes sees them ([1, L, heads, 128]; k
with a per-channel offset, as real keys have). Each row gives the median time of `--repeat` calls (CUDA
events, one warm-up call first), the attention FLOP rate (4·L²·heads·d per call) and the output's relative
L2 error against a float32 reference (torch's memory-efficient kernel on float32 copies). Rows:

- ``cudnn``, ``flash``: `scaled_dot_product_attention` restricted to that kernel.
- ``quantized``: our `quantized_attention` compiled (the quantisation fused by inductor, the kernel opaque),
  as the compiled DiT runs it; ``quantized-kernel``: the Triton kernel alone on pre-quantized operands.
- with ``--sweep``, the kernel alone under each tile/warp/stage configuration.

    python benchmarks/bench_attention.py --shapes 480p,720p --sweep --out attention.json
    TRITON_INTERPRET=1 python benchmarks/bench_attention.py --tiny   # a CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_dit

from wan_ray.models.attention import attention
from wan_ray.models.config import PRESETS
from wan_ray.models.quantized_attention import (
    DEFAULT_CONFIG,
    KernelConfig,
    launch_kernel,
    quantize_operands,
    quantized_attention,
)


def attention_shape(shape: str, tiny: bool) -> tuple[int, int, int]:
    """(tokens, heads, head dim) of one self-attention at a bench_dit shape."""
    task, latent = bench_dit.SHAPES[shape]
    dit = PRESETS[task].dit
    tokens = bench_dit.token_count(latent)
    return (300, 2, 128) if tiny else (tokens, dit.num_heads, dit.dim // dit.num_heads)


def run_shape(shape: str, args: argparse.Namespace, device: str) -> list[dict]:
    torch._dynamo.reset()  # compile for this shape alone: a second shape would recompile for dynamic shapes
    tokens, heads, head_dim = attention_shape(shape, args.tiny)
    gen = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(1, tokens, heads, head_dim, device=device, generator=gen, dtype=torch.bfloat16)
               for _ in range(3))
    k += 2 * torch.randn(1, 1, heads, head_dim, device=device, generator=gen, dtype=torch.bfloat16)
    reference = attention(q.float(), k.float(), v.float(), "efficient" if device == "cuda" else "math")
    total = 4 * tokens * tokens * heads * head_dim
    rows = []

    def measure(label: str, fn, out: torch.Tensor | None = None) -> None:
        out = fn() if out is None else out
        times = bench_dit.time_forward(fn, args.repeat)
        median = statistics.median(times)
        error = ((out.float() - reference).norm() / reference.norm()).item()
        rows.append(dict(shape=shape, kernel=label, seconds=median, times=times, tokens=tokens, heads=heads,
                         head_dim=head_dim, tflops=total / median / 1e12, rel_l2_vs_fp32=error))

    if device == "cuda":
        for backend in ("cudnn", "flash"):
            measure(backend, lambda backend=backend: attention(q, k, v, backend))
    compiled = torch.compile(quantized_attention, fullgraph=True) if device == "cuda" else quantized_attention
    measure("quantized", lambda: compiled(q, k, v))

    operands = quantize_operands(q, k, v)
    out = torch.empty_like(q)
    configs = [DEFAULT_CONFIG]
    if args.sweep:
        configs += [KernelConfig(m, n, w, s) for m, n, w, s in
                    itertools.product((64, 128), (64, 128), (4, 8), (2, 3, 4))]
    for config in dict.fromkeys(configs):
        def kernel(config: KernelConfig = config) -> torch.Tensor:
            launch_kernel(*operands, out, tokens, config)
            return out
        try:
            measure("quantized-kernel" if config == DEFAULT_CONFIG else f"kernel m{config.block_m} "
                    f"n{config.block_n} w{config.num_warps} s{config.num_stages}", kernel, kernel().clone())
        except Exception as error:  # a configuration the compiler rejects (e.g. out of shared memory)
            print(f"{shape} {config}: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="480p,720p,ti2v")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sweep", action="store_true", help="also time the kernel under each configuration")
    parser.add_argument("--tiny", action="store_true", help="a small shape, for a CPU smoke run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [row for shape in args.shapes.split(",") for row in run_shape(shape, args, device)]
    info = bench_dit.run_info(device)
    print(f"{'shape':6} {'kernel':22} {'seconds':>9} {'TFLOP/s':>8} {'rel L2':>8}")
    for r in sorted(rows, key=lambda r: (r["shape"], r["seconds"])):
        print(f"{r['shape']:6} {r['kernel']:22} {r['seconds']:9.4f} {r['tflops']:8.1f} "
              f"{r['rel_l2_vs_fp32']:8.2e}")
    bench_dit.save_rows(args.out, info, rows)
    assert math.isfinite(sum(r["rel_l2_vs_fp32"] for r in rows)), "non-finite output"


if __name__ == "__main__":
    main()

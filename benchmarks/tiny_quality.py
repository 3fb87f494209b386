"""Quality cost of the opt-in lossy accelerations, on the bundled tiny model's prompt following.

Generates the evaluation prompts (the held-out combinations plus seen ones) with the experts as shipped
(float32), then with each variant of them: bf16 weights, FP8 linear layers over bf16, our quantized
attention kernel (INT8 QKᵀ, FP8 PV) over bf16, alone and with FP8 linear layers, and step caching at
several thresholds. For each it prints the detector's accuracy per attribute, the PSNR of the frames against
the float32 videos of the same seeds, and for step caching the share of expert forwards skipped.

    python benchmarks/tiny_quality.py [--seen 12] [--json benchmarks/results/tiny_quality.json]
    TRITON_INTERPRET=1 python benchmarks/tiny_quality.py --seen 0 --variants "quantized attention"

CPU is enough (FP8 matmuls run on CPU too; the quantized attention kernel runs through Triton's interpreter
when TRITON_INTERPRET=1 is set, slowly); the figures in docs/benchmarks.md come from this script.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wan_ray.models.attention import set_attention_backend
from wan_ray.models.dit import cast_dit
from wan_ray.models.fp8 import quantize_fp8
from wan_ray.sampling.cache import CachedStack, apply_step_cache
from wan_ray.tiny import data
from wan_ray.tiny.detect import accuracy, detect
from wan_ray.tiny.evaluate import TinyPipeline, eval_prompts, generate

Variant = Callable[[nn.Module], nn.Module]


def variants(thresholds: list[float]) -> dict[str, Variant]:
    out: dict[str, Variant] = {
        "float32 (shipped)": lambda m: m,
        "bf16": lambda m: cast_dit(m, torch.bfloat16),
        "fp8 (over bf16)": lambda m: quantize_fp8(cast_dit(m, torch.bfloat16)),
        "quantized attention (over bf16)": lambda m: quantized(cast_dit(m, torch.bfloat16)),
        "fp8+quantized (over bf16)": lambda m: quantized(quantize_fp8(cast_dit(m, torch.bfloat16))),
    }
    for t in thresholds:
        out[f"step cache {t:g}"] = lambda m, t=t: apply_step_cache(m, t)
    return out


def quantized(model: nn.Module) -> nn.Module:
    set_attention_backend(model, "quantized")
    return model


def psnr(videos: np.ndarray, reference: np.ndarray) -> float:
    mse = np.mean((videos.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seen", type=int, default=12)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3])
    p.add_argument("--variants", nargs="+", help="only the variants whose names contain one of these words "
                   "(the float32 reference always runs first)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    pipe = TinyPipeline.load("tiny", "cpu")
    prompts = eval_prompts(args.seen, 0)
    captions, seeds = [c for c, _ in prompts], [s for _, s in prompts]
    expected = [data.parse_caption(c) for c in captions]
    rows, reference = [], None
    print(f"{'variant':<32}{'colour':>8}{'direction':>11}{'background':>12}{'shape':>8}{'PSNR dB':>9}"
          f"{'skipped':>9}{'s/video':>9}")
    for name, make in variants(args.thresholds).items():
        if reference is not None and args.variants and not any(word in name for word in args.variants):
            continue
        experts = {k: make(copy.deepcopy(m)) for k, m in pipe.experts.items()}
        start = time.perf_counter()
        videos = generate(pipe, captions, seeds, experts=experts)  # one batch: one cache state per run
        seconds = (time.perf_counter() - start) / len(captions)
        reference = videos if reference is None else reference
        stacks = [m.stack for m in experts.values() if isinstance(m.stack, CachedStack)]
        forwards = sum(s.skipped + s.computed for s in stacks)
        skipped = sum(s.skipped for s in stacks) / forwards if stacks else 0.0
        acc = accuracy([detect(v) for v in videos], expected)
        quality = psnr(videos, reference)
        row = {"variant": name, **acc, "psnr_db": None if quality == float("inf") else round(quality, 2),
               "skipped": round(skipped, 3), "seconds_per_video": round(seconds, 3)}
        rows.append(row)
        print(f"{name:<32}{acc['colour']:>8.1%}{acc['direction']:>11.1%}{acc['background']:>12.1%}"
              f"{acc['shape']:>8.1%}{quality:>9.2f}{skipped:>9.1%}{seconds:>9.2f}", flush=True)
    if args.json:
        machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
        report = {"date": time.strftime("%Y-%m-%d"), "machine": machine, "torch": torch.__version__,
                  "prompts": len(prompts), "rows": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

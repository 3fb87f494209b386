"""Ulysses scaling of one denoising step at real shapes: gangs of 1, 2, 4, 8 devices, with and without CFG
parallelism.

A step is what the sampler runs per timestep with classifier-free guidance: one forward of batch 2
([conditional; unconditional]). A gang of N runs it with N-way Ulysses, or with CFG parallelism with
N/2-way Ulysses on each half. Every gang size runs in fresh processes (one per device, NCCL with NVLink
multicast off, as the product's gangs do), each rank builds the same random bf16 expert (seeded), rank 0
times the step with CUDA events (median of `--repeat` after a warm-up) and saves its output. The table gives
the speed-up and efficiency against one device and the output's relative L2 against one device (bf16
arithmetic: ~1e-2 is expected).

    python benchmarks/bench_ulysses.py --sizes 1,2,4,8 --shapes 720p,480p --cfg-parallel both --out r.json
    python benchmarks/bench_ulysses.py --tiny --sizes 1,2,4          # CPU smoke run: gloo, a small model
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_dit import SHAPES, build_ours, dit_config, flops, time_forward, token_count

from wan_ray.models.config import DiTConfig
from wan_ray.models.dit import compile_blocks
from wan_ray.parallel import NCCL_ENV, CFGParallel, apply_ulysses, init_gang, make_groups


def step_inputs(model, latent: tuple[int, ...], device: str) -> dict:
    """The batch-2 CFG inputs of one step, the same on every rank (drawn on the CPU from a fixed seed)."""
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    inputs = dict(x=torch.randn(2, cfg.out_dim, *latent[1:], generator=g), t=torch.tensor([700.0, 700.0]),
                  context=torch.randn(2, 512, cfg.text_dim, generator=g).to(torch.bfloat16), y=None)
    if cfg.in_dim > cfg.out_dim:
        inputs["y"] = torch.randn(2, cfg.in_dim - cfg.out_dim, *latent[1:], generator=g)
    return {k: None if v is None else v.to(device) for k, v in inputs.items()}


def _rank(rank: int, size: int, port: int, shape: str, cfg_parallel: bool, args: argparse.Namespace,
          out: str) -> None:
    device = "cpu"
    if torch.cuda.is_available() and not args.tiny:
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    else:
        torch.set_num_threads(1)
    init_gang(rank, size, f"127.0.0.1:{port}")
    task, latent = SHAPES[shape]
    if args.tiny:
        latent = (latent[0], 3, 8, 8)
    model = build_ours(task, device, args.tiny)
    if args.compile:
        compile_blocks(model)
    if size > 1:
        groups = make_groups(cfg_parallel)
        model = apply_ulysses(model, groups.ulysses)
        if groups.cfg is not None:
            model = CFGParallel(model, groups.cfg)
    inputs = step_inputs(model, latent, device)
    with torch.no_grad():
        times = time_forward(lambda: model(**inputs), args.repeat)
        output = model(**inputs)
    if rank == 0:
        torch.save({"times": times, "output": output.float().cpu()}, out)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(shape: str, size: int, cfg_parallel: bool, args: argparse.Namespace, folder: Path) -> dict:
    out = folder / f"{shape}-{size}-{cfg_parallel}.pt"
    mp.spawn(_rank, args=(size, free_port(), shape, cfg_parallel, args, str(out)), nprocs=size, join=True)
    return torch.load(out, weights_only=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="720p,480p", help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--sizes", default="1,2,4,8", help="gang sizes (1 is the baseline and always runs)")
    p.add_argument("--cfg-parallel", choices=("off", "on", "both"), default="both")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile each block, as single-GPU stages do")
    p.add_argument("--tiny", action="store_true", help="small model and shapes on CPU ranks (gloo)")
    p.add_argument("--out", help="write every row (all timings) to this JSON file")
    args = p.parse_args()
    sizes = sorted({1, *(int(s) for s in args.sizes.split(","))})
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.cfg_parallel]
    if torch.cuda.is_available() and not args.tiny and max(sizes) > torch.cuda.device_count():
        sys.exit(f"--sizes asks for {max(sizes)} GPUs, this machine has {torch.cuda.device_count()}")

    rows = []
    print(f"{'shape':<6}{'gang':>5}{'cfg par':>8}{'step s':>9}{'speed-up':>10}{'efficiency':>11}"
          f"{'TFLOP/s/GPU':>12}{'rel L2':>9}")
    with tempfile.TemporaryDirectory() as folder:
        for shape in args.shapes.split(","):
            task, latent = SHAPES[shape]
            base = run(shape, 1, False, args, Path(folder))
            base_s = statistics.median(base["times"])
            tokens = token_count(latent)
            config = DiTConfig(**dit_config(task, args.tiny))
            step_flops = 2 * flops(config, tokens)  # batch 2
            for size in sizes:
                for cfg_parallel in modes:
                    if cfg_parallel and (size == 1 or size % 2):
                        continue
                    result = base if size == 1 else run(shape, size, cfg_parallel, args, Path(folder))
                    seconds = statistics.median(result["times"])
                    ref = base["output"]
                    rel = ((result["output"] - ref).norm() / ref.norm()).item()
                    row = dict(shape=shape, gang_size=size, cfg_parallel=cfg_parallel, seconds=seconds,
                               times=result["times"], speedup=base_s / seconds,
                               efficiency=base_s / seconds / size,
                               tflops_per_gpu=step_flops / seconds / size / 1e12, rel_l2_vs_1=rel)
                    rows.append(row)
                    print(f"{shape:<6}{size:>5}{'yes' if cfg_parallel else 'no':>8}{seconds:>9.3f}"
                          f"{row['speedup']:>10.2f}{row['efficiency']:>11.1%}{row['tflops_per_gpu']:>12.0f}"
                          f"{rel:>9.1e}", flush=True)
    if args.out:
        card = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.tiny else "cpu"
        report = {"card": card, "torch": torch.__version__, "nccl_env": NCCL_ENV, "rows": rows}
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

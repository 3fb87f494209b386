"""VAE decode time and peak memory: our WanVAE21/22 against diffusers' AutoencoderKLWan, same weights.

    python benchmarks/bench_vae.py --cases 2.1-720p,2.2-720p --dtypes bfloat16 --out vae.json
    python benchmarks/bench_vae.py --cases 2.1-720p --variants eager,fused   # also our uint8 decode, compiled
    python benchmarks/bench_vae.py --tiny

Rows: diffusers' decode (bf16 video out), our `decode` (float32 video out) and, per `--variants`, our
`decode_uint8` (the uint8 frames the decode stage keeps), eager, with `compile_norms` (fused) and/or with
`fold_time_into_channels` (folded). Below float32, the uint8 rows also give their distance from our float32
decode's frames: what the low precision costs.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan_ray.models.vae import build_vae, vae_state_dict_to_diffusers
from wan_ray.models.vae_blocks import compile_norms, fold_time_into_channels, pixels_to_uint8

CASES = {  # name -> (version, latent [C, T, h, w]) for the video sizes of the benchmark
    "2.1-720p": ("2.1", (16, 21, 90, 160)),  # 1280x720, 81 frames
    "2.1-480p": ("2.1", (16, 21, 60, 104)),  # 832x480, 81 frames
    "2.2-720p": ("2.2", (48, 31, 44, 80)),  # 1280x704, 121 frames
}
REAL = {"2.1": dict(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2),
        "2.2": dict(dim=160, dec_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2)}
TINY = {"2.1": dict(dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
        "2.2": dict(dim=8, dec_dim=8, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                    latents_mean=[0.0] * 48, latents_std=[1.0] * 48)}


def diffusers_twin(ours, version: str, config: dict):
    from diffusers import AutoencoderKLWan

    kwargs = dict(base_dim=config["dim"], z_dim=config["z_dim"], dim_mult=config["dim_mult"],
                  num_res_blocks=config["num_res_blocks"], latents_mean=list(ours.latents_mean),
                  latents_std=list(ours.latents_std))
    if version == "2.2":
        kwargs.update(decoder_base_dim=config["dec_dim"], is_residual=True, in_channels=12, out_channels=12,
                      patch_size=2, scale_factor_spatial=16)
    theirs = AutoencoderKLWan(**kwargs)
    theirs.load_state_dict(vae_state_dict_to_diffusers(ours.state_dict()), strict=True)
    return theirs


def decode_theirs(theirs, z):
    mean = torch.tensor(theirs.config.latents_mean, device=z.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(theirs.config.latents_std, device=z.device).view(1, -1, 1, 1, 1)
    return theirs.decode((z * std + mean).to(theirs.dtype)).sample.clamp(-1, 1)


def measure(fn, repeat: int, device: str) -> tuple[list[float], float, torch.Tensor]:
    times, out = [], None
    for i in range(repeat + 1):
        out = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return times, peak, out


VARIANTS = {  # name -> what is applied to a fresh copy of our VAE before timing its decode_uint8
    "eager": (),
    "fused": (compile_norms,),
    "folded": (fold_time_into_channels,),
    "fused+folded": (compile_norms, fold_time_into_channels),
}


def run_case(case: str, dtype: torch.dtype, args: argparse.Namespace, device: str) -> list[dict]:
    version, latent = CASES[case]
    if args.tiny:
        latent = (latent[0], 3, 8, 8)
    torch.manual_seed(0)
    config = (TINY if args.tiny else REAL)[version]
    built = build_vae(version, **config).eval()  # stays on the CPU: each of our rows gets a fresh copy
    theirs = diffusers_twin(built, version, config).eval().to(device, dtype)
    z = torch.randn(1, *latent, device=device)
    name = str(dtype).removeprefix("torch.")
    rows = []

    def add(impl: str, fn) -> torch.Tensor:
        times, peak, out = measure(fn, args.repeat, device)
        out = out.cpu()
        rows.append(dict(case=case, dtype=name, impl=impl, seconds=statistics.median(times), times=times,
                         peak_gib=peak, frames=out.shape[1 if out.dtype == torch.uint8 else 2]))
        if rows[0] is not rows[-1]:
            base = rows[0]
            rows[-1].update(time_ratio=rows[-1]["seconds"] / base["seconds"],
                            memory_ratio=peak / base["peak_gib"] if base["peak_gib"] else 0.0)
        return out

    def ours(variant: str = "eager"):
        """Only one model's weights on the card at a time, so each peak counts one set."""
        torch._dynamo.reset()  # each variant compiles afresh: no graphs of an earlier case count
        model = copy.deepcopy(built).to(device, dtype)
        for speed_up in VARIANTS[variant]:
            speed_up(model)
        return model

    with torch.no_grad():
        ref = add("diffusers", lambda: decode_theirs(theirs, z)).float()
        theirs.cpu()  # its weights off the card too
        model = ours()
        out = add("ours", lambda: model.decode(z))
        rows[-1]["rel_l2_vs_diffusers"] = ((out.float() - ref).norm() / ref.norm()).item()
        ref_frames = pixels_to_uint8(ref).float()
        uint8_rows = {}
        for variant in args.variants.split(","):
            del model
            model = ours(variant)
            frames = add(f"ours uint8 {variant}", lambda model=model: model.decode_uint8(z))
            error = (frames.float() - ref_frames).norm() / ref_frames.norm()
            rows[-1]["rel_l2_vs_diffusers"] = error.item()
            uint8_rows[len(rows) - 1] = frames
        if dtype != torch.float32:  # what the low precision costs: against our float32 decode's frames
            del model
            model = copy.deepcopy(built).to(device)
            exact = model.decode_uint8(z).cpu().float()
            for i, frames in uint8_rows.items():
                error = (frames.float() - exact).abs()
                rows[i].update(rel_l2_vs_float32=(error.norm() / exact.norm()).item(),
                               mean_abs_levels_vs_float32=error.mean().item())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="2.1-720p,2.2-720p")
    parser.add_argument("--dtypes", default="bfloat16")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--variants", default="eager", help=f"our decode_uint8 variants to time, of "
                        f"{list(VARIANTS)} (fused = compile_norms)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for case in args.cases.split(","):
        for dtype_name in args.dtypes.split(","):
            rows += run_case(case, getattr(torch, dtype_name), args, device)
            if device == "cuda":
                torch.cuda.empty_cache()
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"card: {card}  torch {torch.__version__}  {time.strftime('%Y-%m-%d')}")
    print(f"{'case':9} {'dtype':9} {'impl':32} {'seconds':>8} {'peak GiB':>9} {'t ratio':>7} {'m ratio':>7} "
          f"{'rel L2':>8} {'fp32 L2':>8} {'fp32 lvl':>8}")
    for r in rows:
        fidelity = (f" {r['rel_l2_vs_float32']:8.2e} {r['mean_abs_levels_vs_float32']:8.3f}"
                    if "rel_l2_vs_float32" in r else "")
        print(f"{r['case']:9} {r['dtype']:9} {r['impl']:32} {r['seconds']:8.3f} {r['peak_gib']:9.2f} "
              f"{r.get('time_ratio', 1.0):7.3f} {r.get('memory_ratio', 1.0):7.3f} "
              f"{r.get('rel_l2_vs_diffusers', 0):8.2e}{fidelity}")
    print("rel L2: against diffusers' video; fp32 L2 / lvl: our uint8 frames against our float32 decode's "
          "(relative L2, mean levels of 255)")
    if args.out:
        result = {"card": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

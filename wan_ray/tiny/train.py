"""Training a Wan-architecture model from scratch or fine-tuning one on small data: VAE, then two DiT experts.

- **VAE** (`train_vae`): a Wan2.1 VAE as an autoencoder, with the reparameterised posterior, an L1 loss that
  weighs pixels by how much they stand out from their frame's median (flat backgrounds would otherwise
  drown the objects) and a small KL term that keeps the latent space smooth. `latent_stats` then measures the
  per-channel mean and std of the posterior means, which become the VAE's `latents_mean` / `latents_std`.
- **Experts** (`train_experts`): flow matching on normalised latents, x_t = (1 - σ) x0 + σ ε, target
  ε - x0, fed t = 1000 σ. Each expert draws σ from the timestep-shifted distribution restricted to its own
  range (high-noise: σ >= boundary, low-noise: below), so each learns only the steps the sampler will give
  it. Captions are replaced by the task's negative prompt with probability `text_dropout`: that is exactly
  the unconditional input classifier-free guidance uses at sampling time. EMA weights are optional.
- **Release** (`save_release`): the official folder layout (`high_noise_model/`, `low_noise_model/`, the VAE
  `.pth`, the umT5 `.pth` in official keys, `tokenizer/`) plus `wan_ray.json` naming the task and carrying the
  VAE's architecture and statistics, so `open_checkpoint` and the regular loaders read it.

`python -m wan_ray.tiny.train --out DIR` runs all of it on the synthetic shapes dataset (`--init DIR` starts
from an existing release, e.g. to fine-tune the bundled one; `--vae-steps 0` keeps its VAE). The functions
take plain iterators of tensors and captions, so other small datasets plug in (docs/tiny-model.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.checkpoint import TASK_FILE, load_dit, load_vae, save_dit
from ..models.config import TaskSpec, get_preset
from ..models.dit import WanDiT, compile_blocks
from ..models.text_encoder import (
    UMT5TextEncoder,
    build_word_tokenizer,
    load_tokenizer,
    load_umt5_encoder,
    umt5_state_dict_to_official,
)
from ..models.vae import WanVAE, build_vae, to_uint8
from ..models.vae_blocks import CausalCache, CausalConv3d, Resample
from ..sampling.loop import pad_contexts
from . import TASK, UMT5_ARCH, VAE_ARCH, data

Log = Callable[[str], None]


class _Clock:
    """Training progress in [0, 1]: by steps, or by time when a time limit comes first."""

    def __init__(self, steps: int, max_seconds: float | None):
        self.steps, self.max_seconds, self.start = steps, max_seconds, time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def progress(self, step: int) -> float:
        by_time = self.elapsed / self.max_seconds if self.max_seconds else 0.0
        return min(1.0, max(step / self.steps, by_time))

    def done(self, step: int) -> bool:
        return step >= self.steps or (step > 0 and self.progress(step) >= 1.0)


def _set_lr(opt: torch.optim.Optimizer, peak: float, step: int, warmup: int, progress: float) -> float:
    """Linear warm-up, then a cosine decay to a tenth of the peak over the run's progress."""
    lr = peak * min(1.0, step / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


# ---------------------------------------------------------------------------------------------------------
# VAE


@dataclass
class VAETraining:
    steps: int = 3000
    max_seconds: float | None = None  # stop earlier when this much time has passed
    batch_size: int = 8
    crop: int | None = 64  # train on random crops of this size (the VAE is convolutional): 4x cheaper at 128
    lr: float = 2e-3
    kl_weight: float = 1e-4
    salient_weight: float = 10.0  # extra L1 weight on pixels that stand out from their frame's median
    log_every: int = 100


def vae_posterior(vae: WanVAE, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised posterior (μ, log σ²), each [B, z, T, h, w], with gradients (`encode` returns μ only).

    The same causal chunking as `WanVAE.encode`: pixel frames [1], [4], [4], ... each give one latent frame.
    """
    rest = video[:, :, 1:]
    chunks = [video[:, :, :1], *(rest.split(4, dim=2) if rest.shape[2] else ())]
    cache = CausalCache()
    out = []
    for chunk in chunks:
        out.append(vae.encoder(vae.pack(chunk), cache))  # [B, 2z, 1, h, w]
        cache.first_chunk = False
    mu, logvar = vae.conv1(torch.cat(out, dim=2)).chunk(2, dim=1)
    return mu, logvar.clamp(-30.0, 20.0)


def vae_reconstruct(vae: WanVAE, z: torch.Tensor) -> torch.Tensor:
    """Unnormalised latent [B, z, T, h, w] -> pixels [B, 3, 4(T-1)+1, H, W], not clamped.

    The decoding of `WanVAE.decode` (one latent frame at a time through the causal cache) without its final
    clamp to [-1, 1]: a clamped output has no gradient where it overshoots, and targets sit at exactly
    -1 and 1 (black, saturated colours), so a clamped loss would never correct such pixels.
    """
    x = vae.conv2(z)
    cache = CausalCache()
    frames = []
    for i in range(x.shape[2]):
        frames.append(vae.unpack(vae.decoder(x[:, :, i : i + 1], cache)))  # [B, 3, 1 or 4, H, W]
        cache.first_chunk = False
    return torch.cat(frames, dim=2)


def _salience(video: torch.Tensor) -> torch.Tensor:
    """How much each pixel stands out from its frame's median colour: [B, 1, F, H, W]."""
    median = video.flatten(3).median(dim=-1).values[..., None, None]  # [B, 3, F, 1, 1]
    return (video - median).abs().amax(dim=1, keepdim=True)


def random_crops(videos: torch.Tensor, size: int, generator: torch.Generator, salient: float = 0.75
                 ) -> torch.Tensor:
    """One `size` x `size` window per video, the same in every frame.

    With probability `salient` the window holds the salience centroid of the middle frame at a random
    place inside it (small objects would otherwise be missing from most crops); else it is uniform.
    """
    h, w = videos.shape[-2:]
    if size >= min(h, w):
        return videos
    middle = _salience(videos[:, :, videos.shape[2] // 2 : videos.shape[2] // 2 + 1])[:, 0, 0]  # [B, H, W]
    crops = []
    for video, s in zip(videos, middle, strict=True):
        u = torch.rand(3, generator=generator).tolist()
        y, x = int(u[1] * (h - size + 1)), int(u[2] * (w - size + 1))
        if u[0] < salient and s.sum() > 0:
            cy = float((torch.arange(h, device=s.device)[:, None] * s).sum() / s.sum())
            cx = float((torch.arange(w, device=s.device)[None, :] * s).sum() / s.sum())
            y = min(max(int(cy - u[1] * size), 0), h - size)  # the centroid at a random height in the crop
            x = min(max(int(cx - u[2] * size), 0), w - size)
        crops.append(video[..., y : y + size, x : x + size])
    return torch.stack(crops)


def vae_loss(vae: WanVAE, video: torch.Tensor, cfg: VAETraining) -> tuple[torch.Tensor, dict[str, float]]:
    """Salience-weighted L1 of the reconstruction from a posterior sample, plus the weighted KL."""
    mu, logvar = vae_posterior(vae, video)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
    recon = vae_reconstruct(vae, z)  # [B, 3, F, H, W]
    l1 = ((recon - video).abs() * (1 + cfg.salient_weight * _salience(video))).mean()
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean()
    return l1 + cfg.kl_weight * kl, {"l1": l1.item(), "kl": kl.item()}


def train_vae(vae: WanVAE, videos: Iterator[torch.Tensor], cfg: VAETraining, log: Log = print,
              callback: Callable[[int], None] | None = None) -> dict:
    """Train `vae` in place on batches of videos [B, 3, F, H, W] in [-1, 1] (F = 4n+1); returns a summary.

    `callback(step)` runs at every log line (e.g. to save or evaluate)."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    clock, step, stats = _Clock(cfg.steps, cfg.max_seconds), 0, {}
    while not clock.done(step):
        step += 1
        lr = _set_lr(opt, cfg.lr, step, 50, clock.progress(step))
        video = next(videos)
        loss, stats = vae_loss(vae, random_crops(video, cfg.crop, gen) if cfg.crop else video, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % cfg.log_every == 0 or step == 1:
            log(f"vae step {step}: l1 {stats['l1']:.4f} kl {stats['kl']:.3f} lr {lr:.2e} "
                f"({clock.elapsed:.0f} s)")
            if callback is not None:
                callback(step)
    vae.eval()
    return {"steps": step, "seconds": round(clock.elapsed, 1), **stats}


@torch.no_grad()
def inflate_image_vae(vae: WanVAE) -> None:
    """Turn a VAE trained on single frames into a frame-by-frame video VAE, to fine-tune on videos from.

    A one-frame video only ever reaches the newest time slice of each causal 3x3x3 kernel (the rest sees
    zero padding) and never the temporal resamples. Zeroing the older slices makes every later chunk go
    through the same per-frame path; the temporal downsamples then keep the last frame of each pair and the
    temporal upsamples repeat each frame. The result reconstructs a video as its every fourth frame, each
    held for four frames; video training then teaches it the motion in between. Training on single frames
    first is about 17 times cheaper per video, which is what makes CPU training of the VAE practical.
    """
    for m in vae.modules():
        if isinstance(m, Resample) and hasattr(m, "time_conv"):
            w, c = m.time_conv.weight, m.time_conv.in_channels  # [out, in, 3, 1, 1]
            w.zero_()
            m.time_conv.bias.zero_()
            for half in range(w.shape[0] // c):  # downsample: one copy; upsample: one per new frame
                w[half * c : (half + 1) * c, :, -1, 0, 0] = torch.eye(c)
        elif isinstance(m, CausalConv3d) and m.time_pad and not _is_time_conv(vae, m):
            m.weight[:, :, :-1] = 0


def _is_time_conv(vae: WanVAE, conv: nn.Module) -> bool:
    return any(getattr(m, "time_conv", None) is conv for m in vae.modules())


def single_frames(videos: Iterator[torch.Tensor], seed: int) -> Iterator[torch.Tensor]:
    """One random frame of each batch of videos, as one-frame videos [B, 3, 1, H, W]."""
    gen = torch.Generator().manual_seed(seed)
    for video in videos:
        k = int(torch.randint(video.shape[2], (1,), generator=gen))
        yield video[:, :, k : k + 1]


@torch.no_grad()
def narrow_posterior(vae: WanVAE, logvar: float = -6.0) -> None:
    """Start a fresh VAE with a narrow posterior (σ ≈ 0.05): with σ ≈ 1 at initialisation the sampled latents
    are mostly noise and the decoder learns nothing but the mean colour for a long time."""
    vae.conv1.bias[vae.z_dim :] = logvar


@torch.no_grad()
def reconstruction_check(vae: WanVAE, size: int, device: torch.device, count: int = 48) -> dict[str, float]:
    """Detector accuracy on VAE reconstructions of synthetic videos (every combination, unseen seeds)."""
    from .detect import accuracy, detect

    scenes = data.sample_scenes(count, seed=12345, combos=data.ALL_COMBOS, size=size)
    recon = vae.decode(vae.encode(data.render(scenes, size=size, device=device)))
    return accuracy([detect(to_uint8(v)) for v in recon], [s.attributes for s in scenes])


@torch.no_grad()
def latent_stats(vae: WanVAE, videos: Iterator[torch.Tensor], batches: int
                 ) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means over `batches` batches of videos."""
    total = total_sq = count = 0
    for _ in range(batches):
        mu, _ = vae_posterior(vae, next(videos))
        mu = mu.double().transpose(0, 1).flatten(1)  # [z, N]
        total, total_sq, count = total + mu.sum(1), total_sq + mu.pow(2).sum(1), count + mu.shape[1]
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    return [round(v, 6) for v in mean.tolist()], [round(v, 6) for v in std.tolist()]


# ---------------------------------------------------------------------------------------------------------
# Flow matching


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The timestep shift of the Wan schedulers: σ = s·u / (1 + (s - 1)·u)."""
    return shift * u / (1 + (shift - 1) * u)


def unshift_sigma(sigma: float, shift: float) -> float:
    return sigma / (shift - (shift - 1) * sigma)


def sample_sigmas(n: int, shift: float, low: float, high: float, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """`n` values of σ in [low, high), distributed as shifted-uniform σ restricted to that range."""
    u_low, u_high = unshift_sigma(low, shift), unshift_sigma(high, shift)
    u = u_low + (u_high - u_low) * torch.rand(n, generator=generator)
    return shift_sigma(u, shift).to(device)


def flow_matching_loss(model: nn.Module, x0: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                       noise: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the model's velocity at x_σ = (1 - σ)·x0 + σ·ε (fed t = 1000σ) and the target ε - x0."""
    noise = torch.randn_like(x0) if noise is None else noise
    s = sigma.view(-1, *(1,) * (x0.ndim - 1))
    x_t = (1 - s) * x0 + s * noise
    v = model(x_t, sigma * 1000, context)
    return F.mse_loss(v.float(), (noise - x0).float())


class EMA:
    """Exponential moving average of a module's parameters, with the usual warm-up of the decay."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - d)


class CaptionEmbeddings:
    """Caption -> its umT5 embedding [L, D], each caption encoded once (the encoder is frozen)."""

    def __init__(self, encoder: UMT5TextEncoder):
        self.encoder = encoder
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: Sequence[str]) -> list[torch.Tensor]:
        new = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if new:
            self.cache.update(zip(new, (e.float() for e in self.encoder.encode(new)), strict=True))
        return [self.cache[c] for c in captions]


@dataclass
class DiTTraining:
    steps: int = 20000
    max_seconds: float | None = None
    batch_size: int = 128
    lr: float = 5e-4
    warmup: int = 200
    weight_decay: float = 0.01
    shift: float = 3.0  # timestep shift of the training σ distribution
    text_dropout: float = 0.1  # chance of training on the negative prompt instead of the caption (for CFG)
    ema: float | None = 0.999  # None: no EMA
    log_every: int = 200
    seed: int = 0
    bf16: bool = False  # bf16 autocast of the forward/backward (the weights and the optimizer stay float32)


def expert_ranges(task: TaskSpec) -> dict[str, tuple[float, float]]:
    """σ range of each expert: the sampler switches to the low-noise expert when t < boundary·1000."""
    if task.boundary is None:
        return {"single": (0.0, 1.0)}
    return {"high": (task.boundary, 1.0), "low": (0.0, task.boundary)}


def train_experts(experts: Mapping[str, WanDiT], ranges: Mapping[str, tuple[float, float]],
                  batches: Iterator[tuple[torch.Tensor, list[str]]],
                  embed: Callable[[list[str]], list[torch.Tensor]],
                  negative_prompt: str, cfg: DiTTraining, log: Log = print,
                  callback: Callable[[int, dict[str, WanDiT]], None] | None = None
                  ) -> tuple[dict[str, WanDiT], dict]:
    """Train each expert in place on its σ range; `batches` yields (normalised latents, captions).

    Every step gives each expert the same clean latents with its own σ and noise. Returns the weights to
    ship (the EMA copies when `cfg.ema` is set) and a summary. `callback(step, weights to ship)` runs at
    every log line (e.g. to save a checkpoint).
    """
    params = [p for m in experts.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    emas = {name: EMA(m, cfg.ema) for name, m in experts.items()} if cfg.ema else None
    gen = torch.Generator().manual_seed(cfg.seed)
    null = embed([negative_prompt])[0]
    for m in experts.values():
        m.train()
    clock, step, losses = _Clock(cfg.steps, cfg.max_seconds), 0, {}
    while not clock.done(step):
        step += 1
        lr = _set_lr(opt, cfg.lr, step, cfg.warmup, clock.progress(step))
        x0, captions = next(batches)
        drop = torch.rand(len(captions), generator=gen) < cfg.text_dropout
        texts = [null if d else e for d, e in zip(drop.tolist(), embed(captions), strict=True)]
        context = pad_contexts(texts).to(x0.device)
        opt.zero_grad(set_to_none=True)
        for name, model in experts.items():
            sigma = sample_sigmas(len(captions), cfg.shift, *ranges[name], generator=gen, device=x0.device)
            with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = flow_matching_loss(model, x0, sigma, context)
            loss.backward()  # one expert's graph at a time: half the activation memory
            losses[name] = 0.98 * losses.get(name, loss.item()) + 0.02 * loss.item()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if emas:
            for name, ema in emas.items():
                ema.update(experts[name])
        if step % cfg.log_every == 0 or step == 1:
            shown = " ".join(f"{n} {v:.4f}" for n, v in losses.items())
            log(f"dit step {step}: loss {shown} lr {lr:.2e} ({clock.elapsed:.0f} s)")
            if callback is not None:
                callback(step, {name: emas[name].model if emas else m for name, m in experts.items()})
    final = {name: (emas[name].model if emas else m).eval() for name, m in experts.items()}
    for m in experts.values():
        m.eval()
    summary = {"steps": step, "seconds": round(clock.elapsed, 1),
               "loss": {n: round(v, 5) for n, v in losses.items()}}
    return final, summary


@torch.no_grad()
def encode_bank(vae: WanVAE, batches: Iterator[tuple[torch.Tensor, list[str]]], count: int
                ) -> tuple[torch.Tensor, list[str]]:
    """Normalised latents and captions of `count` videos (the VAE is frozen, so they are encoded once)."""
    latents, captions = [], []
    while len(captions) < count:
        video, caps = next(batches)
        latents.append(vae.encode(video))
        captions += caps
    return torch.cat(latents)[:count], captions[:count]


def bank_batches(latents: torch.Tensor, captions: list[str], batch_size: int, seed: int
                 ) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Endless random batches from an encoded bank."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(len(captions), (batch_size,), generator=gen)
        yield latents[idx.to(latents.device)], [captions[i] for i in idx.tolist()]


# ---------------------------------------------------------------------------------------------------------
# Components and the release


def make_text_encoder(folder: Path, task: TaskSpec, vocabulary: Sequence[str], seed: int) -> None:
    """Write a word tokenizer over `vocabulary` and a random-weight umT5 encoder (official keys)."""
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer_dir = build_word_tokenizer(list(vocabulary), folder / task.tokenizer_dir)
    vocab_size = len(load_tokenizer(tokenizer_dir))
    torch.manual_seed(seed)
    model = UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **UMT5_ARCH))
    if model.config.d_model != task.dit.text_dim:
        raise ValueError(f"umT5 width {model.config.d_model} != the DiT's text_dim {task.dit.text_dim}")
    torch.save(umt5_state_dict_to_official(model), folder / task.text_encoder_file)


def save_release(folder: Path, task: TaskSpec, experts: Mapping[str, WanDiT], vae: WanVAE,
                 vae_config: dict, dit_dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write experts, VAE and `wan_ray.json` into `folder` (which already holds the text encoder)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, model in experts.items():
        stored = copy.deepcopy(model).to("cpu", dit_dtype)  # every tensor in `dit_dtype`: smaller files
        save_dit(stored, folder / task.expert_dirs[name])
    save_vae(folder, task, vae, vae_config)
    return folder


def save_vae(folder: Path, task: TaskSpec, vae: WanVAE, vae_config: dict) -> None:
    """The VAE's float32 state dict, and `wan_ray.json` with its architecture and latent statistics."""
    torch.save({k: v.detach().cpu().float() for k, v in vae.state_dict().items()}, folder / task.vae_file)
    stats = {"latents_mean": list(vae.latents_mean), "latents_std": list(vae.latents_std)}
    spec = {"task": task.name, "vae_config": {**_jsonable(vae_config), **stats}}
    (folder / TASK_FILE).write_text(json.dumps(spec, indent=2) + "\n")


def _jsonable(config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


# ---------------------------------------------------------------------------------------------------------
# Command line


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m wan_ray.tiny.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder to write the release into")
    p.add_argument("--init", type=Path, help="start from this release, or from a VAE-only one written by "
                   "--stop-after vae (its text encoder, VAE and any experts)")
    p.add_argument("--stop-after", choices=("vae",), help="write the text encoder and VAE, then stop")
    p.add_argument("--task", default=TASK, help="task preset giving the DiT config and sampling defaults")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=data.SIZE, help="video size of the synthetic data")
    vae = p.add_argument_group("VAE: single frames, inflation, then clips")
    vae.add_argument("--vae-image-steps", type=int, default=1500, help="steps on single frames, then the VAE "
                     "is inflated (its temporal weights reset); 0 skips both")
    vae.add_argument("--vae-image-batch", type=int, default=32)
    vae.add_argument("--vae-steps", type=int, default=600, help="steps on video clips; with --init, 0 for "
                     "both keeps the VAE as it is")
    vae.add_argument("--vae-seconds", type=float, help="time limit of each VAE phase")
    vae.add_argument("--vae-batch", type=int, default=VAETraining.batch_size)
    vae.add_argument("--vae-frames", type=int, default=9, help="frames of the training clips (4n+1, >= 9)")
    vae.add_argument("--vae-crop", type=int, default=VAETraining.crop, help="crop size for training")
    vae.add_argument("--vae-lr", type=float, default=VAETraining.lr)
    vae.add_argument("--stats-videos", type=int, default=512, help="videos measured for latent statistics")
    dit = p.add_argument_group("experts")
    dit.add_argument("--bank", type=int, default=4096, help="videos encoded once for the DiT phase")
    dit.add_argument("--dit-steps", type=int, default=DiTTraining.steps)
    dit.add_argument("--dit-seconds", type=float, help="time limit of the DiT phase")
    dit.add_argument("--experts", nargs="+", help="train only these experts (e.g. high); with --init the "
                     "others are kept as they are")
    dit.add_argument("--dit-batch", type=int, default=DiTTraining.batch_size)
    dit.add_argument("--lr", type=float, default=DiTTraining.lr)
    dit.add_argument("--text-dropout", type=float, default=DiTTraining.text_dropout)
    dit.add_argument("--ema", type=float, default=DiTTraining.ema, help="EMA decay; 0 disables")
    dit.add_argument("--save-every", type=int, help="also write the release every N steps (a log step)")
    dit.add_argument("--log-every", type=int, default=DiTTraining.log_every)
    dit.add_argument("--compile", action="store_true", help="torch.compile each block (fuses the float32 "
                     "modulation passes that make small-width training memory-bound on a GPU)")
    dit.add_argument("--bf16", action="store_true", help="bf16 autocast of the experts (fast on AMX CPUs)")
    dit.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                     help="dtype the experts are stored in")
    return p.parse_args(argv)


def _fresh_or_init_vae(args: argparse.Namespace, task: TaskSpec, device: torch.device
                       ) -> tuple[WanVAE, dict]:
    if args.init:
        spec = json.loads((args.init / TASK_FILE).read_text())
        config = dict(spec["vae_config"])
        vae = load_vae(args.init / task.vae_file, device, config=config).requires_grad_(True)
        arch = {k: v for k, v in config.items() if k not in ("latents_mean", "latents_std")}
        return vae, arch
    arch = dict(VAE_ARCH)
    z = arch["z_dim"]
    vae = build_vae(task.vae_version, **arch, latents_mean=[0.0] * z, latents_std=[1.0] * z).to(device)
    narrow_posterior(vae)
    return vae, arch


def main(argv: Sequence[str] | None = None) -> Path:
    args = _parse(argv)
    t0 = time.monotonic()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    task = get_preset(args.task)
    unknown = set(args.experts or ()) - set(task.expert_dirs)
    if unknown:  # checked before any work is done
        raise SystemExit(f"--experts: no expert named {sorted(unknown)}; "
                         f"this task has {sorted(task.expert_dirs)}")
    if args.experts and not args.init:
        raise SystemExit("--experts trains some experts only; the others come from --init, which is missing")
    say = lambda msg: print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)
    log_file = (args.init or out) / "training_log.json"
    report: dict = json.loads(log_file.read_text()) if args.init and log_file.is_file() else {}
    report.setdefault("runs", []).append({"args": {k: str(v) for k, v in vars(args).items()},
                                          "device": _device_name(device)})
    run = report["runs"][-1]
    batches = lambda n, seed: data.batches(n, args.seed * 100 + seed, size=args.size, device=device)

    # Text encoder: frozen, so it is written first and the experts train on exactly the stored weights.
    if args.init:
        _copy(args.init / task.text_encoder_file, out / task.text_encoder_file)
        _copy(args.init / task.tokenizer_dir, out / task.tokenizer_dir)
    else:
        make_text_encoder(out, task, data.words(*(data.caption(*c) for c in data.ALL_COMBOS),
                                                task.negative_prompt), args.seed)
    text = UMT5TextEncoder(load_umt5_encoder(out / task.text_encoder_file, device=device),
                           load_tokenizer(out / task.tokenizer_dir), text_len=task.text_len)

    # VAE: single frames, inflation, clips; then the latent statistics that normalise the DiT's latents.
    vae, vae_arch = _fresh_or_init_vae(args, task, device)
    if args.vae_image_steps > 0:
        cfg = VAETraining(steps=args.vae_image_steps, max_seconds=args.vae_seconds,
                          batch_size=args.vae_image_batch, crop=args.vae_crop, lr=args.vae_lr)
        frames = single_frames((v for v, _ in batches(cfg.batch_size, 1)), seed=0)
        run["vae_image"] = train_vae(vae, frames, cfg, say)
        inflate_image_vae(vae)
    if args.vae_steps > 0:
        cfg = VAETraining(steps=args.vae_steps, max_seconds=args.vae_seconds, batch_size=args.vae_batch,
                          crop=args.vae_crop, lr=args.vae_lr)
        clips = (v[:, :, : args.vae_frames] for v, _ in batches(cfg.batch_size, 2))
        run["vae"] = train_vae(vae, clips, cfg, say)
    if not args.init or args.vae_steps > 0 or args.vae_image_steps > 0:
        n = min(32, args.stats_videos)
        videos = (v for v, _ in batches(n, 3))
        mean, std = latent_stats(vae, videos, batches=math.ceil(args.stats_videos / n))
        vae.latents_mean, vae.latents_std = tuple(mean), tuple(std)
        say(f"latent mean {mean}\nlatent std {std}")
        run["vae_reconstruction"] = reconstruction_check(vae, args.size, device)
        say(f"VAE reconstructions, detector accuracy: {run['vae_reconstruction']}")
    vae.requires_grad_(False).eval()
    save_vae(out, task, vae, vae_arch)
    if args.stop_after == "vae":
        _write_log(out, report)
        return out

    # Experts: flow matching on a bank of encoded training videos.
    latents, captions = encode_bank(vae, batches(min(64, args.bank), 4), args.bank)
    say(f"encoded {len(captions)} videos to latents {tuple(latents.shape[1:])}")
    experts = {}
    for name, folder in task.expert_dirs.items():
        if args.init and (args.init / folder).is_dir():
            experts[name] = load_dit(args.init / folder, device, torch.float32).train().requires_grad_(True)
        else:
            experts[name] = WanDiT(**task.dit.to_dict()).to(device)
            experts[name].init_weights()
    trained = {name: experts[name] for name in args.experts or experts}
    if args.compile:
        for model in trained.values():
            compile_blocks(model)
    cfg = DiTTraining(steps=args.dit_steps, max_seconds=args.dit_seconds, batch_size=args.dit_batch,
                      lr=args.lr, text_dropout=args.text_dropout, ema=args.ema or None, seed=args.seed,
                      bf16=args.bf16, log_every=args.log_every)

    def save_now(step: int, weights: dict[str, WanDiT]) -> None:
        if args.save_every and step % args.save_every == 0:
            save_release(out, task, {**experts, **weights}, vae, vae_arch, getattr(torch, args.dtype))
            say(f"saved the experts of step {step}")

    ranges = {name: expert_ranges(task)[name] for name in trained}
    final, run["dit"] = train_experts(trained, ranges,
                                      bank_batches(latents, captions, cfg.batch_size, args.seed + 4),
                                      CaptionEmbeddings(text), task.negative_prompt, cfg, say, save_now)
    run["seconds"] = round(time.monotonic() - t0, 1)
    save_release(out, task, {**experts, **final}, vae, vae_arch, getattr(torch, args.dtype))
    _write_log(out, report)
    say(f"wrote {out}")
    return out


def _write_log(out: Path, report: dict) -> None:
    (out / "training_log.json").write_text(json.dumps(report, indent=2) + "\n")


def _copy(src: Path, dst: Path) -> None:
    if src.resolve() == dst.resolve():
        return
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        shutil.copy(src, dst)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


if __name__ == "__main__":
    main()

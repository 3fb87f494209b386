"""Building blocks shared by the Wan VAEs (2.1 and 2.2), and the chunked encode/decode driver.

Both VAEs are causal in time: a video is encoded in chunks of pixel frames [1], [4], [4], ... (one latent
frame each) and decoded one latent frame at a time (1, then 4 pixel frames each). Every temporal conv sees
the last two input frames of the previous chunk through a `CausalCache`, so the chunks add up to one causal
pass. Chunking and cache follow the official `wan/modules/vae2_1.py` / `vae2_2.py` exactly (spec §7.1-7.2).

Module and attribute names (`residual.2`, `resample.1`, `time_conv`, `head.0`, ...) are those of the official
checkpoints, so `Wan2.1_VAE.pth` / `Wan2.2_VAE.pth` load with `strict=True`. This module knows nothing of
files, devices or the DiT: it maps pixels to normalised latents and back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class CausalCache:
    """What one encode or decode call carries from a chunk to the next.

    `frames` holds, per causal layer, the trailing input frames that layer saw so far; `first_chunk` is
    True while the first chunk runs (temporal up/downsampling is skipped on it, as in the official code).
    Made fresh for each call and dropped at its end, so nothing survives between calls.
    """

    first_chunk: bool = True
    frames: dict[nn.Module, Tensor] = field(default_factory=dict)


def _remember_trailing_frames(cache: CausalCache, layer: nn.Module, past: Tensor | None, x: Tensor,
                              n: int) -> None:
    """Store the last `n` frames of the stream `past ++ x` as `layer`'s cached frames.

    Once the cache holds `n` frames it is updated in place (shifted, then overwritten), so a chunk of one
    frame, as the decoder's per-frame stages see, allocates nothing here; a new tensor is made only while
    the cache is filling up. Call it after `past` has been read: it may change `past`.
    """
    t = x.shape[2]
    if past is None or past.shape[2] < n:
        frames = x[:, :, -n:] if past is None else torch.cat([past, x], dim=2)[:, :, -n:]
        cache.frames[layer] = frames.clone()  # a copy: a view would keep the whole chunk alive
        return
    for i in range(n - t):  # front to back: each frame is read before it is overwritten
        past[:, :, i] = past[:, :, i + t]
    past[:, :, max(n - t, 0) :] = x[:, :, -n:]


def frames_as_batch(x: Tensor) -> Tensor:
    """[B, C, T, H, W] -> [B·T, C, H, W], kept in x's layout: for channels-last x, a view with the strides
    of a channels-last 2-D tensor (a plain transpose and flatten leaves the batch stride of a one-frame
    tensor odd, and then convolutions and upsampling no longer see channels-last memory)."""
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last_3d):
        return x.transpose(1, 2).flatten(0, 1)
    return x.permute(0, 2, 3, 4, 1).flatten(0, 1).permute(0, 3, 1, 2)


class CausalConv3d(nn.Conv3d):
    """Conv3d that only looks back in time.

    `padding=(pt, ph, pw)` pads height and width symmetrically but time only in front, by 2·pt frames: the
    cached frames of the previous chunk when there are any, zeros for whatever is missing.

    With `fold_time` (set by `fold_time_into_channels`), a call that makes one output frame, as every call
    of the decoder's per-frame stages does, runs as a 2-D conv over the input frames folded into channels:
    the same sums, and cuDNN's 2-D kernels instead of its 3-D ones. Channel-major frames fold as a view of
    the padded input (channel c·kt + j is frame j of channel c); channels-last frames, as the decoder's tail
    keeps them then, fold into [B, H, W, kt·C] (channel j·C + c), cuDNN's own layout: no transposes.

    A conv that narrows the width (the heads: 96 channels to 3 in the 2.1 decoder) carries its *outputs*
    instead of its inputs from chunk to chunk: each input frame is convolved once with every temporal tap,
    and the taps that belong to later output frames wait in the cache as float32 partial sums. The same sums,
    kt - 1 frames of `out_channels` cached instead of 2·pt frames of `in_channels` (for the 2.1 decoder's
    head, 22 MB instead of 354 MB at 720p), and no padded copy of the input.
    """

    fold_time = False

    def __init__(self, in_dim: int, out_dim: int, kernel_size, stride=1, padding=0) -> None:
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        # Spatial zero padding is left to the conv itself: same values as an explicit pad, one copy fewer.
        super().__init__(in_dim, out_dim, kernel_size, stride=stride, padding=(0, ph, pw))
        self.time_pad = 2 * pt

    @property
    def caches_outputs(self) -> bool:
        """Whether chunks carry partial outputs rather than inputs (see the class): when that is smaller."""
        kt = self.kernel_size[0]
        return (self.out_channels < self.in_channels and self.stride[0] == 1 and kt > 1
                and self.time_pad == kt - 1)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        if cache is not None and self.caches_outputs:
            return self._forward_with_partial_sums(x, cache)
        past = None if cache is None or not self.time_pad else cache.frames.get(self)
        one_frame = self.fold_time and self.time_pad + x.shape[2] == self.kernel_size[0]
        padded = self._folded(past, x) if one_frame else self._padded(past, x)
        if cache is not None and self.time_pad:  # after `past` was copied into `padded`: this may change it
            _remember_trailing_frames(cache, self, past, x, self.time_pad)
        if one_frame:
            weight = self._folded_weight(channels_last=not x.is_contiguous())
            return F.conv2d(padded, weight, self.bias, self.stride[1:], self.padding[1:]).unsqueeze(2)
        return super().forward(padded)

    def _padded(self, past: Tensor | None, x: Tensor) -> Tensor:
        """[B, C, time_pad + T, H, W]: zeros for the frames the cache lacks, the cached ones, then `x`."""
        if not self.time_pad:
            return x
        missing = self.time_pad - (0 if past is None else past.shape[2])
        front = [x.new_zeros(*x.shape[:2], missing, *x.shape[3:])] if missing else []
        return torch.cat([*front, *([] if past is None else [past]), x], dim=2)

    def _folded(self, past: Tensor | None, x: Tensor) -> Tensor:
        """The kt input frames of one output frame as the channels of one 2-D input [B, kt·C, H, W]."""
        b, c, _, h, w = x.shape
        kt = self.kernel_size[0]
        if kt == 1:
            return x[:, :, 0]
        if x.is_contiguous():  # channel-major: a view of the padded frames
            return self._padded(past, x).view(b, c * kt, h, w)
        stacked = x.new_empty(b, h, w, kt, c)  # channels last: [B, H, W, kt, C], frame-major channels
        missing = self.time_pad - (0 if past is None else past.shape[2])
        stacked[:, :, :, :missing] = 0
        if past is not None:
            stacked[:, :, :, missing : self.time_pad] = past.permute(0, 3, 4, 2, 1)
        stacked[:, :, :, self.time_pad :] = x.permute(0, 3, 4, 2, 1)
        return stacked.view(b, h, w, kt * c).permute(0, 3, 1, 2)

    def _folded_weight(self, channels_last: bool) -> Tensor:
        """The weight [O, C, kt, kh, kw] for `_folded` inputs: [O, C·kt, kh, kw], or [O, kt·C, kh, kw]."""
        o, c, kt, kh, kw = self.weight.shape
        if not channels_last:
            return self.weight.view(o, c * kt, kh, kw)
        return self.weight.transpose(1, 2).reshape(o, kt * c, kh, kw).contiguous(
            memory_format=torch.channels_last)

    def _forward_with_partial_sums(self, x: Tensor, cache: CausalCache) -> Tensor:
        b, _, t = x.shape[:3]
        kt, width = self.kernel_size[0], self.out_channels
        taps = self.weight.movedim(2, 0).flatten(0, 1)  # [kt·O, C, kh, kw]: tap j is rows j·O ... (j+1)·O
        y = F.conv2d(frames_as_batch(x), taps, None, self.stride[1:], self.padding[1:])
        y = y.unflatten(0, (b, t)).unflatten(2, (kt, width))  # [B, T, kt, O, H', W']
        # Output frame t0 + k (t0: this chunk's first) is sums[:, :, k]; input frame t0 + i reaches it through
        # tap j when k = i + kt - 1 - j. The first kt - 1 start from what earlier chunks contributed.
        sums = y.new_zeros(b, width, t + kt - 1, *y.shape[4:],
                           dtype=torch.promote_types(y.dtype, torch.float32))  # bf16 taps, float32 sums
        pending = cache.frames.get(self)
        if pending is not None:
            sums[:, :, : kt - 1] = pending
        for j in range(kt):
            sums[:, :, kt - 1 - j : kt - 1 - j + t] += y[:, :, j].transpose(1, 2)
        if pending is None:
            cache.frames[self] = sums[:, :, t:].clone()
        else:
            pending.copy_(sums[:, :, t:])
        out = sums[:, :, :t] if self.bias is None else sums[:, :, :t] + self.bias.float()[:, None, None, None]
        layout = torch.contiguous_format if x.is_contiguous() else torch.channels_last_3d  # as it came
        return out.to(x.dtype, memory_format=layout)  # [B, O, T, H', W']


def _rms_norm(x: Tensor, gamma: Tensor, silu: bool) -> Tensor:
    x = F.normalize(x, dim=1) * x.shape[1] ** 0.5 * gamma
    return F.silu(x) if silu else x


@functools.cache
def _compiled_rms_norm() -> Callable[[Tensor, Tensor, bool], Tensor]:
    """One compiled function for every RMSNorm (see `compile_norms`), with dynamic shapes; made on first use,
    so that importing the models does not import the compiler."""
    return torch.compile(_rms_norm, dynamic=True)


class RMSNorm(nn.Module):
    """The VAE's RMS norm: L2-normalise over channels (dim 1), times sqrt(C) and a per-channel gain."""

    compiled = False  # set by `compile_norms`

    def __init__(self, dim: int, spatial_dims: int = 3) -> None:
        super().__init__()
        # [C, 1, 1, 1] for [B, C, T, H, W] tensors, [C, 1, 1] for the per-frame [B·T, C, H, W] of attention.
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * spatial_dims))

    def forward(self, x: Tensor, silu: bool = False) -> Tensor:
        """The norm, followed by SiLU when `silu` (one op for `compile_norms` to fuse into one kernel)."""
        if self.compiled:
            # The gain as a plain tensor: a Parameter's shape would be a guard, one graph per width, and
            # torch.compile stops recompiling (falls back to eager) after 8. Inference only. A decode with
            # time folded into channels needs more graphs (4-D and 5-D, channel-major and channels-last), so
            # its last norms run eager; compiling them all, one layout per function, measured slower (2.1 at
            # 720p on an H200: 3.40 s against 3.15 s; docs/benchmarks.md).
            return _compiled_rms_norm()(x, self.gamma.detach(), silu)
        return _rms_norm(x, self.gamma, silu)


class Upsample2x(nn.Module):
    """Nearest-exact ×2 spatial upsampling of [N, C, H, W].

    The official code upcasts to float32 first; nearest-neighbour only copies values, so the result is the
    same in the input's dtype, without a 4x-size float32 copy at the decoder's largest resolution.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


class Resample(nn.Module):
    """×2 spatial down/upsampling of each frame, optionally with ×2 temporal down/upsampling.

    downsample: pad right/bottom by one, 3×3 conv with stride 2; the 3-D variant then convolves in time
    with stride 2 over [last frame of the previous chunk, this chunk]. upsample: the 3-D variant first
    doubles the frames with a causal conv to 2C channels whose halves become the even and odd frames; then
    nearest ×2 and a 3×3 conv to `out_dim` channels (2.1 halves the width here, 2.2 keeps it). On the first
    chunk the temporal part is skipped, so one frame stays one frame.
    """

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, dim: int, mode: str, out_dim: int | None = None) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown resample mode {mode!r}; accepted: {self.MODES}")
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, out_dim or dim, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        if self.mode == "upsample3d" and not cache.first_chunk:
            x = self.time_conv(x, cache)  # [B, 2C, T, H, W]
            b, c2, t, h, w = x.shape
            # Channel half 0 → frame 2t, half 1 → frame 2t+1.
            x = x.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        b, t = x.shape[0], x.shape[2]
        frames = frames_as_batch(x)  # [B·T, C, H, W]
        out = None
        # One frame at a time, into one output: upsampled frames are the decoder's largest activations, and
        # a whole chunk of them at once (4 frames, with its conv's workspace) was the peak of a 720p decode.
        for i in range(b * t):
            y = frames[i : i + 1]
            for layer in self.resample:
                y = layer(y)
            if out is None:
                layout = torch.contiguous_format if y.is_contiguous() else torch.channels_last  # as it came
                out = torch.empty(b * t, *y.shape[1:], dtype=y.dtype, device=y.device, memory_format=layout)
            out[i : i + 1] = y
        x = out.unflatten(0, (b, t)).transpose(1, 2)  # [B, C', T, H', W']
        if self.mode == "downsample3d":
            past = cache.frames.get(self)
            cache.frames[self] = x[:, :, -1:].clone()
            if past is not None:
                x = self.time_conv(torch.cat([past, x], dim=2))  # [B, C, T/2, H, W]
        return x


class ResidualBlock(nn.Module):
    """(RMSNorm, SiLU, causal 3×3×3 conv) twice, plus a 1×1×1 conv shortcut when the width changes."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        norm1, _, conv1, norm2, _, dropout, conv2 = self.residual  # the official layout; SiLUs fused below
        # Step by step, rebinding h: each activation is freed as soon as the next exists (a nested call
        # would keep the first conv's output alive through the second conv: +1 tensor at the memory peak).
        h = norm1(x, silu=True)
        h = conv1(h, cache)
        h = dropout(norm2(h, silu=True))
        h = conv2(h, cache)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the h·w positions of each frame (no attention across time)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        # `cache` is unused (nothing here looks across frames); taken so every block has one signature.
        b, c, t, h, w = x.shape
        y = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))  # [B·T, C, H, W]
        qkv = self.to_qkv(y).view(b * t, 1, 3 * c, h * w).transpose(2, 3).contiguous()  # [B·T, 1, HW, 3C]
        y = F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))  # [B·T, 1, HW, C]
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        # Sum in the official operand order: the result's memory layout (and so later reductions) follows it.
        return y.view(b, t, c, h, w).transpose(1, 2) + x


def res_blocks(in_dim: int, out_dim: int, n: int, dropout: float) -> list[nn.Module]:
    """`n` residual blocks taking the width from `in_dim` to `out_dim` (the first block changes it)."""
    return [ResidualBlock(in_dim if j == 0 else out_dim, out_dim, dropout) for j in range(n)]


def _middle(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        ResidualBlock(dim, dim, dropout), AttentionBlock(dim), ResidualBlock(dim, dim, dropout)
    )


def _head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))


def _apply_head(head: nn.Sequential, x: Tensor, cache: CausalCache) -> Tensor:
    norm, _, conv = head
    return conv(norm(x, silu=True), cache)


class Encoder3d(nn.Module):
    """conv1 → down path → middle (res, attention, res) → head. The down path is built by the VAE version."""

    def __init__(self, in_dim: int, dims: Sequence[int], out_dim: int, downsamples: list[nn.Module],
                 dropout: float) -> None:
        super().__init__()
        self.conv1 = CausalConv3d(in_dim, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*downsamples)
        self.middle = _middle(dims[-1], dropout)
        self.head = _head(dims[-1], out_dim)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = self.conv1(x, cache)
        for block in (*self.downsamples, *self.middle):
            x = block(x, cache)
        return _apply_head(self.head, x, cache)


class Decoder3d(nn.Module):
    """conv1 → middle (res, attention, res) → up path → head. The up path is built by the VAE version."""

    def __init__(self, in_dim: int, dims: Sequence[int], out_dim: int, upsamples: list[nn.Module],
                 dropout: float) -> None:
        super().__init__()
        self.conv1 = CausalConv3d(in_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0], dropout)
        self.upsamples = nn.Sequential(*upsamples)
        self.head = _head(dims[-1], out_dim)
        # Blocks from here on double no frames: they run one frame at a time (see forward).
        temporal = [i for i, block in enumerate(upsamples)
                    if any(isinstance(m, Resample) and m.mode == "upsample3d" for m in block.modules())]
        self.per_frame_from = temporal[-1] + 1 if temporal else 0
        self.channels_last_tail = False  # set by `fold_time_into_channels`

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = self.conv1(x, cache)
        for block in (*self.middle, *self.upsamples[: self.per_frame_from]):
            x = block(x, cache)
        # After the last temporal upsampling every layer is causal frame by frame, so a chunk's frames can go
        # through the highest-resolution stages one at a time with the same result (the cache carries the
        # past frames either way) and a quarter of the activations: the decoder's memory peak.
        return torch.cat([self._tail(frame, cache) for frame in x.split(1, dim=2)], dim=2)

    def _tail(self, x: Tensor, cache: CausalCache) -> Tensor:
        if self.channels_last_tail:
            x = x.contiguous(memory_format=torch.channels_last_3d)  # [B, C, 1, H, W] kept as [B, 1, H, W, C]
        for block in self.upsamples[self.per_frame_from:]:
            x = block(x, cache)
        return _apply_head(self.head, x, cache)


def pixels_to_uint8(video: Tensor) -> Tensor:
    """Pixels [..., 3, F, H, W] in [-1, 1] → frames [..., F, H, W, 3] uint8, truncating like the official
    writer (computed in float32, whatever the input's dtype)."""
    pixels = (video.float().clamp(-1, 1) + 1) / 2 * 255
    return pixels.movedim(-4, -1).to(torch.uint8)


def check_architecture(dim_mult: Sequence[int], temperal_downsample: Sequence[bool],
                       attn_scales: Sequence[float]) -> None:
    """Reject configs the chunked causal processing cannot serve.

    The temporal stride must be exactly 4 (chunks of 1, 4, 4, ... frames give one latent frame each).
    Attention inside the down/up paths (`attn_scales`) is rejected: the official forward cannot run it (its
    blocks get cache arguments they do not take), no released checkpoint has it, and diffusers' decoder
    lacks it.
    """
    if len(attn_scales):
        raise ValueError(f"attn_scales must be empty (attention only in the middle blocks), "
                         f"got {list(attn_scales)}")
    if len(temperal_downsample) != len(dim_mult) - 1:
        raise ValueError(f"temperal_downsample needs one flag per downsampling stage ({len(dim_mult) - 1}), "
                         f"got {list(temperal_downsample)}")
    if sum(map(bool, temperal_downsample)) != 2:
        raise ValueError("exactly two stages must downsample time (temporal stride 4, frames 4n+1), got "
                         f"temperal_downsample={list(temperal_downsample)}")


class WanVAE(nn.Module):
    """The chunked encode/decode shared by both versions; subclasses build `encoder` and `decoder`.

    Holds `encoder`, `conv1` (2z → 2z, gives μ and log σ²), `conv2` (z → z, before the decoder) and
    `decoder`, in the official order. The latent statistics are plain float tuples, not state: normalisation
    is computed in float32 on the input's device, whatever the weights' dtype.
    """

    version: str
    patch_size: int = 1  # pixels folded into channels before the encoder (2.2: 2)

    def __init__(self, encoder: Encoder3d, decoder: Decoder3d, z_dim: int, num_stages: int,
                 latents_mean: Sequence[float], latents_std: Sequence[float]) -> None:
        super().__init__()
        for name, values in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            if len(values) != z_dim:
                raise ValueError(f"{name} needs z_dim={z_dim} values, got {len(values)}")
        self.z_dim = z_dim
        self.spatial_stride = 2 ** (num_stages - 1) * self.patch_size
        self.latents_mean = tuple(float(v) for v in latents_mean)
        self.latents_std = tuple(float(v) for v in latents_std)
        self.encoder = encoder
        self.conv1 = CausalConv3d(2 * z_dim, 2 * z_dim, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = decoder

    @property
    def stride(self) -> tuple[int, int, int]:
        """(time, height, width) compression: latent frames = (F - 1) / 4 + 1, latent size = H / s, W / s."""
        return (4, self.spatial_stride, self.spatial_stride)

    def pack(self, x: Tensor) -> Tensor:
        """Pixels [B, 3, T, H, W] → encoder input (identity here; 2.2 folds 2×2 pixels into channels)."""
        return x

    def unpack(self, x: Tensor) -> Tensor:
        """Decoder output → pixels [B, 3, T, H, W]."""
        return x

    def _stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        mean = torch.tensor(self.latents_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
        std = torch.tensor(self.latents_std, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
        return mean, std

    def encode(self, video: Tensor) -> Tensor:
        """[B, 3, F, H, W] in [-1, 1], F = 4n+1 → normalised posterior mean [B, z, n+1, H/s, W/s], float32."""
        self._check_video(video)
        x = video.to(self.conv1.weight.dtype)
        chunks = [x[:, :, :1], *x[:, :, 1:].split(4, dim=2)] if x.shape[2] > 1 else [x]  # [1], [4], ...
        cache = CausalCache()
        out = None
        for i, chunk in enumerate(chunks):
            h = self.encoder(self.pack(chunk), cache)  # [B, 2z, 1, h, w]
            if out is None:
                out = h.new_empty(h.shape[0], h.shape[1], len(chunks), *h.shape[3:])
            out[:, :, i : i + 1] = h
            cache.first_chunk = False
        mu = self.conv1(out)[:, : self.z_dim]  # log σ² is not used: encoding is deterministic
        mean, std = self._stats(mu.device)
        return (mu.float() - mean) * (1.0 / std)  # the official formula: times the reciprocal std

    def decode(self, latent: Tensor) -> Tensor:
        """Normalised latent [B, z, T, h, w] → video [B, 3, 4(T-1)+1, h·s, w·s] in [-1, 1] (float32)."""
        video = None
        for start, frames in self._decoded_chunks(latent):  # frames [B, 3, 1 or 4, H, W]
            if video is None:
                video = frames.new_empty(*frames.shape[:2], self._num_frames(latent), *frames.shape[3:],
                                         dtype=torch.float32)
            video[:, :, start : start + frames.shape[2]] = frames
        return video

    def decode_uint8(self, latent: Tensor) -> Tensor:
        """Normalised latent [B, z, T, h, w] → frames [B, 4(T-1)+1, H, W, 3] uint8, on the latent's device.

        The same video as `decode`, converted chunk by chunk, so the float32 video never exists: a quarter
        of the output memory, and of what a copy to the host moves.
        """
        video = None
        for start, frames in self._decoded_chunks(latent):
            frames = pixels_to_uint8(frames)  # [B, 1 or 4, H, W, 3]
            if video is None:
                video = frames.new_empty(frames.shape[0], self._num_frames(latent), *frames.shape[2:])
            video[:, start : start + frames.shape[1]] = frames
        return video

    def _num_frames(self, latent: Tensor) -> int:
        return 4 * (latent.shape[2] - 1) + 1

    def _decoded_chunks(self, latent: Tensor) -> Iterator[tuple[int, Tensor]]:
        """(first frame index, pixels [B, 3, 1 or 4, H, W] clamped to [-1, 1]) for each latent frame."""
        self._check_latent(latent)
        mean, std = self._stats(latent.device)
        z = latent.float() / (1.0 / std) + mean
        x = self.conv2(z.to(self.conv2.weight.dtype))  # [B, z, T, h, w]
        cache = CausalCache()
        start = 0
        for i in range(x.shape[2]):
            # Only this chunk's frames (1, then 4) and the cache's trailing frames are alive here.
            frames = self.unpack(self.decoder(x[:, :, i : i + 1], cache)).clamp(-1, 1)
            yield start, frames
            start += frames.shape[2]
            cache.first_chunk = False

    def _check_video(self, video: Tensor) -> None:
        name = f"VAE {self.version} encode"
        if not isinstance(video, Tensor) or video.dim() != 5 or video.shape[1] != 3:
            shape = tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__
            raise ValueError(f"{name} expects a video tensor [B, 3, F, H, W], got {shape}")
        if not video.is_floating_point():
            raise ValueError(f"{name} expects floating-point pixels in [-1, 1], got {video.dtype}")
        frames, height, width = video.shape[2:]
        if frames % 4 != 1:
            raise ValueError(f"{name} needs 4n+1 frames (1, 5, 9, ..., 81, ...), got {frames}")
        s = self.spatial_stride
        if height % s or width % s:
            raise ValueError(f"{name} needs height and width divisible by {s}, got {height}x{width}")

    def _check_latent(self, latent: Tensor) -> None:
        z = self.z_dim
        if not isinstance(latent, Tensor) or latent.dim() != 5 or latent.shape[1] != z or 0 in latent.shape:
            shape = tuple(latent.shape) if isinstance(latent, Tensor) else type(latent).__name__
            raise ValueError(f"VAE {self.version} decode expects a latent [B, {z}, T, h, w] with T >= 1, "
                             f"got {shape}")


def compile_norms(vae: WanVAE) -> WanVAE:
    """`torch.compile` every RMSNorm (with its SiLU), for inference: one kernel instead of five memory-bound
    passes over the decoder's largest activations. Up to 8 graphs with dynamic shapes (torch.compile's
    recompilation limit) serve the norms; those of other ranks and layouts run eager (see `RMSNorm`)."""
    for module in vae.modules():
        if isinstance(module, RMSNorm):
            module.compiled = True
    return vae


def fold_time_into_channels(vae: WanVAE) -> WanVAE:
    """Run each causal conv that makes one output frame as a 2-D conv (see `CausalConv3d`), on channels-last
    frames in the decoder's per-frame stages, where every conv makes one frame: cuDNN's 2-D kernels in their
    own layout, with no transposes around each conv (on an H200 those took 18 % of a 720p decode). Same
    values."""
    for module in vae.modules():
        if isinstance(module, CausalConv3d):
            module.fold_time = True
        elif isinstance(module, Decoder3d):
            module.channels_last_tail = True
    return vae


def official_stats_or(given: Sequence[float] | None, official: Sequence[float], z_dim: int,
                      name: str) -> Sequence[float]:
    """The official latent table when none is given and z_dim matches it; otherwise one must be given."""
    if given is not None:
        return given
    if z_dim != len(official):
        raise ValueError(f"z_dim={z_dim} has no built-in {name}; pass {name} with {z_dim} values")
    return official

"""The Wan 2.2 VAE (z_dim 48, stride 4×16×16), used by TI2V-5B.

Differences from 2.1 (spec §7.4): pixels are folded 2×2 into 12 channels before the encoder and unfolded after
the decoder; each stage is one residual down/up block (`encoder.downsamples.{s}.downsamples.{j}`) with a
parameter-free shortcut around the whole stage (AvgDown3D / DupUp3D); upsamples keep the width; the decoder
has its own base width (`dec_dim`). Weights: `Wan2.2_VAE.pth` (196 keys, 704.7 M parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .vae_blocks import (
    CausalCache,
    Decoder3d,
    Encoder3d,
    Resample,
    WanVAE,
    check_architecture,
    official_stats_or,
    res_blocks,
)

# Per-channel statistics of the official latents (hard-coded in the official `Wan2_2_VAE`).
LATENTS_MEAN_22 = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
LATENTS_STD_22 = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip

PATCH = 2


def patchify(x: Tensor) -> Tensor:
    """[B, C, T, H, W] → [B, 4C, T, H/2, W/2]; channel c·4 + 2·(column offset) + (row offset)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // PATCH, PATCH, w // PATCH, PATCH)  # [B, C, T, h, row, w, col]
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * PATCH * PATCH, t, h // PATCH, w // PATCH)


def unpatchify(x: Tensor) -> Tensor:
    """Inverse of `patchify`."""
    b, c4, t, h, w = x.shape
    x = x.reshape(b, c4 // (PATCH * PATCH), PATCH, PATCH, t, h, w)  # [B, C, col, row, T, h, w]
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c4 // (PATCH * PATCH), t, h * PATCH, w * PATCH)


class AvgDown3D(nn.Module):
    """Parameter-free downsampling shortcut: fold (factor_t, factor_s, factor_s) blocks into channels, then
    average consecutive groups of channels down to `out_dim`. Time is zero-padded in front to a multiple of
    factor_t, so a 1-frame first chunk gives one frame."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        folded = in_dim * factor_t * factor_s * factor_s
        if folded % out_dim:
            raise ValueError(f"AvgDown3D: {in_dim} channels × {factor_t}·{factor_s}² "
                             f"cannot be averaged into {out_dim}")
        self.group = folded // out_dim

    def forward(self, x: Tensor) -> Tensor:
        ft, fs = self.factor_t, self.factor_s
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.out_dim, self.group, t // ft, h // fs, w // fs)  # [B, out, group, T', H', W']
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free upsampling shortcut: repeat each channel, then unfold channels into (factor_t,
    factor_s, factor_s) blocks. On the first chunk the first factor_t - 1 frames are dropped, so one frame
    stays one frame."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        unfolded = out_dim * factor_t * factor_s * factor_s
        if unfolded % in_dim:
            raise ValueError(f"DupUp3D: {in_dim} channels cannot be repeated into "
                             f"{out_dim} × {factor_t}·{factor_s}²")
        self.repeats = unfolded // in_dim

    def forward(self, x: Tensor, first_chunk: bool) -> Tensor:
        ft, fs = self.factor_t, self.factor_s
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1).view(b, self.out_dim, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1 :] if first_chunk else x


class ResidualDownBlock(nn.Module):
    """One encoder stage: residual blocks and an optional downsample, plus AvgDown3D around the whole stage
    (an identity shortcut when the stage does not downsample)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, down: bool, temporal: bool,
                 dropout: float) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, factor_t=2 if temporal else 1,
                                      factor_s=2 if down else 1)
        blocks = res_blocks(in_dim, out_dim, num_res_blocks, dropout)
        if down:
            blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        h = x
        for block in self.downsamples:
            h = block(h, cache)
        return h + self.avg_shortcut(x)


class ResidualUpBlock(nn.Module):
    """One decoder stage: residual blocks and an optional width-keeping upsample, plus DupUp3D around the
    whole stage when it upsamples (no shortcut otherwise)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, up: bool, temporal: bool,
                 dropout: float) -> None:
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        blocks = res_blocks(in_dim, out_dim, num_res_blocks, dropout)
        if up:
            blocks.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        h = x
        for block in self.upsamples:
            h = block(h, cache)
        if self.avg_shortcut is not None:
            h = h + self.avg_shortcut(x, first_chunk=cache.first_chunk)
        return h


class WanVAE22(WanVAE):
    """Wan 2.2 VAE. Arguments are the official `WanVAE_` fields; the defaults are the released model's.

    `latents_mean` / `latents_std` default to the official tables (z_dim 48 only); other z_dims pass them.
    """

    version = "2.2"
    patch_size = PATCH

    def __init__(
        self,
        dim: int = 160,
        dec_dim: int = 256,
        z_dim: int = 48,
        dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_scales: Sequence[float] = (),
        temperal_downsample: Sequence[bool] = (False, True, True),
        dropout: float = 0.0,
        latents_mean: Sequence[float] | None = None,
        latents_std: Sequence[float] | None = None,
    ) -> None:
        check_architecture(dim_mult, temperal_downsample, attn_scales)
        enc_dims = [dim * m for m in (1, *dim_mult)]
        dec_dims = [dec_dim * m for m in (dim_mult[-1], *dim_mult[::-1])]
        up_temporal = list(temperal_downsample)[::-1]
        last = len(dim_mult) - 1  # the last stage neither down- nor upsamples
        down = [ResidualDownBlock(enc_dims[i], enc_dims[i + 1], num_res_blocks, down=i < last,
                                  temporal=i < last and temperal_downsample[i], dropout=dropout)
                for i in range(len(dim_mult))]
        up = [ResidualUpBlock(dec_dims[i], dec_dims[i + 1], num_res_blocks + 1, up=i < last,
                              temporal=i < last and up_temporal[i], dropout=dropout)
              for i in range(len(dim_mult))]
        super().__init__(
            encoder=Encoder3d(3 * PATCH * PATCH, enc_dims, 2 * z_dim, down, dropout),
            decoder=Decoder3d(z_dim, dec_dims, 3 * PATCH * PATCH, up, dropout),
            z_dim=z_dim,
            num_stages=len(dim_mult),
            latents_mean=official_stats_or(latents_mean, LATENTS_MEAN_22, z_dim, "latents_mean"),
            latents_std=official_stats_or(latents_std, LATENTS_STD_22, z_dim, "latents_std"),
        )

    def pack(self, x: Tensor) -> Tensor:
        return patchify(x)

    def unpack(self, x: Tensor) -> Tensor:
        return unpatchify(x)

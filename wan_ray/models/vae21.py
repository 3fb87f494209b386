"""The Wan 2.1 VAE (z_dim 16, stride 4×8×8), used by T2V-A14B and I2V-A14B.

Flat down and up paths of residual blocks and resamples (`encoder.downsamples.{k}`, `decoder.upsamples.{k}`);
each decoder upsample halves the width. Weights: `Wan2.1_VAE.pth` (194 keys, 126.9 M parameters). Spec §7.3.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import nn

from .vae_blocks import (
    Decoder3d,
    Encoder3d,
    Resample,
    WanVAE,
    check_architecture,
    official_stats_or,
    res_blocks,
)

# Per-channel statistics of the official latents (hard-coded in the official `Wan2_1_VAE`).
LATENTS_MEAN_21 = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENTS_STD_21 = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


def _down_path(dims: Sequence[int], num_res_blocks: int, temporal: Sequence[bool],
               dropout: float) -> list[nn.Module]:
    """Per stage: residual blocks, then a downsample (all stages but the last)."""
    blocks: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        blocks += res_blocks(d_in, d_out, num_res_blocks, dropout)
        if i < len(temporal):
            blocks.append(Resample(d_out, "downsample3d" if temporal[i] else "downsample2d"))
    return blocks


def _up_path(dims: Sequence[int], num_res_blocks: int, temporal: Sequence[bool],
             dropout: float) -> list[nn.Module]:
    """Per stage: one residual block more than the encoder, then an upsample (all stages but the last)
    whose 2-D conv halves the width; so every stage after the first starts at half the width it got."""
    blocks: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        d_in = d_in // 2 if i > 0 else d_in
        blocks += res_blocks(d_in, d_out, num_res_blocks + 1, dropout)
        if i < len(temporal):
            mode = "upsample3d" if temporal[i] else "upsample2d"
            blocks.append(Resample(d_out, mode, out_dim=d_out // 2))
    return blocks


class WanVAE21(WanVAE):
    """Wan 2.1 VAE. Arguments are the official `WanVAE_` fields; the defaults are the released model's.

    `latents_mean` / `latents_std` default to the official tables (z_dim 16 only); other z_dims pass them.
    """

    version = "2.1"

    def __init__(
        self,
        dim: int = 96,
        z_dim: int = 16,
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
        dec_dims = [dim * m for m in (dim_mult[-1], *dim_mult[::-1])]
        down = _down_path(enc_dims, num_res_blocks, temperal_downsample, dropout)
        up = _up_path(dec_dims, num_res_blocks, list(temperal_downsample)[::-1], dropout)
        super().__init__(
            encoder=Encoder3d(3, enc_dims, 2 * z_dim, down, dropout),
            decoder=Decoder3d(z_dim, dec_dims, 3, up, dropout),
            z_dim=z_dim,
            num_stages=len(dim_mult),
            latents_mean=official_stats_or(latents_mean, LATENTS_MEAN_21, z_dim, "latents_mean"),
            latents_std=official_stats_or(latents_std, LATENTS_STD_21, z_dim, "latents_std"),
        )

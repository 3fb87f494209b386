"""The Wan VAEs (2.1 and 2.2) and their mapping to the diffusers `AutoencoderKLWan` layout.

`WanVAE21` / `WanVAE22` use the official checkpoint layout (`Wan2.1_VAE.pth`, `Wan2.2_VAE.pth`). The
`*-Diffusers` releases store the same tensors under other names; the tables below rename them both ways,
and `vae_config_from_diffusers` maps a diffusers `config.json` onto our constructors. Nothing here reads
files: the checkpoint loader does that.

Renaming, official → diffusers (R = num_res_blocks; s = stage, j = index within it):

    conv1, conv2                          → quant_conv, post_quant_conv
    {en,de}coder.conv1                    → {en,de}coder.conv_in
    {en,de}coder.head.0, head.2           → {en,de}coder.norm_out, conv_out
    {en,de}coder.middle.0, 1, 2           → {en,de}coder.mid_block.resnets.0, attentions.0, resnets.1
    2.1 encoder.downsamples.k             → encoder.down_blocks.k                 (both flat lists)
    2.1 decoder.upsamples.[s·(R+2) + j]   → decoder.up_blocks.s.resnets.j (j ≤ R), .upsamplers.0 (j = R+1)
    2.2 encoder.downsamples.s.downsamples.j → encoder.down_blocks.s.resnets.j (j < R), .downsampler (j = R)
    2.2 decoder.upsamples.s.upsamples.j   → decoder.up_blocks.s.resnets.j (j ≤ R), .upsampler (j = R+1)
    in residual blocks: residual.0, .2, .3, .6, shortcut → norm1, conv1, norm2, conv2, conv_shortcut

Attention (`norm`, `to_qkv`, `proj`) and resample (`resample.1`, `time_conv`) names are the same in both.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from torch import Tensor

from .vae21 import LATENTS_MEAN_21, LATENTS_STD_21, WanVAE21
from .vae22 import LATENTS_MEAN_22, LATENTS_STD_22, WanVAE22
from .vae_blocks import CausalCache, WanVAE, compile_norms, fold_time_into_channels, pixels_to_uint8

__all__ = [
    "LATENTS_MEAN_21",
    "LATENTS_MEAN_22",
    "LATENTS_STD_21",
    "LATENTS_STD_22",
    "VAE_CLASSES",
    "CausalCache",
    "WanVAE",
    "WanVAE21",
    "WanVAE22",
    "build_vae",
    "compile_norms",
    "fold_time_into_channels",
    "pixels_to_uint8",
    "vae_config_from_diffusers",
    "vae_state_dict_from_diffusers",
    "vae_state_dict_to_diffusers",
]

VAE_CLASSES: dict[str, type[WanVAE]] = {"2.1": WanVAE21, "2.2": WanVAE22}


def build_vae(version: str, **config: Any) -> WanVAE:
    """`WanVAE21(**config)` or `WanVAE22(**config)` by version string ("2.1" / "2.2")."""
    if version not in VAE_CLASSES:
        raise ValueError(f"unknown VAE version {version!r}; accepted: {sorted(VAE_CLASSES)}")
    return VAE_CLASSES[version](**config)


# --- state-dict key mapping ---

_TOP = {  # whole module paths renamed as they are
    "conv1": "quant_conv",
    "conv2": "post_quant_conv",
    "encoder.conv1": "encoder.conv_in",
    "decoder.conv1": "decoder.conv_in",
    "encoder.head.0": "encoder.norm_out",
    "encoder.head.2": "encoder.conv_out",
    "decoder.head.0": "decoder.norm_out",
    "decoder.head.2": "decoder.conv_out",
}
_MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
_IN_BLOCK = {  # inside a residual block; other block-internal names are shared
    "residual.0": "norm1",
    "residual.2": "conv1",
    "residual.3": "norm2",
    "residual.6": "conv2",
    "shortcut": "conv_shortcut",
}


_TOP_INV, _MIDDLE_INV, _IN_BLOCK_INV = ({v: k for k, v in t.items()} for t in (_TOP, _MIDDLE, _IN_BLOCK))


def _to_diffusers_path(path: str, residual: bool, r: int) -> str | None:
    """Official module path → diffusers module path, or None when the path is not a VAE module."""
    if path in _TOP:
        return _TOP[path]
    if m := re.fullmatch(r"(encoder|decoder)\.middle\.([012])\.(.+)", path):
        return f"{m[1]}.mid_block.{_MIDDLE[m[2]]}.{_IN_BLOCK.get(m[3], m[3])}"
    if residual:
        if m := re.fullmatch(r"encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.(.+)", path):
            s, j, inner = int(m[1]), int(m[2]), m[3]
            return f"encoder.down_blocks.{s}.downsampler.{inner}" if j == r else (
                f"encoder.down_blocks.{s}.resnets.{j}.{_IN_BLOCK.get(inner, inner)}")
        if m := re.fullmatch(r"decoder\.upsamples\.(\d+)\.upsamples\.(\d+)\.(.+)", path):
            s, j, inner = int(m[1]), int(m[2]), m[3]
            return f"decoder.up_blocks.{s}.upsampler.{inner}" if j == r + 1 else (
                f"decoder.up_blocks.{s}.resnets.{j}.{_IN_BLOCK.get(inner, inner)}")
    else:
        if m := re.fullmatch(r"encoder\.downsamples\.(\d+)\.(.+)", path):
            return f"encoder.down_blocks.{m[1]}.{_IN_BLOCK.get(m[2], m[2])}"
        if m := re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", path):
            (s, j), inner = divmod(int(m[1]), r + 2), m[2]
            return f"decoder.up_blocks.{s}.upsamplers.0.{inner}" if j == r + 1 else (
                f"decoder.up_blocks.{s}.resnets.{j}.{_IN_BLOCK.get(inner, inner)}")
    return None


def _to_official_path(path: str, residual: bool, r: int) -> str | None:
    """Diffusers module path → official module path, or None when the path is not a VAE module."""
    in_block = _IN_BLOCK_INV
    if path in _TOP_INV:
        return _TOP_INV[path]
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets\.[01]|attentions\.0)\.(.+)", path):
        return f"{m[1]}.middle.{_MIDDLE_INV[m[2]]}.{in_block.get(m[3], m[3])}"
    if residual:
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(?:resnets\.(\d+)|downsampler)\.(.+)", path):
            j = r if m[2] is None else int(m[2])
            return f"encoder.downsamples.{m[1]}.downsamples.{j}.{in_block.get(m[3], m[3])}"
        if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsampler)\.(.+)", path):
            j = r + 1 if m[2] is None else int(m[2])
            return f"decoder.upsamples.{m[1]}.upsamples.{j}.{in_block.get(m[3], m[3])}"
    else:
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", path):
            return f"encoder.downsamples.{m[1]}.{in_block.get(m[2], m[2])}"
        if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsamplers\.0)\.(.+)", path):
            j = r + 1 if m[2] is None else int(m[2])
            return f"decoder.upsamples.{int(m[1]) * (r + 2) + j}.{in_block.get(m[3], m[3])}"
    return None


def _rename(sd: Mapping[str, Tensor], rename: Callable[[str], str | None], what: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in sd.items():
        path, _, param = key.rpartition(".")
        new = rename(path)
        if new is None:
            unknown.append(key)
        else:
            out[f"{new}.{param}"] = value
    if unknown:
        raise ValueError(f"{len(unknown)} keys are not part of a Wan VAE state dict in the {what} layout, "
                         f"e.g. {unknown[:5]}")
    if len(out) != len(sd):
        raise ValueError(f"Wan VAE state dict in the {what} layout has keys that map onto the same name")
    return out


def _indices(sd: Mapping[str, Tensor], pattern: str) -> list[int]:
    found = [int(m[1]) for k in sd if (m := re.match(pattern, k))]
    if not found:
        raise ValueError(f"no key matches {pattern!r}: this is not a full Wan VAE state dict")
    return found


def to_uint8(video: Tensor) -> np.ndarray:
    """A decoded video [3, F, H, W] in [-1, 1] -> frames [F, H, W, 3] uint8, truncating like the official
    writer."""
    return pixels_to_uint8(video).cpu().numpy()


def vae_state_dict_from_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an `AutoencoderKLWan` state dict (2.1 or 2.2) to the official keys `WanVAE21/22` load strictly.

    The version is read from the keys (2.2 has nested `down_blocks.{s}.resnets`); tensors are passed through.
    """
    residual = any(re.match(r"encoder\.down_blocks\.\d+\.resnets\.", k) for k in sd)
    # The decoder's stages hold R+1 residual blocks each, the last one at index R.
    r = max(_indices(sd, r"decoder\.up_blocks\.0\.resnets\.(\d+)\."))
    return _rename(sd, lambda p: _to_official_path(p, residual, r), "diffusers")


def vae_state_dict_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an official-keyed Wan VAE state dict (2.1 or 2.2) to the `AutoencoderKLWan` layout."""
    residual = any(re.match(r"encoder\.downsamples\.\d+\.downsamples\.", k) for k in sd)
    # The first decoder stage holds R+1 residual blocks, then its upsample (`resample.1`) at index R+1.
    first_up = (r"decoder\.upsamples\.0\.upsamples\.(\d+)\.resample\." if residual
                else r"decoder\.upsamples\.(\d+)\.resample\.")
    r = min(_indices(sd, first_up)) - 1
    return _rename(sd, lambda p: _to_diffusers_path(p, residual, r), "official")


# --- config mapping ---

# diffusers config.json field → our constructor argument, with diffusers' default for a missing field.
_DIFFUSERS_ARCH = {
    "base_dim": ("dim", 96),
    "z_dim": ("z_dim", 16),
    "dim_mult": ("dim_mult", [1, 2, 4, 4]),
    "num_res_blocks": ("num_res_blocks", 2),
    "attn_scales": ("attn_scales", []),
    "temperal_downsample": ("temperal_downsample", [False, True, True]),
    "dropout": ("dropout", 0.0),
    "latents_mean": ("latents_mean", list(LATENTS_MEAN_21)),
    "latents_std": ("latents_std", list(LATENTS_STD_21)),
}
# Fields that pick the version (`is_residual`), its decoder width, or restate what it implies (checked).
_DIFFUSERS_IMPLIED = ("decoder_base_dim", "is_residual", "in_channels", "out_channels", "patch_size",
                      "scale_factor_temporal", "scale_factor_spatial")


def vae_config_from_diffusers(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Map an `AutoencoderKLWan` `config.json` dict to `(version, kwargs)` for `build_vae(version, **kwargs)`.

    `is_residual: true` means 2.2, whose `decoder_base_dim` becomes `dec_dim`. Missing fields take diffusers'
    defaults. Channel, patch and stride fields must agree with the version; keys starting with "_" are
    bookkeeping and ignored; any other unknown key is rejected.
    """
    unknown = {k for k in config if not k.startswith("_")} - set(_DIFFUSERS_ARCH) - set(_DIFFUSERS_IMPLIED)
    if unknown:
        raise ValueError(f"unknown AutoencoderKLWan config keys {sorted(unknown)}; "
                         f"accepted: {sorted([*_DIFFUSERS_ARCH, *_DIFFUSERS_IMPLIED])}")
    kwargs = {ours: config.get(theirs, default) for theirs, (ours, default) in _DIFFUSERS_ARCH.items()}
    if kwargs["attn_scales"]:
        raise ValueError("diffusers' Wan decoder has no attention in its up path; attn_scales must be empty, "
                         f"got {kwargs['attn_scales']}")
    version = "2.2" if config.get("is_residual", False) else "2.1"
    dec_dim = config.get("decoder_base_dim") or kwargs["dim"]
    patch = 2 if version == "2.2" else None
    if version == "2.2":
        kwargs["dec_dim"] = dec_dim
    elif dec_dim != kwargs["dim"]:
        raise ValueError(f"a 2.1 VAE (is_residual false) has one base width; got base_dim {kwargs['dim']} "
                         f"and decoder_base_dim {dec_dim}")
    implied = {
        "in_channels": 3 * (patch or 1) ** 2,
        "out_channels": 3 * (patch or 1) ** 2,
        "patch_size": patch,
        "scale_factor_temporal": 4,
        "scale_factor_spatial": 2 ** (len(kwargs["dim_mult"]) - 1) * (patch or 1),
    }
    for key, expected in implied.items():
        if config.get(key, expected) != expected:
            raise ValueError(f"VAE {version} with this config needs {key}={expected!r}, got {config[key]!r}")
    return version, kwargs

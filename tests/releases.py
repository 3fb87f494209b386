"""Write tiny random Wan2.2 releases in the real folder layouts, for tests of loading and of the pipeline.

Architectures are the real ones at toy sizes; `wan_ray.json` names the task and shrinks its sizes and
step counts so a whole video takes well under a second on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import UMT5Config, UMT5EncoderModel

from wan_ray.models.checkpoint import save_dit
from wan_ray.models.dit import WanDiT
from wan_ray.models.text_encoder import build_word_tokenizer, umt5_state_dict_to_official
from wan_ray.models.vae import build_vae, vae_state_dict_to_diffusers

WORDS = ["a", "red", "green", "blue", "cat", "dog", "runs", "jumps", "on", "the", "grass", "in", "snow"]
TEXT_DIM = 16
# text_len stays the real 512: the diffusers layout cannot record another value
DIT = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=TEXT_DIM, freq_dim=16)
VAE21 = dict(dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
VAE22 = dict(dim=8, dec_dim=8, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
             latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
TASKS = {  # our short name -> (preset, model_type, in_dim, out_dim, vae version, vae config, experts)
    "t2v": ("t2v-A14B", "t2v", 16, 16, "2.1", VAE21, ("high", "low")),
    "i2v": ("i2v-A14B", "i2v", 36, 16, "2.1", VAE21, ("high", "low")),
    "ti2v": ("ti2v-5B", "ti2v", 48, 48, "2.2", VAE22, ("single",)),
}
SIZE = 64  # 64x64 pixels: 8x8 latents (2.1) or 4x4 (2.2)


def _perturbed(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def build_components(task: str, seed: int = 0):
    preset, model_type, in_dim, out_dim, vae_version, vae_config, experts = TASKS[task]
    torch.manual_seed(seed)
    dits = {name: _perturbed(WanDiT(model_type=model_type, in_dim=in_dim, out_dim=out_dim, **DIT), seed + i)
            for i, name in enumerate(experts)}
    vae = _perturbed(build_vae(vae_version, **vae_config), seed + 10)
    t5 = UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS) + 3, d_model=TEXT_DIM, d_ff=32, num_layers=2,
                                     num_heads=2, d_kv=8, feed_forward_proj="gated-gelu")).eval()
    return preset, dits, vae, t5


def write_release(root: str | Path, task: str = "t2v", layout: str = "official", seed: int = 0) -> Path:
    """A complete release folder of `task` ("t2v", "i2v", "ti2v") in the official or diffusers layout."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    preset, dits, vae, t5 = build_components(task, seed)
    vae_config = TASKS[task][5]
    overrides = {"task": preset, "sizes": [[SIZE, SIZE]], "frame_num": 5, "sample_steps": 4,
                 "vae_config": vae_config}
    if layout == "official":
        for name, model in dits.items():
            save_dit(model, root / {"high": "high_noise_model", "low": "low_noise_model", "single": ""}[name])
        torch.save(vae.state_dict(), root / ("Wan2.1_VAE.pth" if vae.version == "2.1" else "Wan2.2_VAE.pth"))
        torch.save(umt5_state_dict_to_official(t5), root / "models_t5_umt5-xxl-enc-bf16.pth")
        build_word_tokenizer(WORDS, root / "google" / "umt5-xxl")
    else:
        folders = {"high": "transformer", "low": "transformer_2", "single": "transformer"}
        for name, model in dits.items():
            save_dit(model, root / folders[name], layout="diffusers")
        (root / "vae").mkdir()
        save_file({k: v.contiguous() for k, v in vae_state_dict_to_diffusers(vae.state_dict()).items()},
                  str(root / "vae" / "diffusion_pytorch_model.safetensors"))
        (root / "vae" / "config.json").write_text(json.dumps(diffusers_vae_config(vae.version, vae_config)))
        t5.save_pretrained(root / "text_encoder")
        build_word_tokenizer(WORDS, root / "tokenizer")
        index = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
                 "transformer_2": ["diffusers", "WanTransformer3DModel"] if "low" in dits else [None, None],
                 "vae": ["diffusers", "AutoencoderKLWan"]}
        (root / "model_index.json").write_text(json.dumps(index))
        overrides.pop("vae_config")  # the diffusers config.json carries the VAE's architecture
    (root / "wan_ray.json").write_text(json.dumps(overrides))
    return root


def diffusers_vae_config(version: str, config: dict) -> dict:
    out = {"base_dim": config["dim"], "z_dim": config["z_dim"], "dim_mult": config["dim_mult"],
           "num_res_blocks": config["num_res_blocks"], "attn_scales": [],
           "temperal_downsample": [False, True, True]}
    if "latents_mean" in config:
        out.update(latents_mean=config["latents_mean"], latents_std=config["latents_std"])
    if version == "2.2":
        out.update(is_residual=True, decoder_base_dim=config["dec_dim"], in_channels=12, out_channels=12,
                   patch_size=2, scale_factor_spatial=16)
    return out

"""The bundled tiny Wan model: the real Wan2.2 architectures at toy sizes, trained here on synthetic videos.

`wan_ray/assets/tiny/` is a release in the official layout (`high_noise_model/`, `low_noise_model/`,
`Wan2.1_VAE.pth`, `models_t5_umt5-tiny-enc.pth`, `tokenizer/`, `wan_ray.json`), loaded by the same code as
the real checkpoints. The DiT architecture and sampling defaults are the `"tiny"` preset in
`wan_ray.models.config`; the VAE architecture and latent statistics are in the release's `wan_ray.json`.

- `data`: the seeded synthetic dataset (vocabulary, captions, held-out combinations, rendering);
- `detect`: the deterministic detector that reads a video back into caption attributes;
- `train`: VAE and two-expert flow-matching training, reusable for fine-tuning
  (`python -m wan_ray.tiny.train`);
- `evaluate`: generation and prompt-following accuracy (`wan-ray eval-tiny`).

See docs/tiny-model.md.
"""

from __future__ import annotations

from pathlib import Path

TASK = "tiny"
RELEASE_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny"

# Wan2.1 VAE at toy width: 4 stages (stride 4x8x8) of one residual block each, 8 latent channels.
VAE_ARCH = dict(dim=8, z_dim=8, dim_mult=(1, 2, 4, 4), num_res_blocks=1,
                temperal_downsample=(False, True, True))
# umT5 encoder at toy width; the vocabulary size comes from the word tokenizer.
UMT5_ARCH = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
                 relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)

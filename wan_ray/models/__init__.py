"""Pure-PyTorch Wan2.2 models: the DiT, the umT5 text encoder, both VAEs, and checkpoint formats.

Single-device code: nothing here knows of Ray, process groups or the other layers.
"""

from .attention import attention, set_attention_backend
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    load_dit,
    load_vae,
    open_checkpoint,
    resolve_checkpoint,
    save_dit,
)
from .config import PRESETS, DiTConfig, TaskSpec, get_preset
from .dit import WanDiT, cast_dit
from .text_encoder import UMT5TextEncoder, load_tokenizer, load_umt5_encoder
from .vae import WanVAE, WanVAE21, WanVAE22, build_vae

__all__ = [
    "PRESETS",
    "Checkpoint",
    "CheckpointError",
    "DiTConfig",
    "TaskSpec",
    "UMT5TextEncoder",
    "WanDiT",
    "WanVAE",
    "WanVAE21",
    "WanVAE22",
    "attention",
    "build_vae",
    "cast_dit",
    "get_preset",
    "load_dit",
    "load_tokenizer",
    "load_umt5_encoder",
    "load_vae",
    "open_checkpoint",
    "resolve_checkpoint",
    "save_dit",
    "set_attention_backend",
]

"""Typed configs for the Wan2.2 models and the task presets that tie them together.

The numbers come from the official Wan2.2 configs and checkpoints (see docs/models.md). A `TaskSpec` is the
single place where a task's architecture, VAE, expert layout and sampling defaults live; everything else
(loaders, plans, request validation) reads them from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

ModelType = Literal["t2v", "i2v", "ti2v"]
VAEVersion = Literal["2.1", "2.2"]

# The official default negative prompt (shared_config.sample_neg_prompt). It is an input the experts were
# tuned with, so it is kept verbatim: it lists what to avoid (over-saturation, blur, subtitles, static
# frames, malformed limbs, crowds, walking backwards, ...).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# Keys that official or diffusers config.json files carry but that do not change the architecture.
_IGNORED_DIT_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "window_size"}


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of one Wan DiT, with the field names of the official `config.json`."""

    model_type: ModelType = "t2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 40
    num_layers: int = 40
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.model_type not in ("t2v", "i2v", "ti2v"):
            raise ValueError(f"model_type must be 't2v', 'i2v' or 'ti2v', got {self.model_type!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for rotary embeddings")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> DiTConfig:
        """Build from an official config.json dict; bookkeeping keys are accepted and ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        window = config.get("window_size", (-1, -1))
        if tuple(window) != (-1, -1):
            raise ValueError(f"only global attention is supported (window_size (-1, -1)), got {window}")
        unknown = set(config) - known - _IGNORED_DIT_KEYS
        if unknown:
            raise ValueError(f"unknown DiT config keys {sorted(unknown)}; accepted: {sorted(known)}")
        return cls(**{k: v for k, v in config.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "patch_size": list(self.patch_size)}


@dataclass(frozen=True)
class TaskSpec:
    """Everything fixed about one task: architecture, components, and the official sampling defaults."""

    name: str
    dit: DiTConfig
    vae_version: VAEVersion
    vae_stride: tuple[int, int, int]
    # Folders of the experts inside a release; a single-expert model has one entry, "" (the root).
    expert_dirs: dict[str, str]
    # Switch from the high-noise to the low-noise expert when t < boundary * num_train_timesteps.
    boundary: float | None
    sizes: tuple[tuple[int, int], ...]  # supported (width, height)
    frame_num: int
    fps: int
    sample_steps: int
    sample_shift: float
    # (low-noise, high-noise) for two-expert tasks, as in the official configs; a float otherwise.
    guide_scale: float | tuple[float, float]
    sample_solver: str = "unipc"
    max_frames: int = 121
    num_train_timesteps: int = 1000
    text_len: int = 512
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    vae_config: dict[str, Any] = field(default_factory=dict)  # overrides of the VAE class defaults
    text_encoder_file: str = "models_t5_umt5-xxl-enc-bf16.pth"
    tokenizer_dir: str = "google/umt5-xxl"

    @property
    def vae_file(self) -> str:
        return "Wan2.1_VAE.pth" if self.vae_version == "2.1" else "Wan2.2_VAE.pth"

    @property
    def z_dim(self) -> int:
        return self.dit.out_dim

    @property
    def is_moe(self) -> bool:
        return self.boundary is not None

    @property
    def size_is_area(self) -> bool:
        """With an input image, i2v-style tasks read the size as an area budget; the image sets the aspect."""
        return self.dit.model_type in ("i2v", "ti2v")


_A14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
_TWO_EXPERTS = {"high": "high_noise_model", "low": "low_noise_model"}
_SIZES_A14B = ((1280, 720), (720, 1280), (832, 480), (480, 832))

PRESETS: dict[str, TaskSpec] = {
    "t2v-A14B": TaskSpec(
        name="t2v-A14B",
        dit=DiTConfig(model_type="t2v", in_dim=16, out_dim=16, **_A14B),
        vae_version="2.1",
        vae_stride=(4, 8, 8),
        expert_dirs=_TWO_EXPERTS,
        boundary=0.875,
        sizes=_SIZES_A14B,
        frame_num=81,
        fps=16,
        sample_steps=40,
        sample_shift=12.0,
        guide_scale=(3.0, 4.0),
    ),
    "i2v-A14B": TaskSpec(
        name="i2v-A14B",
        dit=DiTConfig(model_type="i2v", in_dim=36, out_dim=16, **_A14B),
        vae_version="2.1",
        vae_stride=(4, 8, 8),
        expert_dirs=_TWO_EXPERTS,
        boundary=0.900,
        sizes=_SIZES_A14B,
        frame_num=81,
        fps=16,
        sample_steps=40,
        sample_shift=5.0,
        guide_scale=(3.5, 3.5),
    ),
    "ti2v-5B": TaskSpec(
        name="ti2v-5B",
        dit=DiTConfig(model_type="ti2v", in_dim=48, out_dim=48, dim=3072, ffn_dim=14336, num_heads=24,
                      num_layers=30),
        vae_version="2.2",
        vae_stride=(4, 16, 16),
        expert_dirs={"single": ""},
        boundary=None,
        sizes=((1280, 704), (704, 1280)),
        frame_num=121,
        fps=24,
        sample_steps=50,
        sample_shift=5.0,
        guide_scale=5.0,
    ),
    # The bundled demo model (wan_ray/assets/tiny, docs/tiny-model.md): two experts at toy size, trained on
    # synthetic videos of one shape moving over a plain background. Its VAE architecture and latent statistics
    # are in the release's wan_ray.json (they come out of training).
    "tiny": TaskSpec(
        name="tiny",
        dit=DiTConfig(model_type="t2v", in_dim=8, out_dim=8, dim=192, ffn_dim=768, num_heads=3, num_layers=4,
                      text_dim=64, text_len=32),
        vae_version="2.1",
        vae_stride=(4, 8, 8),
        expert_dirs=_TWO_EXPERTS,
        boundary=0.875,
        sizes=((128, 128),),
        frame_num=17,
        fps=8,
        sample_steps=20,
        sample_shift=3.0,
        guide_scale=(3.0, 4.0),
        max_frames=17,
        text_len=32,
        negative_prompt="blurry, noisy, static, distorted",
        text_encoder_file="models_t5_umt5-tiny-enc.pth",
        tokenizer_dir="tokenizer",
    ),
}


def get_preset(name: str) -> TaskSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(PRESETS)}") from None


def register_preset(spec: TaskSpec) -> None:
    """Add a task (the bundled tiny model registers itself this way)."""
    PRESETS[spec.name] = spec

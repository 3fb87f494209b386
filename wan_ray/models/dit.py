"""The Wan2.2 diffusion transformer (DiT): one class for the t2v, i2v and ti2v variants, any size.

Module names and parameter shapes are those of the official checkpoints, so `load_state_dict(official,
strict=True)` works. Single-device code: sequence parallelism is applied from outside
(`wan_ray.parallel`) by wrapping the `Attention` modules and splitting tokens around the blocks.

Numerics follow the official precision map where fidelity depends on it:
- the residual stream, timestep embedding, modulation and head run in float32 (their weights stay float32
  when the model is cast with `cast_dit`), the big matmuls in the weights' dtype (bf16 on GPUs);
- the timestep sinusoid is computed in float64 over a handful of values (timesteps reach 1000, where a
  float32 argument loses ~1e-4), the 3-D RoPE table in float64 once per grid and applied in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .config import DiTConfig

# Parameters that stay float32 when the rest of the model is cast to a low-precision dtype: the timestep
# path, the modulation tables and the output head (the official model computes them under fp32 autocast).
FP32_PARAMS = ("time_embedding.", "time_projection.", "modulation", "head.head.")


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Timesteps [...] -> [..., dim] float32: cosines of t * 10000^(-j/half), then the sines."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


class RotaryEmbedding3D(nn.Module):
    """Per-token (cos, sin) tables for 3-D RoPE over a (frames, rows, cols) token grid.

    The head dim is split into rotary pairs for time, height and width (22/21/21 pairs at d = 128), each
    axis with its own frequencies theta^(-2j/d_axis). Tables are built in float64 once per grid and
    cached as float32 on the device; they are not part of the state dict.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        half = head_dim // 2
        self.axis_pairs = (half - 2 * (half // 3), half // 3, half // 3)
        self.theta = theta
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _axis_freqs(self, pairs: int) -> torch.Tensor:
        return self.theta ** (-torch.arange(pairs, dtype=torch.float64) * 2 / (2 * pairs))

    def forward(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(grid), str(device))
        if key not in self._cache:
            T, H, W = grid
            t, h, w = (torch.arange(n, dtype=torch.float64)[:, None] * self._axis_freqs(p)
                       for n, p in zip(grid, self.axis_pairs, strict=True))
            angles = torch.cat([
                t[:, None, None].expand(T, H, W, -1),
                h[None, :, None].expand(T, H, W, -1),
                w[None, None, :].expand(T, H, W, -1),
            ], dim=-1).reshape(T * H * W, -1)  # [L, head_dim/2]
            self._cache[key] = (angles.cos().float().to(device), angles.sin().float().to(device))
        return self._cache[key]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (2i, 2i+1) of x [B, L, N, d] by per-token angles; float32 out."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, L, N, d/2] each
    cos, sin = cos[:, None], sin[:, None]  # [L, 1, d/2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input or weight dtype; returns float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class RMSNorm(nn.Module):
    """RMS norm over the full width (all heads together), normalised in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class _Projections(nn.Module):
    """q, k, v, o projections and the q/k norms shared by self- and cross-attention."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.head_dim = dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.attn = Attention()

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        # -1: a parallel wrapper may have sharded the heads
        return x.unflatten(-1, (-1, self.head_dim))  # [B, L, D] -> [B, L, N, d]


class SelfAttention(_Projections):
    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self.heads(self.norm_q(self.q(x)))
        k = self.heads(self.norm_k(self.k(x)))
        v = self.heads(self.v(x))
        q, k = apply_rope(q, *rope).type_as(v), apply_rope(k, *rope).type_as(v)
        return self.o(self.attn(q, k, v).flatten(2))


class CrossAttention(_Projections):
    """Video tokens attend to all text tokens; no RoPE, no mask (padding rows are attended, as trained)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self.heads(self.norm_q(self.q(x)))
        k = self.heads(self.norm_k(self.k(context)))
        v = self.heads(self.v(context))
        return self.o(self.attn(q, k, v).flatten(2))


class WanBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm32(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = LayerNorm32(dim, cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = LayerNorm32(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, dim))
        # shift, scale, gate for self-attention, then for the FFN; added to the timestep projection
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                context: torch.Tensor) -> torch.Tensor:
        # x: [B, L, D] float32 residual stream; e0: [B, L or 1, 6, D] float32; context: [B, L_text, D]
        dtype = context.dtype  # the matmuls' dtype
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).unbind(2)
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + self.self_attn(h.to(dtype), rope).float() * gate1
        x = x + self.cross_attn(self.norm3(x).to(dtype), context).float()
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + self.ffn(h.to(dtype)).float() * gate2


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float):
        super().__init__()
        self.norm = LayerNorm32(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)  # shift, scale

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        # x: [B, L, D]; e: [B, L or 1, D], the timestep embedding before the 6-way projection
        shift, scale = (self.modulation.float() + e.unsqueeze(2)).unbind(2)
        h = self.norm(x) * (1 + scale) + shift
        return self.head(h.to(self.head.weight.dtype)).float()  # [B, L, p_t*p_h*p_w*C_out]


class BlockStack(nn.Module):
    """Runs the blocks in order. Holds no weights: a module so that step caching can replace it."""

    def forward(self, blocks: nn.ModuleList, x: torch.Tensor, e0: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], context: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            x = block(x, e0, rope, context)
        return x


class WanDiT(nn.Module):
    """Wan2.2 DiT. `WanDiT(**config_json)` accepts the official config.json fields."""

    def __init__(self, **config):
        super().__init__()
        cfg = self.config = DiTConfig.from_dict(config)
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.stack = BlockStack()
        self.head = Head(dim, cfg.out_dim, cfg.patch_size, cfg.eps)
        self.rope = RotaryEmbedding3D(cfg.head_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the flow velocity.

        x: [B, C, F, H, W] noisy latent; y: [B, C_y, F, H, W] i2v conditioning, concatenated to x along
        channels (C + C_y = in_dim); t: [B], or [B, L] per token (ti2v); context: [B, L_text, text_dim],
        zero-padded to text_len. Returns [B, out_dim, F, H, W] in float32.
        """
        cfg = self.config
        if y is not None:
            x = torch.cat([x, y], dim=1)
        if x.ndim != 5 or x.shape[1] != cfg.in_dim:
            raise ValueError(f"expected x (+ y) of shape [B, {cfg.in_dim}, F, H, W], got {tuple(x.shape)}")
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(x.to(dtype))  # [B, D, T, h, w]
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2).float()  # [B, L, D], tokens in (t, y, x) order
        B, L = x.shape[:2]

        t = t.reshape(B, -1)  # [B, 1] or [B, L]
        if t.shape[1] not in (1, L):
            raise ValueError(f"per-token timesteps need shape [B, {L}], got {tuple(t.shape)}")
        e = self.time_embedding(sinusoidal_embedding(t, cfg.freq_dim).to(self.time_embedding[0].weight.dtype))
        e = e.float()  # [B, L or 1, D]
        e0 = self.time_projection(e.to(self.time_projection[1].weight.dtype)).float().unflatten(2, (6, -1))

        context = self.text_embedding(self._pad_context(context).to(dtype))  # [B, text_len, D]
        rope = self.rope(grid, x.device)
        x = self.stack(self.blocks, x, e0, rope, context)
        return self.unpatchify(self.head(x, e), grid)

    def _pad_context(self, context: torch.Tensor) -> torch.Tensor:
        n, d = context.shape[1:]
        if d != self.config.text_dim or n > self.config.text_len:
            raise ValueError(f"context must be [B, <= {self.config.text_len}, {self.config.text_dim}], "
                             f"got {tuple(context.shape)}")
        return F.pad(context, (0, 0, 0, self.config.text_len - n))  # zero rows, as in training

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, L, p_t*p_h*p_w*C] (C fastest) -> [B, C, T*p_t, h*p_h, w*p_w]."""
        (pt, ph, pw), (T, h, w) = self.config.patch_size, grid
        x = x.view(x.shape[0], T, h, w, pt, ph, pw, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, T, pt, h, ph, w, pw]
        return x.reshape(x.shape[0], x.shape[1], T * pt, h * ph, w * pw)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation, for training from scratch (the output head starts at zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in (*self.text_embedding, *self.time_embedding):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)


def compile_blocks(model: WanDiT) -> WanDiT:
    """`torch.compile` each block: one graph serves all blocks, and it fuses the float32 modulation, norm,
    gate and RoPE passes that otherwise make the forward memory-bound (0.86x diffusers' time at 480p on an
    H100 compiled, 1.14x not: docs/benchmarks.md)."""
    for block in model.blocks:
        block.compile()
    return model


def cast_dit(model: WanDiT, dtype: torch.dtype) -> WanDiT:
    """Cast the weights to `dtype` except those the official model keeps in float32 (`FP32_PARAMS`)."""
    for name, param in model.named_parameters():
        target = torch.float32 if any(p in name for p in FP32_PARAMS) else dtype
        param.data = param.data.to(target)
    return model


# Official name fragment -> diffusers `WanTransformer3DModel` name fragment. Diffusers calls the
# cross-attention pre-norm `norm2` (and its FFN norm `norm3`); only the affine one has weights.
_DIFFUSERS_RENAMES = (
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.head.", "proj_out."),
    (".modulation", ".scale_shift_table"),
    ("self_attn.o.", "attn1.to_out.0."),
    ("cross_attn.o.", "attn2.to_out.0."),
    *((f"{src}.{p}.", f"{dst}.to_{p}.") for src, dst in (("self_attn", "attn1"), ("cross_attn", "attn2"))
      for p in "qkv"),
    ("self_attn.norm_", "attn1.norm_"),
    ("cross_attn.norm_", "attn2.norm_"),
    (".norm3.", ".norm2."),
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
)


_DIFFUSERS_EXACT = {"head.modulation": "scale_shift_table"}  # whole keys; a fragment rule would misfire


def _rename(key: str, exact: dict[str, str], pairs) -> str:
    if key in exact:
        return exact[key]
    for old, new in pairs:
        if old in key:
            return key.replace(old, new, 1)
    return key


def dit_key_to_diffusers(key: str) -> str:
    return _rename(key, _DIFFUSERS_EXACT, _DIFFUSERS_RENAMES)


def dit_key_from_diffusers(key: str) -> str:
    exact = {v: k for k, v in _DIFFUSERS_EXACT.items()}
    return _rename(key, exact, [(new, old) for old, new in _DIFFUSERS_RENAMES])


def dit_config_from_diffusers(config: dict) -> dict:
    """A diffusers `transformer/config.json` -> official config fields (`model_type` from the channels)."""
    if config.get("image_dim") or config.get("added_kv_proj_dim"):
        raise ValueError("this diffusers transformer has an image cross-attention branch (Wan2.1 I2V); "
                         "Wan2.2 models have none")
    in_dim, out_dim = config.get("in_channels", 16), config.get("out_channels", 16)
    model_type = "ti2v" if in_dim == out_dim == 48 else "i2v" if in_dim > out_dim else "t2v"
    heads, head_dim = config.get("num_attention_heads", 40), config.get("attention_head_dim", 128)
    return dict(model_type=model_type, patch_size=tuple(config.get("patch_size", (1, 2, 2))),
                in_dim=in_dim, out_dim=out_dim, dim=heads * head_dim, num_heads=heads,
                ffn_dim=config.get("ffn_dim", 13824), freq_dim=config.get("freq_dim", 256),
                text_dim=config.get("text_dim", 4096), num_layers=config.get("num_layers", 40),
                qk_norm=config.get("qk_norm") is not None,
                cross_attn_norm=config.get("cross_attn_norm", True), eps=config.get("eps", 1e-6))

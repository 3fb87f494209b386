"""Opt-in FP8 linear layers for the DiT (lossy): `quantize_fp8(model)` after loading.

Each block's big projections (self- and cross-attention q, k, v, o and the FFN) keep their weight in float8
e4m3 with one scale per output row; activations are quantised per token on the fly, and the product runs in
`torch._scaled_mm` (the FP8 tensor cores on Hopper; a reference implementation elsewhere), returning bf16.
The products use fast accumulation by default: Hopper's FP8 tensor cores then keep their own reduced-precision
accumulator instead of promoting partial sums to float32. That made a compiled A14B block 2 % faster at 720p
(H200) and left the forward's error against bf16 where it was (1.59 %; docs/benchmarks.md);
`fast_accum=False` promotes. Everything else — embeddings, norms, modulation, the head, attention itself —
is unchanged. The transform is applied from outside and is not a checkpoint format: quantise after loading.
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
QUANTISED = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
             "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def _rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, K] -> (float8 values, float32 scales [N, 1]) with x ≈ values * scales, row by row."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).to(FP8), scale


class FP8Linear(nn.Module):
    """y = x W^T + b with W in float8 (per output row scale) and x quantised per token."""

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype = torch.bfloat16, fast_accum: bool = True):
        super().__init__()
        if linear.in_features % 16 or linear.out_features % 16:
            raise ValueError(f"FP8 matmuls need sizes divisible by 16, got {linear.in_features} -> "
                             f"{linear.out_features}")
        weight, scale = _rowwise(linear.weight.detach())
        self.register_buffer("weight", weight)  # [out, in] float8
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out] float32
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(out_dtype))
        self.out_dtype = out_dtype
        self.fast_accum = fast_accum  # see the module docstring

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        values, scale = _rowwise(rows)
        out = torch._scaled_mm(values, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                               bias=self.bias, out_dtype=self.out_dtype,
                               use_fast_accum=self.fast_accum)  # [tokens, out]
        return out.reshape(*x.shape[:-1], -1)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, float8_e4m3fn"


def quantize_block_fp8(block: nn.Module, out_dtype: torch.dtype = torch.bfloat16,
                       fast_accum: bool = True) -> nn.Module:
    """Replace one `WanBlock`'s attention and FFN projections by `FP8Linear`s, in place."""
    for path in QUANTISED:
        owner_path, _, name = path.rpartition(".")
        owner = block.get_submodule(owner_path)
        linear = getattr(owner, name) if not name.isdigit() else owner[int(name)]
        fp8 = FP8Linear(linear, out_dtype, fast_accum)
        if name.isdigit():
            owner[int(name)] = fp8
        else:
            setattr(owner, name, fp8)
    return block


def quantize_fp8(model: nn.Module, out_dtype: torch.dtype = torch.bfloat16, fast_accum: bool = True
                 ) -> nn.Module:
    """Replace the blocks' attention and FFN projections of a loaded `WanDiT` by `FP8Linear`s, in place."""
    for block in model.blocks:
        quantize_block_fp8(block, out_dtype, fast_accum)
    return model

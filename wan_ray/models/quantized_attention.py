"""Opt-in quantized attention (lossy): a Triton kernel for the attention backend ``"quantized"``.

Both products of attention run on 8-bit tensor cores (twice the bf16 rate on Hopper), accumulating in
32 bits, as SageAttention 2 does:

- S = Q Kᵀ in INT8, Q and K with one scale per block of 128 tokens (per batch and head). INT8 rather than
  FP8 here: with a per-block scale its rounding error is about a third of e4m3's (the scores' relative
  error, emulated on random inputs: 1.3 % against 3.9 %). K is first *smoothed*: its mean over the tokens is
  subtracted, which changes every score of a query row by the same amount and so leaves the softmax as it
  is, while it removes the channel offsets that would otherwise use up the 8-bit range.
- O = P V in FP8 e4m3: P (the softmax numerators, in [0, 1], times 256 so that small ones stay in e4m3's
  normal range) and V (one scale per channel).

The softmax itself is the usual online one in float32 (exp2, running maximum and sum). Quantisation happens
in torch before the kernel (cheap next to attention: one pass over q, k and v); the kernel sees padded,
contiguous 8-bit copies, so it needs no bounds checks on its loads. The kernel launch is the custom op
`wan_ray::quantized_attention_kernel`, which torch.compile treats as one opaque call while it fuses the
quantisation around it. On random inputs the output's relative L2 error against exact attention is about
4 % (`tests/test_quantized_attention.py`). On an H200 at the A14B 480p shape the kernel takes 0.76× the
time of cuDNN's bf16 attention, 738 TFLOP/s-equivalent (`benchmarks/bench_attention.py`,
docs/benchmarks.md).

Needs Triton and, for speed, a GPU with FP8 tensor cores (Hopper or newer). With ``TRITON_INTERPRET=1``
set before import, the same kernel runs on CPU tensors through Triton's interpreter (the tests do that).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
INT8_MAX = 127
BLOCK = 128  # tokens per Q and K scale block; the kernel's tiles divide it
LOG2_P_SCALE = 8  # P in [0, 1] is stored as 256·P: e4m3's normal range starts at 2^-6


def _fix_interpreter_fp8_casts() -> None:
    """Route the CPU interpreter's float32 -> e4m3 casts through torch's.

    Triton 3.9's interpreter rounds them wrongly when rounding up carries into the exponent (127.2 becomes
    64, not 128); GPUs convert in hardware. Without this, CPU runs (the tests, `--tiny` benchmarks, the tiny
    model's quality check) would measure the interpreter's bug rather than the kernel.
    """
    import numpy as np
    from triton.runtime import interpreter

    convert = interpreter._convert_float

    def convert_fixed(values, src, dst, rounding):
        if src == tl.float32 and dst == tl.float8e4nv:
            as_float = torch.from_numpy(np.frombuffer(values.tobytes(), dtype=np.float32).copy())
            return as_float.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(values.shape)
        return convert(values, src, dst, rounding)

    interpreter._convert_float = convert_fixed


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_fp8_casts()


@triton.jit
def _attend_tile(acc, row_max, row_sum, q, q_scale, start, k_base, vt_base, k_scale_base, len_k, len_k_pad,
                 cols, dims, HEAD_DIM: tl.constexpr, SCALE_BLOCK: tl.constexpr, LOG2_P_SCALE: tl.constexpr,
                 MASKED: tl.constexpr):
    """Fold one tile of keys and values into the running (acc, row_max, row_sum) of a block of queries."""
    # Loaded first, so that its latency hides behind the QKᵀ product (after it, the kernel ran 6-8 % slower).
    scale = q_scale * tl.load(k_scale_base + start // SCALE_BLOCK)  # > 0: to log2 units, after the max
    keys = start + cols
    k = tl.load(k_base + keys[:, None] * HEAD_DIM + dims[None, :])  # [N, d] int8
    s = tl.dot(q, tl.trans(k)).to(tl.float32)  # [M, N] integer scores (int32 accumulation)
    if MASKED:  # only the last tile holds padding keys
        s = tl.where(keys[None, :] < len_k, s, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(s, 1) * scale)
    # P is kept as 2^LOG2_P_SCALE · exp2(s - max), so that small values stay in e4m3's normal range; the
    # shift goes into the exponent and cancels against the row sum, which carries the same factor
    p = tl.exp2(s * scale - (new_max - LOG2_P_SCALE)[:, None])  # one FMA and one exp2 per score
    correction = tl.exp2(row_max - new_max)
    row_sum = row_sum * correction + tl.sum(p, 1)
    vt = tl.load(vt_base + dims[:, None] * len_k_pad + keys[None, :])  # [d, N] e4m3: Vᵀ, K-major (MMA)
    p8 = p.to(vt.dtype, fp_downcast_rounding="rtne")  # nearest: truncating doubles the error
    acc = acc * correction[:, None] + tl.dot(p8, tl.trans(vt))
    return acc, new_max, row_sum


@triton.jit
def _quantized_attention_kernel(q_ptr, k_ptr, vt_ptr, q_scale_ptr, k_scale_ptr, v_scale_ptr, out_ptr,
                                heads, len_k, len_q_pad, len_k_pad, out_stride_b, out_stride_l, out_stride_h,
                                len_q, HEAD_DIM: tl.constexpr, SCALE_BLOCK: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOG2_P_SCALE: tl.constexpr):
    block_m = tl.program_id(0)
    bh = tl.program_id(1)  # batch * heads + head
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)

    q = tl.load(q_ptr + bh * len_q_pad * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :])  # [M, d] int8
    # includes log2(e) / sqrt(d): the scores come out in log2 units
    q_scale = tl.load(q_scale_ptr + bh * (len_q_pad // SCALE_BLOCK) + block_m * BLOCK_M // SCALE_BLOCK)
    k_base = k_ptr + bh * len_k_pad * HEAD_DIM
    vt_base = vt_ptr + bh * HEAD_DIM * len_k_pad
    k_scale_base = k_scale_ptr + bh * (len_k_pad // SCALE_BLOCK)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)  # in log2 units
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_tiles_end = len_k // BLOCK_N * BLOCK_N
    for start in range(0, full_tiles_end, BLOCK_N):
        acc, row_max, row_sum = _attend_tile(acc, row_max, row_sum, q, q_scale, start, k_base, vt_base,
                                             k_scale_base, len_k, len_k_pad, cols, dims, HEAD_DIM,
                                             SCALE_BLOCK, LOG2_P_SCALE, MASKED=False)
    if full_tiles_end < len_k:
        acc, row_max, row_sum = _attend_tile(acc, row_max, row_sum, q, q_scale, full_tiles_end, k_base,
                                             vt_base, k_scale_base, len_k, len_k_pad, cols, dims, HEAD_DIM,
                                             SCALE_BLOCK, LOG2_P_SCALE, MASKED=True)

    v_scale = tl.load(v_scale_ptr + bh * HEAD_DIM + dims)  # [d]
    out = acc * v_scale[None, :] / row_sum[:, None]
    batch, head = bh // heads, bh % heads
    out_ptr += batch * out_stride_b + head * out_stride_h
    tl.store(out_ptr + rows[:, None] * out_stride_l + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rows[:, None] < len_q)


def _pad_tokens(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """[B, N, L, d] zero-padded along L to a multiple of `multiple`."""
    return F.pad(x, (0, 0, 0, (-x.shape[2]) % multiple))


def quantize_int8_blocks(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, N, L, d] -> (int8 [B, N, L_pad, d], float32 scales [B, N, L_pad / block]), one scale per block."""
    x = _pad_tokens(x.float(), block)
    B, N, L, d = x.shape
    blocks = x.reshape(B, N, L // block, block * d)
    scale = blocks.abs().amax(-1).clamp(min=1e-12) / INT8_MAX
    values = (blocks / scale[..., None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return values.view(B, N, L, d), scale


def quantize_fp8_channels_transposed(v: torch.Tensor, block: int = BLOCK
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, N, L, d] -> (e4m3 Vᵀ [B, N, d, L_pad], float32 scales [B, N, d]), one scale per channel."""
    v = _pad_tokens(v.float(), block)
    scale = v.abs().amax(2).clamp(min=1e-12) / FP8_MAX  # [B, N, d]
    return (v / scale[:, :, None, :]).to(FP8).transpose(2, 3).contiguous(), scale


def quantize_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q [B, Lq, N, d], k/v [B, Lk, N, d] -> the kernel's operands: (int8 q, int8 smoothed k, e4m3 Vᵀ, their
    scales), padded along the tokens to whole blocks."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, N, L, d]
    k = k.float()
    k = k - k.mean(2, keepdim=True)  # smoothing: the softmax does not see it
    q8, q_scale = quantize_int8_blocks(q)
    k8, k_scale = quantize_int8_blocks(k)
    vt8, v_scale = quantize_fp8_channels_transposed(v)
    q_scale = q_scale * (math.log2(math.e) / math.sqrt(q.shape[-1]))  # the kernel's softmax uses exp2
    return q8, k8, vt8, q_scale, k_scale, v_scale


def quantized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention (non-causal, scale 1/sqrt(d)) with INT8 QKᵀ and FP8 PV: q [B, Lq, N, d], k/v
    [B, Lk, N, d] -> [B, Lq, N, d]. The quantisation is plain torch, so torch.compile fuses it with the
    surrounding block; only the kernel launch is opaque."""
    return _attention_kernel(*quantize_operands(q, k, v), q.shape[1], k.shape[1], q.dtype)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and pipelining of the kernel; the tiles divide BLOCK (the quantisation blocks)."""

    # the fastest of bench_attention.py's sweep on an H200 at all three DiT shapes (645-667 TFLOP/s)
    block_m: int = 64
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 3


DEFAULT_CONFIG = KernelConfig()


def launch_kernel(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, q_scale: torch.Tensor,
                  k_scale: torch.Tensor, v_scale: torch.Tensor, out: torch.Tensor, len_k: int,
                  config: KernelConfig = DEFAULT_CONFIG) -> None:
    """Write attention of the quantized, padded operands into `out` [B, Lq, N, d] (any strides)."""
    if BLOCK % config.block_m or BLOCK % config.block_n:
        raise ValueError(f"kernel tiles must divide {BLOCK}: {config}")
    B, heads, len_q_pad, head_dim = q8.shape
    grid = (len_q_pad // config.block_m, B * heads)
    _quantized_attention_kernel[grid](
        q8, k8, vt8, q_scale, k_scale, v_scale, out, heads, len_k, len_q_pad, k8.shape[2],
        out.stride(0), out.stride(1), out.stride(2), out.shape[1],
        HEAD_DIM=head_dim, SCALE_BLOCK=BLOCK, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        LOG2_P_SCALE=LOG2_P_SCALE, num_warps=config.num_warps, num_stages=config.num_stages)


@torch.library.custom_op("wan_ray::quantized_attention_kernel", mutates_args=())
def _attention_kernel(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, q_scale: torch.Tensor,
                      k_scale: torch.Tensor, v_scale: torch.Tensor, len_q: int, len_k: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """The quantized, padded operands (see `quantized_attention`) -> attention output [B, Lq, N, d]."""
    B, heads, _, head_dim = q8.shape
    out = torch.empty(B, len_q, heads, head_dim, device=q8.device, dtype=dtype)
    launch_kernel(q8, k8, vt8, q_scale, k_scale, v_scale, out, len_k)
    return out


@_attention_kernel.register_fake
def _(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor,
      v_scale: torch.Tensor, len_q: int, len_k: int, dtype: torch.dtype) -> torch.Tensor:
    B, heads, _, head_dim = q8.shape
    return q8.new_empty(B, len_q, heads, head_dim, dtype=dtype)

"""Attention in one place: a named-backend facade plus the module that parallel wrappers replace.

Every attention call in the models goes through `attention(q, k, v)` with the layout `[B, L, N, d]`
(tokens before heads, as the projections produce them). Backends:

- ``"sdpa"`` (default): `torch.nn.functional.scaled_dot_product_attention`; on a GPU torch picks a fused
  kernel (cuDNN, flash or memory-efficient), on a CPU its own implementation.
- ``"cudnn"``, ``"flash"``, ``"efficient"``, ``"math"``: SDPA restricted to one torch kernel. On an H100,
  cuDNN reaches about 570 TFLOP/s at 32k tokens against 371 for torch's flash kernel.
- ``"fa3"``: FlashAttention-3 (`flash_attn_interface`), when it is importable.
- ``"quantized"`` (opt-in, lossy): our Triton kernel with INT8 QKᵀ and FP8 PV
  (`wan_ray.models.quantized_attention`); needs Triton, and a GPU with FP8 tensor cores for speed.

`Attention` is a parameter-free module around the facade. It exists so that `wan_ray.parallel` can swap
the inner attention of a block (Ulysses all-to-all) without touching the model's forward.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

_SDPA_KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
BACKENDS = ("sdpa", *_SDPA_KERNELS, "fa3", "quantized")


def available_backends() -> list[str]:
    """Backends that can run here (kernel support for a given dtype/device is checked at call time)."""
    names = ["sdpa", "math"]
    if torch.cuda.is_available():
        names += ["cudnn", "flash", "efficient"]
        if importlib.util.find_spec("flash_attn_interface") is not None:
            names.append("fa3")
        if importlib.util.find_spec("triton") is not None:
            names.append("quantized")
    return names


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Non-causal softmax attention, scale 1/sqrt(d): q [B, Lq, N, d], k/v [B, Lk, N, d] -> [B, Lq, N, d]."""
    if backend == "fa3":
        from flash_attn_interface import flash_attn_func

        out = flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    if backend == "quantized":
        from .quantized_attention import quantized_attention

        return quantized_attention(q, k, v)
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; accepted: {list(BACKENDS)}")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, N, L, d]
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        with sdpa_kernel(_SDPA_KERNELS[backend]):
            out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """The attention op of one layer; holds no weights, only the backend name."""

    def __init__(self, backend: str = "sdpa"):
        super().__init__()
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


def set_attention_backend(model: nn.Module, backend: str, cross_attention: str | None = None) -> None:
    """Point every `Attention` inside `model` at `backend`, those of the cross-attentions (modules named
    `cross_attn`, as in the DiT) at `cross_attention` if given."""
    for name in (backend, cross_attention or backend):
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; accepted: {list(BACKENDS)}")
    for path, module in model.named_modules():
        if isinstance(module, Attention):
            is_cross = "cross_attn" in path.split(".")
            module.backend = cross_attention if is_cross and cross_attention else backend

"""FP8 linear layers: the quantised product against exact arithmetic, and the DiT forward against bf16."""

import pytest
import torch

from wan_ray.models.dit import WanDiT, cast_dit
from wan_ray.models.fp8 import QUANTISED, FP8Linear, quantize_fp8


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_fp8_linear_is_a_quantised_version_of_the_product():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512)
    x = torch.randn(3, 50, 256)
    exact = x.double() @ linear.weight.double().t() + linear.bias.double()
    out = FP8Linear(linear)(x)
    assert out.shape == (3, 50, 512) and out.dtype == torch.bfloat16
    assert 1e-3 < rel(out, exact) < 0.05  # e4m3 keeps 3 mantissa bits: a few percent on random data
    assert FP8Linear(linear).weight.dtype == torch.float8_e4m3fn


def test_fast_accumulation_is_passed_to_every_product_and_stays_a_quantised_product(monkeypatch):
    torch.manual_seed(0)
    model = cast_dit(WanDiT(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, freq_dim=32).eval(),
                     torch.bfloat16)
    quantize_fp8(model)  # fast accumulation is the default
    seen = []
    scaled_mm = torch._scaled_mm

    def recording(*args, **kwargs):
        seen.append(kwargs["use_fast_accum"])
        return scaled_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    with torch.no_grad():
        model(torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 5, 32))
    assert seen == [True] * (2 * len(QUANTISED))  # every projection of both blocks, once each
    linear = torch.nn.Linear(256, 512)
    x = torch.randn(50, 256)
    exact = x.double() @ linear.weight.double().t() + linear.bias.double()
    assert 1e-3 < rel(FP8Linear(linear)(x), exact) < 0.05
    seen.clear()
    FP8Linear(linear, fast_accum=False)(x)
    assert seen == [False]


def test_sizes_must_suit_fp8_matmuls():
    with pytest.raises(ValueError, match="divisible by 16"):
        FP8Linear(torch.nn.Linear(24, 32))


def test_quantised_dit_stays_within_three_percent_of_bf16():
    torch.manual_seed(0)
    model = WanDiT(dim=256, ffn_dim=512, num_heads=4, num_layers=3, text_dim=64, freq_dim=32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    cast_dit(model, torch.bfloat16)
    x, t, ctx = torch.randn(1, 16, 3, 8, 8), torch.tensor([600.0]), torch.randn(1, 7, 64)
    with torch.no_grad():
        reference = model(x, t, ctx)
        quantize_fp8(model)
        out = model(x, t, ctx)
    for block in model.blocks:
        assert sum(isinstance(m, FP8Linear) for m in block.modules()) == len(QUANTISED)
    assert isinstance(model.head.head, torch.nn.Linear) and not isinstance(model.head.head, FP8Linear)
    assert 0 < rel(out, reference) <= 0.03

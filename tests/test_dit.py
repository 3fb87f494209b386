"""WanDiT: parity with diffusers' WanTransformer3DModel, official shapes and counts, numerics."""

import pytest
import torch

from wan_ray.models.config import PRESETS
from wan_ray.models.dit import (
    FP32_PARAMS,
    WanDiT,
    apply_rope,
    cast_dit,
    dit_config_from_diffusers,
    dit_key_from_diffusers,
    dit_key_to_diffusers,
)

TINY = dict(dim=64, ffn_dim=96, num_heads=4, num_layers=2, text_dim=32, freq_dim=32, text_len=16)


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomised(model):
    """Perturb every parameter so no norm weight is 1 and no bias 0: mapping mistakes cannot hide."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def diffusers_twin(ours: WanDiT):
    from diffusers import WanTransformer3DModel

    cfg = ours.config
    theirs = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm, eps=cfg.eps)
    sd = {dit_key_to_diffusers(k): v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(sd, strict=True)
    return theirs.eval()


@pytest.mark.parametrize("model_type,in_dim,out_dim", [("t2v", 8, 8), ("i2v", 20, 8), ("ti2v", 12, 12)])
def test_parity_with_diffusers(model_type, in_dim, out_dim):
    torch.manual_seed(0)
    ours = randomised(WanDiT(model_type=model_type, in_dim=in_dim, out_dim=out_dim, **TINY)).eval()
    theirs = diffusers_twin(ours)
    B, F, H, W = 2, 3, 6, 8
    x = torch.randn(B, out_dim, F, H, W)
    y = torch.randn(B, in_dim - out_dim, F, H, W) if model_type == "i2v" else None
    L = F * (H // 2) * (W // 2)
    if model_type == "ti2v":  # per-token timesteps, first frame clean
        t = torch.full((B, L), 731.0)
        t[:, : L // F] = 0
    else:
        t = torch.tensor([999.0, 412.0])
    context = torch.randn(B, 11, TINY["text_dim"])
    with torch.no_grad():
        out = ours(x, t, context, y=y)
        # diffusers does not pad the text itself: its pipeline pads with zeros to text_len first
        padded = torch.nn.functional.pad(context, (0, 0, 0, TINY["text_len"] - 11))
        ref = theirs(torch.cat([x, y], 1) if y is not None else x, t, padded, return_dict=False)[0]
    assert out.shape == (B, out_dim, F, H, W) and out.dtype == torch.float32
    assert rel_l2(out, ref) <= 1e-5


def test_diffusers_config_and_keys_round_trip():
    model = WanDiT(**TINY)
    keys = list(model.state_dict())
    assert all(dit_key_from_diffusers(dit_key_to_diffusers(k)) == k for k in keys)
    cfg = dit_config_from_diffusers({"num_attention_heads": 4, "attention_head_dim": 16, "in_channels": 36,
                                     "out_channels": 16, "qk_norm": "rms_norm_across_heads", "ffn_dim": 96,
                                     "num_layers": 2, "text_dim": 32, "freq_dim": 32})
    assert cfg["model_type"] == "i2v" and cfg["dim"] == 64 and cfg["qk_norm"]


@pytest.mark.parametrize("task,params,keys", [
    ("t2v-A14B", 14_288_491_584, 1095),
    ("i2v-A14B", 14_288_901_184, 1095),
    ("ti2v-5B", 4_999_787_712, 825),
])
def test_real_configs_on_meta_have_official_counts(task, params, keys):
    with torch.device("meta"):
        model = WanDiT(**PRESETS[task].dit.to_dict())
    sd = model.state_dict()
    assert len(sd) == keys
    assert sum(p.numel() for p in model.parameters()) == params
    D = PRESETS[task].dit.dim
    assert sd["time_projection.1.weight"].shape == (6 * D, D)
    assert sd["blocks.0.modulation"].shape == (1, 6, D)
    assert sd["head.head.weight"].shape[0] == 4 * PRESETS[task].dit.out_dim


def test_official_config_json_fields_are_accepted():
    cfg = {"_class_name": "WanModel", "_diffusers_version": "0.33.0", "model_type": "t2v",
           "window_size": [-1, -1], **TINY}
    WanDiT(**cfg)
    with pytest.raises(ValueError, match="unknown DiT config keys"):
        WanDiT(**TINY, num_expertz=2)
    with pytest.raises(ValueError, match="global attention"):
        WanDiT(**TINY, window_size=(4, 4))


def test_strict_load_and_short_context_equals_zero_padding():
    torch.manual_seed(1)
    a = randomised(WanDiT(**TINY)).eval()
    b = WanDiT(**TINY).eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x, t = torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0])
    ctx = torch.randn(1, 5, 32)
    with torch.no_grad():
        short = b(x, t, ctx)
        full = b(x, t, torch.nn.functional.pad(ctx, (0, 0, 0, 11)))
    assert torch.equal(short, full)


def test_bad_inputs_raise_clear_errors():
    model = WanDiT(**TINY)
    with pytest.raises(ValueError, match=r"\[B, 16, F, H, W\]"):
        model(torch.randn(1, 8, 2, 4, 4), torch.tensor([1.0]), torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="context must be"):
        model(torch.randn(1, 16, 2, 4, 4), torch.tensor([1.0]), torch.randn(1, 17, 32))
    with pytest.raises(ValueError, match="per-token timesteps"):
        model(torch.randn(1, 16, 2, 4, 4), torch.ones(1, 5), torch.randn(1, 3, 32))


def test_rope_matches_complex_float64_rotation():
    """Independent check: rotate (x_2i + i x_2i+1) by e^{i pos w} with complex128 arithmetic."""
    model = WanDiT(**{**TINY, "dim": 96, "num_heads": 4})  # head dim 24: 12 pairs -> 4/4/4 per axis
    grid = (3, 4, 5)
    cos, sin = model.rope(grid, torch.device("cpu"))
    d = 24
    half = d // 2
    axis = [half - 2 * (half // 3), half // 3, half // 3]
    pos = torch.stack(torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij"), -1).reshape(-1, 3)
    angles = torch.cat([pos[:, i:i + 1].double() * 10000.0 ** (-2 * torch.arange(p).double() / (2 * p))
                        for i, p in enumerate(axis)], dim=1)
    x = torch.randn(2, pos.shape[0], 3, d)
    xc = torch.view_as_complex(x.double().reshape(2, -1, 3, half, 2))
    ref = torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)[None, :, None]).flatten(-2)
    assert torch.allclose(apply_rope(x, cos, sin), ref.float(), atol=1e-5)


def test_cast_keeps_precision_critical_weights_in_float32():
    torch.manual_seed(2)
    model = randomised(WanDiT(**TINY)).eval()
    x, t, ctx = torch.randn(1, 16, 2, 4, 4), torch.tensor([800.0]), torch.randn(1, 6, 32)
    with torch.no_grad():
        ref = model(x, t, ctx)
        cast_dit(model, torch.bfloat16)
        out = model(x, t, ctx)
    for name, p in model.named_parameters():
        expected = torch.float32 if any(s in name for s in FP32_PARAMS) else torch.bfloat16
        assert p.dtype == expected, name
    assert out.dtype == torch.float32
    assert rel_l2(out, ref) < 0.05  # bf16 matmuls, float32 residual stream


def test_init_weights_zero_head_gives_zero_output():
    """Training starts from a zero velocity, as in the official initialisation."""
    model = WanDiT(**TINY)
    model.init_weights()
    out = model(torch.randn(1, 16, 1, 2, 2), torch.tensor([10.0]), torch.randn(1, 2, 32))
    assert torch.count_nonzero(out) == 0


def test_attention_backends_can_differ_between_self_and_cross_attention():
    from wan_ray.models.attention import set_attention_backend

    torch.manual_seed(0)
    model = WanDiT(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, freq_dim=32).eval()
    x, t, ctx = torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 5, 32)
    with torch.no_grad():
        reference = model(x, t, ctx)
        set_attention_backend(model, "math", cross_attention="sdpa")
        out = model(x, t, ctx)
    assert [b.self_attn.attn.backend for b in model.blocks] == ["math", "math"]
    assert [b.cross_attn.attn.backend for b in model.blocks] == ["sdpa", "sdpa"]
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    set_attention_backend(model, "cudnn")  # without cross_attention: every module
    assert {b.cross_attn.attn.backend for b in model.blocks} == {"cudnn"}
    with pytest.raises(ValueError, match="unknown attention backend 'bogus'"):
        set_attention_backend(model, "math", cross_attention="bogus")

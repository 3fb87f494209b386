"""Wan VAEs 2.1 / 2.2: parity with diffusers' AutoencoderKLWan and the official code, official shapes and
counts, causal chunking, errors, and the diffusers key/config mapping."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from wan_ray.models.vae import (
    LATENTS_MEAN_21,
    LATENTS_MEAN_22,
    LATENTS_STD_21,
    LATENTS_STD_22,
    CausalCache,
    WanVAE21,
    WanVAE22,
    build_vae,
    compile_norms,
    fold_time_into_channels,
    to_uint8,
    vae_config_from_diffusers,
    vae_state_dict_from_diffusers,
    vae_state_dict_to_diffusers,
)
from wan_ray.models.vae_blocks import CausalConv3d, RMSNorm

# Tiny configs with the released structure (4 stages, 2 res blocks, temporal flags) and made-up statistics.
_ARCH = dict(dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
TINY = {
    "2.1": dict(_ARCH, z_dim=4, latents_mean=[0.1 * i - 0.2 for i in range(4)],
                latents_std=[1 + 0.1 * i for i in range(4)]),
    "2.2": dict(_ARCH, dec_dim=12, z_dim=6, latents_mean=[0.1 * i - 0.2 for i in range(6)],
                latents_std=[1 + 0.1 * i for i in range(6)]),
}
SIZE = {"2.1": (16, 24), "2.2": (32, 48)}  # latent 2×3 for both
STRIDE = {"2.1": 8, "2.2": 16}


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_weights(sd, seed=1):
    """Weights that keep activations O(1): conv weights ~ N(0, 1/fan_in), gains 1 ± 0.2, biases ± 0.1. No
    zero or identity layer (e.g. the zero-initialised attention `proj`) can hide a mapping mistake."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(sd):
        shape = sd[key].shape
        if key.endswith("gamma"):
            out[key] = 1 + 0.2 * torch.randn(shape, generator=g)
        elif key.endswith("bias"):
            out[key] = 0.1 * torch.randn(shape, generator=g)
        else:
            out[key] = torch.randn(shape, generator=g) / shape[1:].numel() ** 0.5
    return out


def tiny_vae(version):
    vae = build_vae(version, **TINY[version]).eval()
    vae.load_state_dict(random_weights(vae.state_dict()), strict=True)
    return vae


def inputs(version, batch=1):
    g = torch.Generator().manual_seed(7)
    h, w = SIZE[version]
    video = torch.rand(batch, 3, 9, h, w, generator=g) * 2 - 1
    s = STRIDE[version]
    latent = torch.randn(batch, TINY[version]["z_dim"], 3, h // s, w // s, generator=g)
    return video, latent


def diffusers_config(version, **kw):
    shared = ("z_dim", "dim_mult", "num_res_blocks", "temperal_downsample", "latents_mean", "latents_std")
    cfg = {k: kw[k] for k in shared}
    cfg["base_dim"] = kw["dim"]
    if version == "2.2":
        cfg.update(decoder_base_dim=kw["dec_dim"], is_residual=True, in_channels=12, out_channels=12,
                   patch_size=2, scale_factor_spatial=16)
    return cfg


# --- numerical parity ---


@pytest.mark.parametrize("version,batch", [("2.1", 2), ("2.2", 1)])
def test_parity_with_diffusers(version, batch):
    from diffusers import AutoencoderKLWan

    theirs = AutoencoderKLWan(**diffusers_config(version, **TINY[version])).eval()
    theirs.load_state_dict(random_weights(theirs.state_dict(), seed=3), strict=True)
    kind, kwargs = vae_config_from_diffusers(dict(theirs.config))
    assert kind == version
    ours = build_vae(kind, **kwargs).eval()
    ours.load_state_dict(vae_state_dict_from_diffusers(theirs.state_dict()), strict=True)

    video, latent = inputs(version, batch)
    z = TINY[version]["z_dim"]
    mean = torch.tensor(TINY[version]["latents_mean"]).view(1, z, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(TINY[version]["latents_std"]).view(1, z, 1, 1, 1)
    with torch.no_grad():
        # diffusers returns the raw posterior; its pipelines normalise with (μ - mean) · (1 / std).
        ref = (theirs.encode(video).latent_dist.mean - mean) * inv_std
        out = ours.encode(video)
        assert out.shape == ref.shape == (batch, z, 3, *latent.shape[3:]) and out.dtype == torch.float32
        assert ref.std() > 0.1  # not degenerate
        assert rel_l2(out, ref) <= 2e-5

        ref = theirs.decode(latent / inv_std + mean).sample
        out = ours.decode(latent)
        assert out.shape == ref.shape == (batch, 3, 9, *SIZE[version]) and out.dtype == torch.float32
        assert ref.std() > 0.1 and (ref.abs() == 1).float().mean() < 0.2  # mostly unclamped
        assert rel_l2(out, ref) <= 2e-5


# Produced by the official `vae2_1.py` / `vae2_2.py` (`WanVAE_.encode/decode(x, [mean, 1/std])`, then
# `clamp(-1, 1)`) with TINY, `random_weights(seed=1)` and `inputs(version)`: sums and a few elements.
OFFICIAL = {
    "2.1": {"enc_sum": 5.4127, "enc_abs": 16.8043, "enc_first": [0.142108, 0.228508, 0.167107, -0.035455],
            "dec_sum": -1272.943, "dec_abs": 3608.2512,
            "dec_first": [0.083994, -0.116474, 0.296366, 0.281953]},
    "2.2": {"enc_sum": -7.3176, "enc_abs": 30.4405, "enc_first": [0.354457, 1.011104, 0.383215, 0.539352],
            "dec_sum": -1805.0066, "dec_abs": 16777.875,
            "dec_first": [0.170114, -0.033673, -0.015569, -0.21942]},
}


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_matches_official_reference_numbers(version):
    vae = tiny_vae(version)
    video, latent = inputs(version)
    ref = OFFICIAL[version]
    with torch.no_grad():
        enc, dec = vae.encode(video), vae.decode(latent)
    got = {}
    for name, out in (("enc", enc), ("dec", dec)):
        got |= {f"{name}_sum": out.sum().item(), f"{name}_abs": out.abs().sum().item(),
                f"{name}_first": out.flatten()[:4].tolist()}
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_chunking_is_causal(version):
    """The first latent frames depend only on the first pixel frames, and vice versa: chunk boundaries and the
    cache carry exactly what one causal pass would see."""
    vae = tiny_vae(version)
    video, latent = inputs(version)
    # Up to float rounding: CPU convolution kernels may pick another summation order for another length.
    same = dict(rtol=0.0, atol=1e-5)
    with torch.no_grad():
        encoded = vae.encode(video)
        torch.testing.assert_close(encoded[:, :, :2], vae.encode(video[:, :, :5]), **same)
        decoded = vae.decode(latent)
        torch.testing.assert_close(decoded[:, :, :5], vae.decode(latent[:, :, :2]), **same)
        # ...and later chunks do see earlier ones through the cache (two chunks back here).
        changed = video.clone()
        changed[:, :, 0] = 0
        assert (vae.encode(changed)[:, :, 2] - encoded[:, :, 2]).abs().max() > 1e-3
        changed = latent.clone()
        changed[:, :, 0] = 0
        assert (vae.decode(changed)[:, :, 5:] - decoded[:, :, 5:]).abs().max() > 1e-3


def test_narrowing_conv_carries_partial_outputs():
    """A causal conv that narrows the width carries float32 partial sums of its next kt - 1 output frames
    between chunks, not its last input frames: the same outputs as one causal conv over the whole stream,
    from a smaller cache that is updated in place."""
    torch.manual_seed(0)
    conv = CausalConv3d(6, 2, 3, padding=1).double()
    video = torch.randn(1, 6, 9, 5, 7, dtype=torch.float64)
    whole = F.conv3d(F.pad(video, (0, 0, 0, 0, 2, 0)), conv.weight, conv.bias, padding=(0, 1, 1))
    cache = CausalCache()
    with torch.no_grad():
        chunks = [video[:, :, :1], video[:, :, 1:5], *video[:, :, 5:].split(1, dim=2)]  # as encode, decode
        chunks = [conv(chunk, cache) for chunk in chunks]
        assert conv.caches_outputs and cache.frames[conv].shape == (1, 2, 2, 5, 7)
        address = cache.frames[conv].data_ptr()
        conv(video[:, :, :1], cache)
        assert cache.frames[conv].data_ptr() == address
        bf16, bf16_cache = conv.to(torch.bfloat16), CausalCache()
        bf16(video[:, :, :1].bfloat16(), bf16_cache)
        assert bf16_cache.frames[bf16].dtype == torch.float32  # bf16 taps, float32 sums
    torch.testing.assert_close(torch.cat(chunks, dim=2), whole, rtol=0.0, atol=1e-12)
    assert not CausalConv3d(2, 6, 3, padding=1).caches_outputs  # widening: inputs are the smaller cache


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_cache_keeps_only_two_owned_frames(version):
    """Between chunks the cache holds at most 2 frames per layer, in tensors that own their memory (a view
    would keep a whole chunk's activation alive)."""
    vae = tiny_vae(version)
    video, latent = inputs(version)
    runs = [(vae.encoder, [vae.pack(c) for c in (video[:, :, :1], video[:, :, 1:5], video[:, :, 5:9])]),
            (vae.decoder, [latent[:, :, i : i + 1] for i in range(latent.shape[2])])]
    with torch.no_grad():
        for part, chunks in runs:
            cache = CausalCache()
            full = {}  # layer -> address of its cache once it holds two frames
            for chunk in chunks:
                part(chunk, cache)
                cache.first_chunk = False
                kept = list(cache.frames.values())
                assert kept and all(t.shape[2] <= 2 for t in kept)
                assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in kept)
                # a full cache is updated in place: the decoder's one-frame chunks allocate no new cache
                for layer, frames in cache.frames.items():
                    if layer in full and isinstance(layer, CausalConv3d):
                        assert frames.data_ptr() == full[layer]
                    if frames.shape[2] == 2:
                        full[layer] = frames.data_ptr()
            assert full


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_decode_uint8_is_decode_then_to_uint8(version):
    vae = tiny_vae(version)
    _, latent = inputs(version, batch=2)
    with torch.no_grad():
        frames = vae.decode_uint8(latent)  # [B, F, H, W, 3]
        video = vae.decode(latent)  # [B, 3, F, H, W]
    assert frames.dtype == torch.uint8 and frames.shape == (2, 9, *video.shape[3:], 3)
    for b in range(2):
        assert (frames[b].numpy() == to_uint8(video[b])).all()


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_bfloat16(version):
    vae = tiny_vae(version)
    video, latent = inputs(version)
    with torch.no_grad():
        enc32, dec32 = vae.encode(video), vae.decode(latent)
        vae.to(torch.bfloat16)
        enc16, dec16 = vae.encode(video.bfloat16()), vae.decode(latent.bfloat16())
    assert enc16.dtype == dec16.dtype == torch.float32
    assert rel_l2(enc16, enc32) < 0.05 and rel_l2(dec16, dec32) < 0.05


# --- official shapes, counts and loading ---

# Spec §7.3-7.4: parameters (millions: all, encoder, decoder), keys, causal convs (encoder, decoder), stride.
REAL = {
    "2.1": dict(cls=WanVAE21, params=(126.9, 53.6, 73.3), keys=194, convs=(26, 33), stride=(4, 8, 8)),
    "2.2": dict(cls=WanVAE22, params=(704.7, 149.6, 555.0), keys=196, convs=(26, 34), stride=(4, 16, 16)),
}
SHAPES = {
    "2.1": {
        "encoder.conv1.weight": (96, 3, 3, 3, 3),
        "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
        "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
        "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
        "encoder.middle.1.norm.gamma": (384, 1, 1),
        "encoder.head.0.gamma": (384, 1, 1, 1),
        "encoder.head.2.weight": (32, 384, 3, 3, 3),
        "conv1.weight": (32, 32, 1, 1, 1),
        "conv2.weight": (16, 16, 1, 1, 1),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
    },
    "2.2": {
        "encoder.conv1.weight": (160, 12, 3, 3, 3),
        "encoder.head.2.weight": (96, 640, 3, 3, 3),
        "conv1.weight": (96, 96, 1, 1, 1),
        "conv2.weight": (48, 48, 1, 1, 1),
        "decoder.conv1.weight": (1024, 48, 3, 3, 3),
        "decoder.middle.1.to_qkv.weight": (3072, 1024, 1, 1),
        "decoder.upsamples.0.upsamples.3.time_conv.weight": (2048, 1024, 3, 1, 1),
        "decoder.upsamples.2.upsamples.0.shortcut.weight": (512, 1024, 1, 1, 1),
        "decoder.head.2.weight": (12, 256, 3, 3, 3),
    },
}


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_real_config_counts_and_shapes(version):
    real = REAL[version]
    with torch.device("meta"):
        vae = real["cls"]()
    sd = vae.state_dict()
    millions = lambda m: round(sum(p.numel() for p in m.parameters()) / 1e6, 1)
    assert (millions(vae), millions(vae.encoder), millions(vae.decoder)) == real["params"]
    assert len(sd) == real["keys"]
    assert {k: tuple(sd[k].shape) for k in SHAPES[version]} == SHAPES[version]
    convs = tuple(sum(isinstance(m, CausalConv3d) for m in p.modules()) for p in (vae.encoder, vae.decoder))
    assert convs == real["convs"]
    assert vae.stride == real["stride"]
    assert not any("mean" in k or "std" in k for k in sd)  # statistics are not state
    stats = (LATENTS_MEAN_21, LATENTS_STD_21) if version == "2.1" else (LATENTS_MEAN_22, LATENTS_STD_22)
    assert (vae.latents_mean, vae.latents_std) == stats


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_strict_load_and_missing_key(version):
    vae = tiny_vae(version)
    sd = random_weights(vae.state_dict(), seed=5)
    vae.load_state_dict(sd, strict=True)
    assert torch.equal(vae.state_dict()["decoder.head.2.weight"], sd["decoder.head.2.weight"])
    del sd["decoder.head.2.bias"]
    with pytest.raises(RuntimeError, match=r"decoder\.head\.2\.bias"):
        build_vae(version, **TINY[version]).load_state_dict(sd, strict=True)


# --- errors ---


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_bad_shapes_are_rejected(version):
    vae = tiny_vae(version)
    h, w = SIZE[version]
    s = 8 if version == "2.1" else 16
    z = TINY[version]["z_dim"]
    cases = [
        (torch.zeros(1, 3, 8, h, w), "4n\\+1 frames"),
        (torch.zeros(1, 3, 9, h + s // 2, w), f"divisible by {s}"),
        (torch.zeros(1, 4, 9, h, w), r"\[B, 3, F, H, W\]"),
        (torch.zeros(3, 9, h, w), r"\[B, 3, F, H, W\]"),
        (torch.zeros(1, 3, 9, h, w, dtype=torch.long), "floating-point"),
    ]
    for video, message in cases:
        with pytest.raises(ValueError, match=message):
            vae.encode(video)
    for latent in (torch.zeros(1, z + 1, 2, 2, 3), torch.zeros(z, 2, 2, 3), torch.zeros(1, z, 0, 2, 3)):
        with pytest.raises(ValueError, match=rf"\[B, {z}, T, h, w\]"):
            vae.decode(latent)


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="two stages must downsample time"):
        WanVAE21(dim=8, temperal_downsample=[False, False, True])
    with pytest.raises(ValueError, match="one flag per downsampling stage"):
        WanVAE21(dim=8, temperal_downsample=[False, True])
    with pytest.raises(ValueError, match="attn_scales must be empty"):
        WanVAE22(dim=8, dec_dim=8, attn_scales=[1.0])
    with pytest.raises(ValueError, match="pass latents_mean"):
        WanVAE21(dim=8, z_dim=4)
    with pytest.raises(ValueError, match="needs z_dim=4 values"):
        WanVAE21(dim=8, z_dim=4, latents_mean=[0.0] * 4, latents_std=[1.0] * 3)
    with pytest.raises(ValueError, match="unknown VAE version"):
        build_vae("2.3")


# --- diffusers mapping ---


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_release_layouts_map_both_ways(version):
    """On the released architectures (meta device): our keys map onto exactly diffusers' keys and shapes, and
    back; the release config.json maps onto our defaults."""
    from diffusers import AutoencoderKLWan

    release = {} if version == "2.1" else dict(  # diffusers' defaults are the 2.1 release
        base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
        patch_size=2, scale_factor_spatial=16, latents_mean=list(LATENTS_MEAN_22),
        latents_std=list(LATENTS_STD_22))
    with torch.device("meta"):
        theirs = AutoencoderKLWan(**release)
        ours = REAL[version]["cls"]()
    theirs_sd, ours_sd = theirs.state_dict(), ours.state_dict()
    mapped = vae_state_dict_to_diffusers(ours_sd)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in theirs_sd.items()}
    back = vae_state_dict_from_diffusers(theirs_sd)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in ours_sd.items()}
    assert vae_state_dict_from_diffusers(mapped).keys() == ours_sd.keys()

    kind, kwargs = vae_config_from_diffusers({"_class_name": "AutoencoderKLWan", **dict(theirs.config)})
    assert kind == version
    defaults = REAL[version]["cls"]
    with torch.device("meta"):
        rebuilt = defaults(**kwargs)
    assert rebuilt.latents_mean == ours.latents_mean and rebuilt.latents_std == ours.latents_std
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in ours_sd.items()}


def test_converter_and_config_errors():
    sd = tiny_vae("2.1").state_dict()
    with pytest.raises(ValueError, match="not part of a Wan VAE state dict in the diffusers layout"):
        vae_state_dict_from_diffusers({**vae_state_dict_to_diffusers(sd), "decoder.x.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a full Wan VAE"):
        vae_state_dict_to_diffusers({"foo.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown AutoencoderKLWan config keys"):
        vae_config_from_diffusers({"base_dim": 8, "num_frames": 3})
    with pytest.raises(ValueError, match="in_channels=12"):
        vae_config_from_diffusers({"is_residual": True, "in_channels": 3})
    with pytest.raises(ValueError, match="scale_factor_spatial=8"):
        vae_config_from_diffusers({"scale_factor_spatial": 16})


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_a_single_frame_encodes_to_the_first_latent_frame_of_its_clip(version):
    """TI2V encodes the conditioning image alone: one frame must give one latent frame, the same one a
    longer clip starting with that frame gives (the encoder is causal)."""
    from wan_ray.models.vae import build_vae

    config = dict(dim=8, z_dim=16 if version == "2.1" else 48, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    if version == "2.2":
        config.update(dec_dim=8, latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
    torch.manual_seed(0)
    vae = build_vae(version, **config).eval()
    clip = torch.rand(1, 3, 5, 64, 64) * 2 - 1
    with torch.no_grad():
        alone = vae.encode(clip[:, :, :1])
        together = vae.encode(clip)
    assert alone.shape[2] == 1
    assert torch.allclose(alone, together[:, :, :1], atol=1e-5)


def test_compiled_norms_decode_the_same_video_with_few_graphs():
    """compile_norms fuses each RMSNorm with its SiLU (torch.compile, dynamic shapes): the same values, and
    few enough graphs for all widths and stages that none falls back to eager at the recompilation limit."""
    torch._dynamo.reset()
    counters.clear()
    vae = tiny_vae("2.1")
    _, latent = inputs("2.1")
    with torch.no_grad():
        eager = vae.decode(latent)
        compile_norms(vae)
        compiled = vae.decode(latent)
    torch.testing.assert_close(compiled, eager, rtol=0.0, atol=1e-5)
    norms = sum(isinstance(m, RMSNorm) for m in vae.decoder.modules())
    assert counters["stats"]["calls_captured"] > 0
    assert counters["stats"]["unique_graphs"] < min(norms, torch._dynamo.config.recompile_limit)


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_time_folded_into_channels_gives_the_same_video_and_latents(version, monkeypatch):
    """fold_time_into_channels runs one-output-frame causal convs as 2-D convs, on channels-last frames in the
    decoder's per-frame stages: the same sums."""
    vae = tiny_vae(version)
    video, latent = inputs(version)
    with torch.no_grad():
        decoded, encoded = vae.decode(latent), vae.encode(video)
        fold_time_into_channels(vae)
        folded = []  # (kt, channels last) of each folded call
        fold = CausalConv3d._folded
        monkeypatch.setattr(CausalConv3d, "_folded", lambda self, past, x: folded.append(
            (self.kernel_size[0], not x.is_contiguous())) or fold(self, past, x))
        torch.testing.assert_close(vae.decode(latent), decoded, rtol=0.0, atol=1e-5)
        torch.testing.assert_close(vae.encode(video), encoded, rtol=0.0, atol=1e-5)
    assert {kt for kt, _ in folded} == {1, 3}  # 1x1x1 and 3-tap convs alike
    assert sum(channels_last for _, channels_last in folded) > 50 and len(folded) > 100

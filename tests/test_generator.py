"""The in-process Generator end to end on tiny random releases of each task."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from releases import SIZE, write_release

import wan_ray
from wan_ray.sampling.request import RequestError


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    root = tmp_path_factory.mktemp("releases")
    return {task: write_release(root / task, task) for task in ("t2v", "i2v", "ti2v")}


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "first.png"
    gradient = np.linspace(0, 255, 96 * 80 * 3).reshape(80, 96, 3).astype(np.uint8)  # 96x80, 6:5
    Image.fromarray(gradient).save(path)
    return str(path)


def test_t2v_frames_of_the_requested_size_and_count(releases):
    gen = wan_ray.Generator(releases["t2v"], device="cpu")
    steps = []
    video = gen.generate("a red cat runs", frames=5, seed=1, on_step=lambda done, total: steps.append(done))
    assert video.frames.shape == (5, SIZE, SIZE, 3) and video.frames.dtype == np.uint8
    assert steps == [1, 2, 3, 4]  # the release's 4 default steps, across both experts
    assert [s.expert for s in video.plan.segments] == ["high", "low"]
    assert set(video.timings) == {"text_encode", "denoise_high", "denoise_low", "decode"}
    again = gen.generate("a red cat runs", frames=5, seed=1)
    other = gen.generate("a red cat runs", frames=5, seed=2)
    assert np.array_equal(video.frames, again.frames)
    assert not np.array_equal(video.frames, other.frames)
    assert video.frames.std() > 0


def test_i2v_takes_its_size_from_the_image(releases, image_file):
    gen = wan_ray.Generator(releases["i2v"], device="cpu")
    video = gen.generate("a dog jumps", image=image_file, size="64*64", frames=5, seed=0)
    # area 64*64 at the image's 6:5 aspect, on the 16-pixel grid (VAE stride 8 x patch 2)
    assert video.frames.shape == (5, 48, 64, 3)
    with pytest.raises(RequestError, match="image is required"):
        gen.generate("a dog jumps")


def test_ti2v_with_and_without_an_image(releases, image_file):
    gen = wan_ray.Generator(releases["ti2v"], device="cpu")
    t2v = gen.generate("green grass", frames=5, seed=0)
    assert t2v.frames.shape == (5, SIZE, SIZE, 3)
    i2v = gen.generate("green grass", image=image_file, frames=5, seed=0)
    assert i2v.frames.shape[0] == 5 and i2v.frames.shape[1] % 32 == 0 and i2v.frames.shape[2] % 32 == 0


@pytest.mark.parametrize("fields,match", [
    (dict(prompt="a cat", frames=6), r"4n\+1"),
    (dict(prompt="a cat", size="128*128"), r"128\*128 is not supported .* accepted: 64\*64"),
    (dict(prompt="   "), "non-empty"),
    (dict(prompt="a cat", steps=0), "steps must be >= 1"),
])
def test_invalid_requests_raise_before_any_work(releases, fields, match):
    gen = wan_ray.Generator(releases["t2v"], device="cpu")
    with pytest.raises(RequestError, match=match):
        gen.generate(**fields)


def test_saved_mp4_decodes_to_the_frames(releases, tmp_path):
    from wan_ray.io.media import probe_mp4

    gen = wan_ray.Generator(releases["t2v"], device="cpu")
    video = gen.generate("a blue dog", frames=5, seed=3)
    info = probe_mp4(video.save(tmp_path / "v.mp4").read_bytes())
    assert (info["frames"], info["width"], info["height"], info["codec"]) == (5, SIZE, SIZE, "h264")


def test_attention_backend_reaches_every_expert_and_bad_names_are_errors(releases):
    request = dict(frames=5, seed=0, steps=4)
    default = wan_ray.Generator(releases["t2v"], device="cpu").generate("a red cat", **request)
    gen = wan_ray.Generator(releases["t2v"], device="cpu", attention="math")
    backends = {m.backend for d in gen.denoisers for m in d.model.modules() if hasattr(m, "backend")}
    assert backends == {"math"}
    video = gen.generate("a red cat", **request)
    # another exact kernel: the same video up to float rounding
    assert np.abs(video.frames.astype(int) - default.frames.astype(int)).max() <= 2
    with pytest.raises(ValueError, match=r"unknown attention backend 'sage'; accepted: \[.*'quantized'\]"):
        wan_ray.Generator(releases["t2v"], device="cpu", attention="sage")


def test_quantized_attention_goes_to_the_self_attention_and_cudnn_takes_the_text_keys_on_cuda():
    from wan_ray.models.dit import WanDiT
    from wan_ray.stages.denoise import use_attention

    model = WanDiT(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, freq_dim=32)
    use_attention(model, "quantized", "cuda:0")
    assert [(b.self_attn.attn.backend, b.cross_attn.attn.backend) for b in model.blocks] == [
        ("quantized", "cudnn")] * 2
    use_attention(model, "quantized", "cpu")  # no cuDNN here: the one backend everywhere
    assert {b.cross_attn.attn.backend for b in model.blocks} == {"quantized"}
    use_attention(model, "flash", "cuda")  # any other backend: everywhere
    assert {b.cross_attn.attn.backend for b in model.blocks} == {"flash"}


def test_models_compute_in_bf16_on_a_gpu_and_float32_on_a_cpu(releases):
    from wan_ray.stages.base import default_dtype

    assert default_dtype("cuda") is torch.bfloat16 and default_dtype("cuda:1") is torch.bfloat16
    assert default_dtype("cpu") is torch.float32
    gen = wan_ray.Generator(releases["t2v"], device="cpu", dtype=torch.bfloat16)
    assert gen.decoder.vae.conv2.weight.dtype is torch.bfloat16  # the decoder follows the Generator's dtype
    assert wan_ray.Generator(releases["t2v"], device="cpu").decoder.vae.conv2.weight.dtype is torch.float32


def test_bf16_decode_stage_makes_the_float32_frames_to_within_a_few_levels():
    """The decode stage's bf16 VAE against its float32 one, on latents of rendered videos (bright and dark
    backgrounds) encoded by the bundled tiny model's trained VAE: a fraction of a level of 255 on average,
    far below the VAE's own reconstruction error."""
    from wan_ray.models.checkpoint import open_checkpoint
    from wan_ray.sampling.loop import start_state
    from wan_ray.sampling.plan import make_plan
    from wan_ray.stages import Decoder
    from wan_ray.tiny.data import render, sample_scenes

    checkpoint = open_checkpoint("tiny")
    exact, fast = Decoder(checkpoint, "cpu"), Decoder(checkpoint, "cpu", torch.bfloat16)
    assert fast.vae.conv2.weight.dtype is torch.bfloat16
    videos = render(sample_scenes(4, seed=3), frames=9, size=64)  # [4, 3, 9, 64, 64] in [-1, 1]
    latents = exact.vae.encode(videos)
    plan = make_plan(1, 1.0, latent_shape=tuple(latents.shape[1:]))
    for latent, video in zip(latents, videos, strict=True):
        state = dataclasses.replace(start_state(plan, latent[None]), step=plan.num_steps)  # finished
        reference = exact.frames(state).astype(float)
        frames = fast.frames(state).astype(float)
        assert frames.shape == reference.shape == (9, 64, 64, 3)
        error = np.abs(frames - reference)
        assert error.mean() < 0.1 and error.max() <= 8
        source = (video.permute(1, 2, 3, 0).numpy() + 1) * 127.5  # [F, H, W, 3] in levels
        assert error.mean() < 0.2 * np.abs(reference - source).mean()

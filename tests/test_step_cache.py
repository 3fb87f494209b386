"""Step caching: threshold 0 is exact, a larger one skips forwards, and videos never share a cache."""

import pytest
import torch
from releases import write_release

import wan_ray
from wan_ray.models.dit import WanDiT
from wan_ray.sampling.cache import CachedStack, apply_step_cache, reset_step_cache
from wan_ray.sampling.loop import sample, seeded_noise
from wan_ray.sampling.plan import make_plan

DIT = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=16, freq_dim=16, text_len=8)


def run(model, steps=12):
    torch.manual_seed(0)
    ctx, null = torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    return sample({"single": model}, seeded_noise((1, 16, 2, 4, 4), 1), ctx, null, make_plan(steps, 5.0))


def model():
    torch.manual_seed(3)
    m = WanDiT(**DIT).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_threshold_zero_is_exact_and_a_larger_one_skips():
    reference = run(model())
    exact = apply_step_cache(model(), 0.0)
    assert torch.equal(run(exact), reference)
    assert exact.stack.skipped == 0 and exact.stack.computed == 12
    cached = apply_step_cache(model(), 0.5)
    out = run(cached)
    stack: CachedStack = cached.stack
    assert stack.skipped > 0 and stack.computed + stack.skipped == 12
    assert not torch.equal(out, reference)
    assert ((out - reference).norm() / reference.norm()) < 0.5  # an approximation, not noise
    assert len(cached.state_dict()) == len(model().state_dict())  # weights untouched


def test_a_new_video_never_replays_the_last_one():
    cached = apply_step_cache(model(), 10.0)  # would skip everything it could
    run(cached, steps=3)
    reset_step_cache(cached)
    run(cached, steps=3)
    assert cached.stack.computed == 2  # the first step of each video


def test_bad_threshold():
    with pytest.raises(ValueError, match=">= 0"):
        apply_step_cache(model(), -1)


def test_generator_option(tmp_path):
    release = write_release(tmp_path / "t2v", "t2v")
    plain = wan_ray.Generator(release, device="cpu").generate("a red cat", frames=5, seed=0, steps=8)
    gen = wan_ray.Generator(release, device="cpu", step_cache=0.5)
    video = gen.generate("a red cat", frames=5, seed=0, steps=8)
    stacks = [d.model.stack for d in gen.denoisers]
    assert sum(s.skipped for s in stacks) > 0
    assert video.frames.shape == plain.frames.shape

"""Plans, resumable segments, guidance and request validation."""

import multiprocessing as mp

import pytest
import torch

from wan_ray.models.config import PRESETS
from wan_ray.models.dit import WanDiT
from wan_ray.sampling.loop import (
    DenoiseState,
    ImageCondition,
    guided_velocity,
    model_timesteps,
    run_segment,
    sample,
    seeded_noise,
    start_state,
)
from wan_ray.sampling.plan import Segment, latent_shape, make_plan
from wan_ray.sampling.request import RequestError, frames_for_seconds, make_request, parse_size, safe_id
from wan_ray.sampling.schedulers import make_scheduler

TINY = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=16, freq_dim=16, text_len=8)


def tiny_dit(seed, **overrides):
    torch.manual_seed(seed)
    model = WanDiT(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # make the head non-zero and the experts different
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


class Recorder(torch.nn.Module):
    """Wraps an expert and records (name, timestep, batch) of each call."""

    def __init__(self, name, inner, log):
        super().__init__()
        self.name, self.inner, self.log = name, inner, log
        self.config = inner.config

    def forward(self, x, t, context, y=None):
        self.log.append((self.name, float(t.flatten()[0]), x.shape[0]))
        return self.inner(x, t, context, y=y)


def test_two_expert_routing_and_guidance_follow_the_official_rule():
    """Official loop: high-noise expert and guide_scale[1] while t >= boundary*1000, else low and [0]."""
    plan = make_plan(40, 12.0, "unipc", boundary=0.875, guide_scale=(3.0, 4.0))
    timesteps = make_scheduler("unipc", 40, 12.0).timesteps.tolist()
    expected = [("high" if t >= 875 else "low", 4.0 if t >= 875 else 3.0) for t in timesteps]
    got = [(seg.expert, seg.guide_scale) for seg in plan.segments for _ in seg.steps]
    assert got == expected
    assert [len(s.steps) for s in plan.segments] == [26, 14]
    i2v = make_plan(40, 5.0, boundary=0.9, guide_scale=(3.5, 3.5))
    assert [len(s.steps) for s in i2v.segments] == [15, 25]


def test_sample_calls_each_expert_on_its_steps_with_its_scale():
    log = []
    experts = {"high": Recorder("high", tiny_dit(0), log), "low": Recorder("low", tiny_dit(1), log)}
    plan = make_plan(6, 12.0, boundary=0.875, guide_scale=(2.0, 3.0))
    noise = seeded_noise((1, 16, 2, 4, 4), 7)
    ctx, null = torch.randn(1, 5, 16), torch.randn(1, 3, 16)
    sample(experts, noise, ctx, null, plan, batched_cfg=False)
    calls = [(name, t) for name, t, _ in log]
    expected = []
    for seg in plan.segments:
        for k in seg.steps:  # two passes per step: cond then uncond
            expected += [(seg.expert, float(plan.timesteps[k]))] * 2
    assert calls == expected


def test_batched_cfg_equals_two_passes():
    model = tiny_dit(2)
    x, t = torch.randn(1, 16, 2, 4, 4), torch.tensor([600.0])
    ctx, null = torch.randn(1, 6, 16), torch.randn(1, 2, 16)
    with torch.no_grad():
        a = guided_velocity(model, x, t, ctx, null, 4.5, batched=True)
        b = guided_velocity(model, x, t, ctx, null, 4.5, batched=False)
        c = model(x, t, ctx)
        u = model(x, t, null)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(b, u + 4.5 * (c - u), atol=1e-6)


def _continue_in_child(state_bytes, model_state, ctx, null, queue):
    """Runs in a fresh (spawned) process: rebuild the low-noise expert and finish the loop."""
    model = WanDiT(**TINY).eval()
    model.load_state_dict(model_state)
    state = DenoiseState.from_bytes(state_bytes)
    queue.put(run_segment(state, state.plan.segment("low"), model, ctx, null).to_bytes())


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_two_segments_in_two_processes_equal_one_loop(solver):
    high, low = tiny_dit(3), tiny_dit(4)
    plan = make_plan(8, 12.0, solver, boundary=0.875, guide_scale=(3.0, 4.0))
    assert [s.expert for s in plan.segments] == ["high", "low"]
    noise = seeded_noise((1, 16, 3, 4, 4), 11)
    ctx, null = torch.randn(1, 5, 16), torch.randn(1, 8, 16)
    whole = sample({"high": high, "low": low}, noise, ctx, null, plan)

    first = run_segment(start_state(plan, noise), plan.segment("high"), high, ctx, null)
    spawn = mp.get_context("spawn")
    queue = spawn.Queue()
    child = spawn.Process(target=_continue_in_child,
                          args=(first.to_bytes(), low.state_dict(), ctx, null, queue))
    child.start()
    result = DenoiseState.from_bytes(queue.get(timeout=120))
    child.join(timeout=60)
    assert result.done and result.step == 8
    assert torch.equal(result.latent, whole)


def test_state_round_trips_through_bytes():
    plan = make_plan(4, 5.0, "unipc")
    cond = ImageCondition(first_frame=torch.randn(1, 16, 1, 4, 4), patch=(1, 2, 2))
    model, ctx = tiny_dit(5), torch.randn(1, 3, 16)
    state = run_segment(start_state(plan, seeded_noise((1, 16, 3, 4, 4), 0), cond),
                        Segment("single", 0, 2, 5.0), model, ctx, ctx)
    back = DenoiseState.from_bytes(state.to_bytes())
    assert back.plan == plan and back.step == 2
    assert torch.equal(back.latent, state.latent)
    assert torch.equal(back.condition.first_frame, cond.first_frame)
    assert back.solver.keys() == state.solver.keys()


def test_ti2v_first_frame_stays_clean_and_gets_timestep_zero():
    model = tiny_dit(6, model_type="ti2v", in_dim=16, out_dim=16)
    plan = make_plan(3, 5.0)
    first = torch.randn(1, 16, 1, 4, 4)
    cond = ImageCondition(first_frame=first, patch=(1, 2, 2))
    latent = sample({"single": model}, seeded_noise((1, 16, 3, 4, 4), 1), torch.randn(1, 4, 16),
                    torch.randn(1, 4, 16), plan, cond)
    assert torch.equal(latent[:, :, :1], first)
    t = model_timesteps(731, latent, cond)
    assert t.shape == (1, 3 * 2 * 2)
    assert (t[0, :4] == 0).all() and (t[0, 4:] == 731).all()
    assert model_timesteps(731, latent, None).shape == (1,)


def test_segment_must_start_where_the_state_stands():
    plan = make_plan(6, 12.0, boundary=0.875, guide_scale=(3.0, 4.0))
    state = start_state(plan, seeded_noise((1, 16, 1, 2, 2), 0))
    with pytest.raises(ValueError, match="starts at"):
        run_segment(state, plan.segment("low"), tiny_dit(0), torch.randn(1, 2, 16), torch.randn(1, 2, 16))


def test_seeded_noise_is_reproducible():
    assert torch.equal(seeded_noise((2, 3), 5), seeded_noise((2, 3), 5))
    assert not torch.equal(seeded_noise((2, 3), 5), seeded_noise((2, 3), 6))


def test_latent_shapes_of_the_official_cases():
    assert latent_shape(PRESETS["t2v-A14B"], 1280, 720, 81) == (16, 21, 90, 160)
    assert latent_shape(PRESETS["t2v-A14B"], 832, 480, 81) == (16, 21, 60, 104)
    assert latent_shape(PRESETS["ti2v-5B"], 1280, 704, 121) == (48, 31, 44, 80)


@pytest.mark.parametrize("fields,match", [
    (dict(prompt=""), "prompt must be a non-empty string"),
    (dict(prompt=3), "prompt must be a non-empty string"),
    (dict(prompt="a cat", size="640*480"), r"640\*480 is not supported by t2v-A14B; accepted: 1280\*720"),
    (dict(prompt="a cat", size="huge"), "not WIDTH"),
    (dict(prompt="a cat", frames=80), r"frames must be 4n\+1"),
    (dict(prompt="a cat", frames="x"), "frames must be a number"),
    (dict(prompt="a cat", steps=0), "steps must be >= 1"),
    (dict(prompt="a cat", steps=-3), "steps must be >= 1"),
    (dict(prompt="a cat", steps=2.5), "whole number"),
    (dict(prompt="a cat", shift=0), "shift must be > 0"),
    (dict(prompt="a cat", solver="ddim"), r"solver 'ddim' is not one of \['unipc', 'dpm\+\+', 'euler'\]"),
    (dict(prompt="a cat", guide_scale=(1, 2, 3)), "pair"),
    (dict(prompt="a cat", image="cat.png"), "text-to-video and takes no image"),
    (dict(prompt="x" * 20_000), "at most 10000"),
])
def test_invalid_requests_name_the_field_and_the_accepted_values(fields, match):
    with pytest.raises(RequestError, match=match):
        make_request(PRESETS["t2v-A14B"], **fields)


def test_request_defaults_and_normalisation():
    task = PRESETS["t2v-A14B"]
    r = make_request(task, prompt="a cat", size="832x480", guide_scale=5)
    assert (r.width, r.height, r.frames, r.steps, r.shift, r.solver) == (832, 480, 81, 40, 12.0, "unipc")
    assert r.guide_scale == (5.0, 5.0) and r.negative_prompt == task.negative_prompt
    assert r.seed == make_request(task, prompt="a cat", size="832*480").seed  # stable derived seed
    assert make_request(task, prompt="a cat", seed=3).seed == 3
    with pytest.raises(RequestError, match="image is required"):
        make_request(PRESETS["i2v-A14B"], prompt="a cat")


def test_sizes_ids_and_seconds():
    assert parse_size("832*480") == parse_size("832x480") == parse_size((832, 480)) == (832, 480)
    assert safe_id("video_1.a-b") == "video_1.a-b"
    for raw in ["../../etc/passwd", "a/b", "with space", "..", "ünïcode"]:
        key = safe_id(raw)
        assert key and all(c.isalnum() or c in "._-" for c in key) and not key.startswith(".")
        assert "/" not in key and key != ".."
    assert safe_id("a/b") != safe_id("a_b")
    assert frames_for_seconds(5, 16, 121) == 81
    assert frames_for_seconds(100, 16, 121) == 121
    assert frames_for_seconds(0, 16, 121) == 1


def test_derived_ids_differ_when_any_setting_differs():
    task = PRESETS["t2v-A14B"]
    base = make_request(task, prompt="a cat")
    assert base.id == make_request(task, prompt="a cat").id
    for change in (dict(steps=30), dict(shift=5.0), dict(guide_scale=2.0), dict(solver="dpm++"), dict(seed=4),
                   dict(size="832*480"), dict(frames=41), dict(negative_prompt="blurry")):
        assert make_request(task, prompt="a cat", **change).id != base.id, change


def test_the_public_api_is_importable_from_the_package():
    import wan_ray.sampling as sampling

    assert sampling.make_scheduler("unipc", 40, 12.0).timesteps[0].item() == 999
    plan = sampling.make_plan(40, 12.0, "unipc", boundary=0.875, guide_scale=(3.0, 4.0))
    assert [s.expert for s in plan.segments] == ["high", "low"]
    for name in ("sample", "start_state", "run_segment", "DenoiseState"):
        assert callable(getattr(sampling, name))

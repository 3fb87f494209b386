"""Gangs on local Ray (fake GPUs, gloo): same latents as one process, rebuilt after a rank dies, no leaks."""

import pytest
import torch
from releases import write_release

from wan_ray.models.checkpoint import open_checkpoint
from wan_ray.runtime.gang import Gang, GangSpec, sweep_gangs
from wan_ray.sampling.request import make_request, safe_id
from wan_ray.stages import Denoiser, Item, TextEncoder


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp("gang") / "t2v", "t2v")


def encoded_items(checkpoint, prompts):
    text = TextEncoder(checkpoint, "cpu")
    items = [Item(id=f"v{i}", key=safe_id(f"v{i}"), request=make_request(checkpoint.task, prompt=p, seed=i))
             for i, p in enumerate(prompts)]
    return text(items)


def live_gang_groups():
    from ray.util.placement_group import placement_group_table

    return [v for v in placement_group_table().values()
            if v["name"].startswith("wan-ray-gang") and v["state"] != "REMOVED"]


def spec(release, expert, **kw):
    return GangSpec(model=str(release), expert=expert, size=2, num_cpus=0.25, num_gpus=1, **kw)


def test_gangs_match_single_process_and_survive_a_dead_rank(ray_session, release):
    checkpoint = open_checkpoint(release)
    items = encoded_items(checkpoint, ["a red cat runs", "a blue dog jumps on the grass"])
    reference = items
    for expert in ("high", "low"):
        reference = Denoiser(checkpoint, expert, "cpu")(reference)

    high, low = Gang(spec(release, "high")), Gang(spec(release, "low"))
    assert len(live_gang_groups()) == 2
    halfway = high(items)
    ray_session.kill(low.ranks[1])  # a rank dies between calls: the next call rebuilds the gang
    done = low(halfway)
    for got, ref in zip(done, reference, strict=True):
        assert got.status == "ok" and got.state.done
        err = ((got.state.latent - ref.state.latent).norm() / ref.state.latent.norm()).item()
        assert err <= 1e-5
        assert got.gpu_seconds > 0 and "denoise_low" in got.timings
    high.close()
    low.close()
    assert live_gang_groups() == []


def test_cfg_parallel_gang(ray_session, release):
    checkpoint = open_checkpoint(release)
    items = encoded_items(checkpoint, ["green snow"])
    reference = Denoiser(checkpoint, "high", "cpu")(items)
    gang = Gang(spec(release, "high", cfg_parallel=True))
    try:
        (got,) = gang(items)
    finally:
        gang.close()
    assert torch.allclose(got.state.latent, reference[0].state.latent, rtol=1e-5, atol=1e-6)


def test_sweep_removes_groups_a_dead_leader_left(ray_session):
    from ray.util.placement_group import placement_group

    leaked = placement_group([{"CPU": 0.1}], name="wan-ray-gang-leaked-0")
    ray_session.get(leaked.ready())
    assert sweep_gangs() == 1
    assert live_gang_groups() == []


def test_a_serve_replica_runs_its_gang_in_its_own_placement_group(ray_session, release, tmp_path):
    """The endpoint's denoise deployment with gang_size 2: one placement group per replica (bundle 0 holds
    the replica and rank 0), and the same latent as one process."""
    from ray import serve

    from wan_ray.runtime.actors import StageRecipe
    from wan_ray.runtime.topology import load_topology
    from wan_ray.serve.app import parse_args, stage_options
    from wan_ray.serve.stages import StageServer

    checkpoint = open_checkpoint(release)
    items = encoded_items(checkpoint, ["a green cat"])
    reference = Denoiser(checkpoint, "high", "cpu")(items)
    spec = load_topology({"stages": {"denoise_high": {"gang_size": 2, "num_gpus": 1, "num_cpus": 0.25}}}
                         ).stage("denoise_high")
    options = stage_options("denoise_high", spec, parse_args({"storage": str(tmp_path)}))
    app = serve.deployment(StageServer).options(**options).bind(
        [StageRecipe(stage="denoise_high", model=str(release), spec=spec)])
    handle = serve.run(app, name="gang", route_prefix=None)
    try:
        events = list(handle.run.options(stream=True).remote(items[0]))
    finally:
        serve.delete("gang")
        serve.shutdown()
    (kind, item) = events[-1]
    assert kind == "item" and item.status == "ok", item.error
    assert torch.allclose(item.state.latent, reference[0].state.latent, rtol=1e-5, atol=1e-6)
    assert live_gang_groups() == []

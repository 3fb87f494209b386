"""Topologies: presets load, typos and impossible shapes are clear errors."""

import dataclasses

import pytest

from wan_ray.models.config import PRESETS
from wan_ray.runtime.topology import TopologyError, load_topology


@pytest.mark.parametrize("name", ["local", "1gpu", "8xh100"])
def test_presets_load_and_fit_the_a14b_models(name):
    topology = load_topology(name)
    for task in ("t2v-A14B", "i2v-A14B", "ti2v-5B"):
        topology.check_model(PRESETS[task])


def test_8xh100_uses_exactly_eight_gpus_per_model_kind():
    t = load_topology("8xh100")
    gpus = lambda *names: sum(t.stage(s).gpus_per_replica * t.stage(s).max_replicas for s in names)
    common = gpus("text_encode", "image_encode", "decode")
    assert common + gpus("denoise_high", "denoise_low") == 8
    assert common + gpus("denoise_single") == 8


@pytest.mark.parametrize("data,match", [
    ({"stages": {"denoise_hihg": {}}}, "unknown stages"),
    ({"stages": {"decode": {"replicaz": 2}}}, "replicaz"),
    ({"stages": {"denoise_high": {"gang_size": 3}}}, "gang_size must be one of"),
    ({"stages": {"denoise_high": {"gang_size": 1, "cfg_parallel": True}}}, "even gang_size"),
    ({"stages": {"decode": {"gang_size": 2}}}, "denoise stages"),
    ({"stages": {"decode": {"replicas": {"min": 3, "max": 2}}}}, "above max"),
    ({"stages": {"denoise_low": {"attention": "sage"}}}, r"attention must be one of \[.*'quantized'\]"),
    ({"stages": {"decode": {"attention": "cudnn"}}}, "attention are for denoise stages"),
    ({"stages": {"denoise_high": {"gang_size": 2, "attention": "quantized"}}}, "single-GPU replicas"),
])
def test_malformed_topologies_are_errors(data, match):
    with pytest.raises(TopologyError, match=match):
        load_topology(data)


def test_gang_size_must_divide_the_heads():
    # every gang size divides the real models' 40 and 24 heads; a fine-tune with 12 heads shows the check
    task = PRESETS["ti2v-5B"]
    twelve = dataclasses.replace(task, dit=dataclasses.replace(task.dit, num_heads=12, dim=1536))
    load_topology({"name": "t", "stages": {"denoise_single": {"gang_size": 4}}}).check_model(twelve)
    eight = load_topology({"name": "t", "stages": {"denoise_single": {"gang_size": 8}}})
    with pytest.raises(TopologyError, match=r"does not divide ti2v-5B's 12 attention heads; .* \[1, 2, 4\]"):
        eight.check_model(twelve)
    cfg = {"gang_size": 8, "cfg_parallel": True}  # 2-way CFG x 4-way sequence parallel
    load_topology({"name": "t", "stages": {"denoise_single": cfg}}).check_model(twelve)


def test_replicas_that_cannot_fit_the_cluster_are_errors():
    topology = load_topology({"name": "big", "stages": {"denoise_high": {"num_gpus": 1, "gang_size": 8}}})
    topology.check_cluster({"CPU": 64, "GPU": 8}, ["denoise_high"])
    with pytest.raises(TopologyError, match="needs 8 GPU, but the cluster has at most 4"):
        topology.check_cluster({"CPU": 64, "GPU": 4}, ["denoise_high"])


def test_unknown_preset_lists_the_bundled_ones(tmp_path):
    with pytest.raises(TopologyError, match=r"\['1gpu', '8xh100', .*'local'\]"):
        load_topology("nope")
    bad = tmp_path / "t.yaml"
    bad.write_text("stages: [unclosed")
    with pytest.raises(TopologyError, match="not valid YAML"):
        load_topology(bad)



def test_pools_that_cannot_all_start_together_are_errors():
    from wan_ray.batch.job import stage_names

    # each replica fits two CPUs, but the pools at their minimum size need 2.5 together: the job would stall
    topology = load_topology({"name": "crowded", "defaults": {"num_cpus": 0.5},
                              "stages": {"decode": {"num_cpus": 1.0, "replicas": {"min": 1, "max": 4}}}})
    stages = ["text_encode", "denoise_single", "decode", "write"]
    topology.check_cluster({"CPU": 3}, stages)
    with pytest.raises(TopologyError, match=r"minimum replicas need 2.5 CPU together, .* at most 2"):
        topology.check_cluster({"CPU": 2}, stages)
    for task in ("t2v-A14B", "i2v-A14B", "ti2v-5B"):  # the local preset fits the 2-core CI machine
        load_topology("local").check_cluster({"CPU": 2}, stage_names(PRESETS[task]))

"""Running on a real cluster, checked offline: cluster.yaml against Ray's own schema, the topologies against
its node types (every resource exists, every replica fits, gangs on one node), the KubeRay manifests
(required fields, the same node types and resources, an entrypoint jobs/generate.py accepts, the Serve
config), and a multi-node simulation of cluster.yaml running the batch job with each stage on its node type.
"""

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from releases import write_release

from wan_ray.batch.job import stage_names
from wan_ray.models.config import PRESETS
from wan_ray.parallel.groups import NCCL_ENV
from wan_ray.runtime.topology import PRESET_DIR, Topology, load_topology
from wan_ray.sampling.plan import make_plan

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
PRESETS_ALL = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
AWS = [name for name in PRESETS_ALL if name.startswith("aws-")]
TASKS = ("t2v-A14B", "i2v-A14B", "ti2v-5B")
NODE_TYPE_LABEL = "wan-ray/node-type"
MARKERS = {"cpu_node", "small_gpu_node", "dit_node"}  # custom resources that pin a stage to a node type
# where each stage of the aws-* presets must run: the node type that carries the marker
INTENDED = {"text_encode": "small_gpu_node", "image_encode": "small_gpu_node", "decode": "small_gpu_node",
            "denoise_high": "dit_node", "denoise_low": "dit_node", "denoise_single": "dit_node",
            "write": "cpu_node"}
MODELS_MOUNT = "/home/ray/models"
CODE_DIR = "/home/ray/wan-ray"


def load(path: Path):
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def cluster():
    return load(REPO / "cluster.yaml")


@pytest.fixture(scope="module")
def manifests():
    return {"rayjob": load(K8S / "rayjob.yaml"), "rayservice": load(K8S / "rayservice.yaml")}


def pinned_ray() -> str:
    """The Ray version the package pins (pyproject.toml)."""
    (version,) = re.findall(r'"ray\[[a-z,]+\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    return version


# ---------------------------------------------------------------------------------------------------------
# Fitting replicas onto node types


class NodeType:
    def __init__(self, resources: dict[str, float], max_count: int):
        self.resources, self.max_count = resources, max_count


def node_types_of_cluster_yaml(config: dict) -> dict[str, NodeType]:
    types = config["available_node_types"]
    return {name: NodeType(spec["resources"], 1 if name == config["head_node_type"]
                           else spec.get("max_workers", config["max_workers"]))
            for name, spec in types.items()}


def shell_value(value: str) -> str:
    """A `rayStartParams` value as `ray start` receives it: KubeRay writes `--key=value` into a shell line."""
    (arg,) = shlex.split(f"--x={value}")
    return arg.removeprefix("--x=")


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def node_types_of_ray_cluster(spec: dict) -> dict[str, NodeType]:
    """A RayCluster spec's head and worker groups as node types: CPUs and GPUs from the container limits
    (as KubeRay passes them to `ray start`) unless rayStartParams says otherwise, custom resources from
    rayStartParams.resources."""
    def resources(group: dict) -> dict[str, float]:
        params, limits = group.get("rayStartParams", {}), ray_container(group)["resources"]["limits"]
        out = {"CPU": float(params.get("num-cpus", limits["cpu"])),
               "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
        if "resources" in params:
            out.update(json.loads(shell_value(params["resources"])))
        return out

    types = {"head": NodeType(resources(spec["headGroupSpec"]), 1)}
    for group in spec["workerGroupSpecs"]:
        types[group["groupName"]] = NodeType(resources(group), group["maxReplicas"])
    return types


def topology_demands(topology: Topology, stages: list[str]) -> list[tuple[str, list[dict]]]:
    """Every replica of the stages at the pools' largest size, as the bundles that must share one node: a
    gang's ranks (STRICT_PACK), plus its leader anywhere (the batch job's leader asks for 0.05 CPU)."""
    demands = []
    for stage in stages:
        spec = topology.stage(stage)
        rank = {"CPU": spec.num_cpus, "GPU": spec.num_gpus, **spec.resources}
        if spec.accelerator_type:
            rank[f"accelerator_type:{spec.accelerator_type}"] = 0.001
        for _ in range(spec.max_replicas):
            demands.append((stage, [rank] * spec.gang_size))
            if spec.gang_size > 1:
                demands.append((f"{stage} leader", [{"CPU": 0.05}]))
    return demands


def pack(demands: list[tuple[str, list[dict]]], types: dict[str, NodeType]) -> dict[str, list[str]]:
    """Place every replica on a node (first fit, largest first), opening nodes up to each type's maximum.
    Returns, per stage, the node types its replicas landed on; raises if a replica fits nowhere."""
    nodes: list[tuple[str, dict[str, float]]] = []  # (node type, resources left)

    def take(bundles: list[dict], free: dict[str, float]) -> bool:
        need: dict[str, float] = {}
        for bundle in bundles:
            for key, amount in bundle.items():
                need[key] = need.get(key, 0.0) + amount
        if any(amount > free.get(key, 0.0) + 1e-9 for key, amount in need.items() if amount):
            return False
        for key, amount in need.items():
            free[key] = free.get(key, 0.0) - amount
        return True

    placed: dict[str, list[str]] = {}
    size = lambda d: (-sum(b.get("GPU", 0) for b in d[1]), -sum(b.get("CPU", 0) for b in d[1]))
    for stage, bundles in sorted(demands, key=size):
        where = next((kind for kind, free in nodes if take(bundles, free)), None)
        if where is None:
            for kind, spec in types.items():
                free = dict(spec.resources)
                if sum(k == kind for k, _ in nodes) < spec.max_count and take(bundles, free):
                    nodes.append((kind, free))
                    where = kind
                    break
            else:
                raise AssertionError(f"a {stage} replica {bundles} fits no node type that has room left "
                                     f"(nodes in use: {[k for k, _ in nodes]})")
        placed.setdefault(stage, []).append(where)
    return placed


def custom_resources(demands: list[tuple[str, list[dict]]]) -> set[str]:
    return {key for _, bundles in demands for bundle in bundles for key in bundle} - {"CPU", "GPU"}


def test_the_packer_refuses_what_cannot_fit(cluster):
    """The fit checks below are not vacuous: a gang wider than a node, a resource no node type has, and
    more replicas than the node types' maximum counts all fail."""
    types = node_types_of_cluster_yaml(cluster)
    too_wide = load_topology({"stages": {"denoise_high": {"gang_size": 8, "num_gpus": 2}}})
    unknown = load_topology({"stages": {"decode": {"accelerator_type": "B200", "num_gpus": 1}}})
    too_many = load_topology({"stages": {"denoise_high": {"replicas": 17, "num_gpus": 1,
                                                          "resources": {"dit_node": 0.001}}}})
    for topology, stage in ((too_wide, "denoise_high"), (unknown, "decode"), (too_many, "denoise_high")):
        with pytest.raises(AssertionError, match=f"a {stage} replica"):
            pack(topology_demands(topology, [stage]), types)
    pack(topology_demands(load_topology({"stages": {"denoise_high": {"replicas": 16, "num_gpus": 1}}}),
                          ["denoise_high"]), types)  # 16 GPUs: both H100 nodes, full


# ---------------------------------------------------------------------------------------------------------
# cluster.yaml


def test_cluster_yaml_passes_rays_schema(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config  # private API of ray 2.60

    validate_config(prepare_config(copy.deepcopy(cluster)))  # AWS defaults merged first, then the schema
    typo = copy.deepcopy(cluster)
    typo["available_node_types"]["h100x8"]["min_worker"] = 0
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(typo))


def test_cluster_yaml_node_types(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no stage runs on the head
    assert cluster["provider"]["type"] == "aws"
    instances = {name: spec["node_config"]["InstanceType"] for name, spec in types.items()}
    assert instances["h100x8"] == "p5.48xlarge" and types["h100x8"]["resources"]["GPU"] == 8
    assert instances["l40s"].startswith(("g6e.", "g6.")) and types["l40s"]["resources"]["GPU"] >= 1
    assert "GPU" not in types["cpu"]["resources"]
    for name, spec in types.items():
        assert spec["labels"] == {NODE_TYPE_LABEL: name}
        if spec is head:
            continue
        assert spec["min_workers"] == 0 and spec["max_workers"] >= 1  # scales from zero
        assert len(set(spec["resources"]) & MARKERS) == 1  # one marker per worker type
        gpu = spec["resources"].get("GPU", 0) > 0
        options = spec.get("docker", {}).get("worker_run_options", [])
        env = dict(option.removeprefix("--env ").split("=", 1) for option in options if "--env" in option)
        assert env == (NCCL_ENV if gpu else {}), name  # NVLink multicast off on every GPU node
    assert sum(spec.get("max_workers", 0) for spec in types.values()) <= cluster["max_workers"]
    profiles = {str(spec["node_config"].get("IamInstanceProfile")) for spec in types.values()}
    assert profiles == {"{'Name': 'wan-ray'}"}  # workers write to S3 too, not only the head


def test_cluster_yaml_pins_ray_and_installs_the_package(cluster):
    version = pinned_ray()
    assert cluster["docker"]["image"].startswith(f"rayproject/ray:{version}-")
    setup = cluster["setup_commands"]
    assert any(f"ray[default,data,serve]=={version}" in command for command in setup)
    (mount,) = cluster["file_mounts"].items()
    assert mount == ("~/wan-ray", ".")  # this checkout (ray up runs from the repo root) ...
    assert any(command.endswith("pip install -q -e ~/wan-ray") for command in setup)  # ... installed
    download = next(c for c in setup if c.startswith("hf download"))
    assert "--local-dir ~/models/" in download  # ~ is /home/ray in the container: the docs' --model path
    assert cluster["rsync_filter"] == [".gitignore"]


# ---------------------------------------------------------------------------------------------------------
# Topologies against the node types


@pytest.mark.parametrize("name", PRESETS_ALL)
def test_every_resource_a_topology_asks_for_exists_on_a_node_type(cluster, name):
    topology = load_topology(name)
    offered = {key for spec in cluster["available_node_types"].values() for key in spec["resources"]}
    for task in TASKS:
        asked = custom_resources(topology_demands(topology, stage_names(PRESETS[task])))
        assert asked <= offered, f"{name} asks for {sorted(asked - offered)}, cluster.yaml has {offered}"


@pytest.mark.parametrize("name", PRESETS_ALL)
def test_every_topology_fits_the_node_types(cluster, name):
    """All replicas of every pool at its largest, at once, on cluster.yaml's nodes at their maximum counts:
    per replica its CPUs, GPUs and custom resources on one node, a gang's GPUs all on one node."""
    topology, types = load_topology(name), node_types_of_cluster_yaml(cluster)
    for task in TASKS:
        pack(topology_demands(topology, stage_names(PRESETS[task])), types)


@pytest.mark.parametrize("name", AWS)
def test_aws_presets_pin_each_stage_to_its_node_type(cluster, name):
    topology = load_topology(name)
    types = cluster["available_node_types"]
    carrier = {marker: kind for kind, spec in types.items() for marker in set(spec["resources"]) & MARKERS}
    stages = {s for task in TASKS for s in stage_names(PRESETS[task])}
    for stage in stages:
        spec = topology.stage(stage)
        (marker,) = set(spec.resources) & MARKERS
        if stage in topology.stages:  # what the preset names runs where it is meant to
            assert marker == INTENDED[stage], f"{name}: {stage} asks for {marker}"
        kind = carrier[marker]
        assert (spec.num_gpus > 0) <= (types[kind]["resources"].get("GPU", 0) > 0)
    placed = pack(topology_demands(topology, list(topology.stages)), node_types_of_cluster_yaml(cluster))
    for stage, kinds in placed.items():
        if not stage.endswith("leader"):
            assert set(kinds) == {carrier[INTENDED[stage]]}, f"{name}: {stage} on {kinds}"


@pytest.mark.parametrize("name,task", [("aws-t2v", "t2v-A14B"), ("aws-i2v", "i2v-A14B")])
def test_expert_pools_are_sized_by_their_share_of_steps(cluster, name, task):
    """Each expert gets GPUs in proportion to its steps under the model's default schedule (T2V-A14B: 26 of
    40 high-noise, I2V-A14B: 15 of 40), whole H100 nodes in all."""
    spec = PRESETS[task]
    plan = make_plan(spec.sample_steps, spec.sample_shift, "unipc", spec.boundary, spec.guide_scale)
    steps = {s.expert: len(s.steps) for s in plan.segments}
    topology = load_topology(name)
    gpus = {e: topology.stage(f"denoise_{e}").gpus_per_replica * topology.stage(f"denoise_{e}").max_replicas
            for e in ("high", "low")}
    total = gpus["high"] + gpus["low"]
    h100 = cluster["available_node_types"]["h100x8"]
    assert total % h100["resources"]["GPU"] == 0 and total // h100["resources"]["GPU"] <= h100["max_workers"]
    assert gpus["high"] == round(total * steps["high"] / plan.num_steps)
    assert steps == ({"high": 26, "low": 14} if task == "t2v-A14B" else {"high": 15, "low": 25})


def test_aws_serve_uses_gangs_that_fit_one_h100_node(cluster):
    topology = load_topology("aws-serve")
    topology.check_model(PRESETS["t2v-A14B"])  # gang sizes divide the 40 heads
    h100 = cluster["available_node_types"]["h100x8"]["resources"]["GPU"]
    for expert in ("denoise_high", "denoise_low"):
        spec = topology.stage(expert)
        assert 1 < spec.gang_size <= h100 and spec.min_replicas < spec.max_replicas


# ---------------------------------------------------------------------------------------------------------
# KubeRay


def cluster_spec(manifest: dict) -> dict:
    spec = manifest["spec"]
    return spec["rayClusterSpec"] if manifest["kind"] == "RayJob" else spec["rayClusterConfig"]


def pod_templates(manifest: dict) -> list[dict]:
    spec = cluster_spec(manifest)
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


@pytest.mark.parametrize("which", ["rayjob", "rayservice"])
def test_kuberay_manifests_have_the_required_fields(manifests, which):
    manifest = manifests[which]
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["metadata"]["name"]
    assert manifest["kind"] == {"rayjob": "RayJob", "rayservice": "RayService"}[which]
    spec = cluster_spec(manifest)
    assert spec["rayVersion"] == pinned_ray() and spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no stage runs on the head
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] == 0 <= group["maxReplicas"]
        assert group["replicas"] == 0  # scale from zero
    image = ray_container(spec["headGroupSpec"])["image"]
    claims = {d["metadata"]["name"]: d for d in yaml.safe_load_all((K8S / "setup.yaml").read_text())}
    for template in pod_templates(manifest):
        pod = template["spec"]
        (container,) = pod["containers"]
        assert container["image"] == image and container["resources"]["limits"]
        assert pod["serviceAccountName"] == "wan-ray" and claims["wan-ray"]["kind"] == "ServiceAccount"
        (volume,) = pod["volumes"]
        assert claims[volume["persistentVolumeClaim"]["claimName"]]["kind"] == "PersistentVolumeClaim"
        (mount,) = container["volumeMounts"]
        assert mount == {"name": volume["name"], "mountPath": MODELS_MOUNT, "readOnly": True}
    if which == "rayjob":
        job = manifest["spec"]
        assert job["shutdownAfterJobFinishes"] is True and job["submissionMode"] == "K8sJobMode"
        (submitter,) = job["submitterPodTemplate"]["spec"]["containers"]
        assert submitter["image"] == image and job["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
    else:
        assert isinstance(manifest["spec"]["serveConfigV2"], str)
        for template in pod_templates(manifest):  # the ingress reads the keys wherever it runs
            env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
            assert env["WAN_RAY_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "wan-ray-api-key"


@pytest.mark.parametrize("which", ["rayjob", "rayservice"])
def test_kuberay_worker_groups_mirror_cluster_yaml(cluster, manifests, which):
    spec = cluster_spec(manifests[which])
    nodes = {n: s for n, s in cluster["available_node_types"].items() if n != cluster["head_node_type"]}
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert groups.keys() == nodes.keys()
    head_labels = shell_value(spec["headGroupSpec"]["rayStartParams"]["labels"])
    assert head_labels == f"{NODE_TYPE_LABEL}=head"
    for name, group in groups.items():
        node, params = nodes[name], group["rayStartParams"]
        custom = {k: v for k, v in node["resources"].items() if k not in ("CPU", "GPU")}
        assert json.loads(shell_value(params["resources"])) == custom  # the same marker resources
        assert shell_value(params["labels"]) == f"{NODE_TYPE_LABEL}={name}"
        assert group["maxReplicas"] == node["max_workers"]
        container = ray_container(group)
        gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
        assert gpus == node["resources"].get("GPU", 0)
        env = {e["name"]: e.get("value") for e in container["env"]}
        gpu = node["resources"].get("GPU", 0) > 0
        assert {k: env[k] for k in NCCL_ENV if k in env} == (NCCL_ENV if gpu else {}), name


def test_dockerfile_builds_the_image_the_manifests_expect():
    dockerfile = (K8S / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{pinned_ray()}-" in dockerfile
    assert f"COPY --chown=1000:100 . {CODE_DIR}" in dockerfile
    assert f"pip install --no-cache-dir -e {CODE_DIR}" in dockerfile
    assert ".git" in (K8S / "Dockerfile.dockerignore").read_text().split()


def test_rayjob_entrypoint_is_one_jobs_generate_accepts(monkeypatch, cluster, manifests):
    """Parsed by jobs/generate.py's own parser (`wan_ray.batch.command.main`); its topology fits the RayJob's
    groups and cluster.yaml, and its model lies on the mounted volume."""
    from wan_ray.batch import command

    argv = shlex.split(manifests["rayjob"]["spec"]["entrypoint"])
    assert argv[:2] == ["python", f"{CODE_DIR}/jobs/generate.py"]
    assert "from wan_ray.batch.command import main" in (REPO / "jobs" / "generate.py").read_text()
    seen = []
    monkeypatch.setattr(command, "generate", lambda args: seen.append(args) or 0)
    assert command.main(argv[2:]) == 0
    (args,) = seen
    assert args.manifest.startswith("s3://") and args.output.startswith("s3://")
    assert args.model.startswith(f"{MODELS_MOUNT}/")
    topology = load_topology(args.topology)
    assert args.topology in AWS
    stages = stage_names(PRESETS["t2v-A14B"])
    for types in (node_types_of_ray_cluster(cluster_spec(manifests["rayjob"])),
                  node_types_of_cluster_yaml(cluster)):
        pack(topology_demands(topology, stages), types)
    with pytest.raises(SystemExit):  # the parser is strict: a misspelled flag would not get this far
        command.main([*argv[2:], "--topolgy", "x"])


def test_rayservice_embeds_the_cluster_serve_config(cluster, manifests):
    from ray.serve.schema import ServeDeploySchema

    from wan_ray.serve.app import check_config, parse_args, stage_options

    embedded = yaml.safe_load(manifests["rayservice"]["spec"]["serveConfigV2"])
    assert embedded == load(REPO / "deploy" / "serve.yaml")  # one config for cluster.yaml and KubeRay
    ServeDeploySchema.model_validate(embedded)
    check_config(REPO / "deploy" / "serve.yaml")  # and the application's own args, as build_app reads them

    # the application of configs/serve.yaml, with the cluster's model, topology and storage
    local = load(REPO / "configs" / "serve.yaml")
    assert embedded["http_options"] == local["http_options"]
    (app,), (base,) = embedded["applications"], local["applications"]
    assert {k: v for k, v in app.items() if k != "args"} == {k: v for k, v in base.items() if k != "args"}
    cluster_keys = {"model", "topology", "storage", "deployments"}
    assert {k: v for k, v in app["args"].items() if k not in cluster_keys} == \
           {k: v for k, v in base["args"].items() if k not in cluster_keys}
    assert app["args"]["storage"].startswith("s3://") and app["args"]["model"].startswith(f"{MODELS_MOUNT}/")
    replicas = {"min_replicas", "max_replicas"}  # on the cluster they come from the topology
    for name, options in base["args"]["deployments"].items():
        mine = copy.deepcopy(app["args"]["deployments"][name])
        theirs = copy.deepcopy(options)
        for d in (mine, theirs):
            for key in replicas:
                d.get("autoscaling_config", {}).pop(key, None)
        assert mine == theirs, name
    assert app["args"]["deployments"].keys() == base["args"]["deployments"].keys()

    # every replica the endpoint can grow to fits the node types, each stage on its own
    args = parse_args(app["args"])
    topology = load_topology(args.topology)
    demands = [("VideoAPI", [{"CPU": args.deployments["VideoAPI"].num_cpus}])]
    for stage in ("text_encode", "denoise_high", "denoise_low", "decode"):
        options = stage_options(stage, topology.stage(stage), args)
        actor = options["ray_actor_options"]
        bundles = options.get("placement_group_bundles") or [
            {"CPU": actor["num_cpus"], "GPU": actor["num_gpus"], **actor.get("resources", {})}]
        demands += [(stage, bundles)] * options["autoscaling_config"]["max_replicas"]
    for types in (node_types_of_ray_cluster(cluster_spec(manifests["rayservice"])),
                  node_types_of_cluster_yaml(cluster)):
        placed = pack(demands, types)
        assert set(placed["denoise_high"]) == set(placed["denoise_low"]) == {"h100x8"}
        assert set(placed["text_encode"]) == set(placed["decode"]) == {"l40s"}


# ---------------------------------------------------------------------------------------------------------
# Multi-node simulation


@pytest.mark.slow
def test_simulated_cluster_runs_each_stage_on_its_node_type(tmp_path, cluster):
    """cluster.yaml in miniature (tests/cluster_sim.py: one node per node type, the same marker resources and
    labels, fake GPUs) runs the batch job with the aws-t2v placement, denoise_high as a gang of 2: every
    stage of every video ran on the node type its marker names (the sidecars' `placement`), never on the
    head, and the gang's ranks on the H100 node recorded for denoise_high."""
    release = write_release(tmp_path / "release", "t2v")
    manifest = tmp_path / "prompts.parquet"
    prompts = ["a red cat runs", "a blue dog jumps on the grass"]
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": prompts}), manifest)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    run = subprocess.run([sys.executable, str(REPO / "tests" / "cluster_sim.py"), str(release), str(manifest),
                          str(tmp_path / "out"), "--topology", "aws-t2v", "--gang", "2"],
                         capture_output=True, text=True, timeout=240, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])

    types = cluster["available_node_types"]
    carrier = {marker: kind for kind, spec in types.items() for marker in set(spec["resources"]) & MARKERS}
    topology = load_topology("aws-t2v")
    expected = {stage: carrier[next(iter(set(topology.stage(stage).resources) & MARKERS))]
                for stage in stage_names(PRESETS["t2v-A14B"])}
    assert expected == {"text_encode": "l40s", "denoise_high": "h100x8", "denoise_low": "h100x8",
                        "decode": "l40s", "write": "cpu"}
    nodes = report["nodes"]
    assert sorted(nodes.values()) == sorted(types)  # one simulated node per node type
    assert set(report["videos"]) == {"a", "b"}
    for video in report["videos"].values():
        assert video["status"] == "ok", video["error"]
        placement = video["placement"]
        assert {stage: p["node_type"] for stage, p in placement.items()} == expected
        for p in placement.values():
            assert nodes[p["node_id"]] == p["node_type"] != "head"
        ranks = report["gang_rank_nodes"]
        assert len(ranks) >= 2 and set(ranks) == {placement["denoise_high"]["node_id"]}

"""cluster.yaml in miniature: a multi-node Ray cluster on this machine running one batch job.

    python tests/cluster_sim.py RELEASE MANIFEST OUTPUT [--topology aws-t2v] [--gang 2]

One simulated node per node type of cluster.yaml (`ray.cluster_utils.Cluster`, fake GPUs), each carrying
the node type's custom resources and labels as they are, with CPU and GPU counts scaled down to fit a
2-core machine (the head keeps its CPU: 0). The job runs the topology's placement (its `resources`) with
one replica per stage and small CPU shares; `--gang N` makes denoise_high an N-GPU gang. Prints, as JSON,
what ran where: per video the node type and node id of each stage (from its sidecar's `placement`), the
node type of every node id, and the nodes of the gang's rank actors. Run by tests/test_cluster.py in its
own process: the tests' session already has a Ray of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIM_GPUS = 4  # fake GPUs of the largest simulated node: enough for a gang of 2 beside one more expert
SIM_CPUS = {"text_encode": 0.25, "image_encode": 0.2, "denoise_high": 0.3, "denoise_low": 0.3,
            "denoise_single": 0.3, "decode": 0.3, "write": 0.1}


def node_args(spec: dict) -> dict:
    """`Cluster.add_node` arguments for one node type of cluster.yaml: its custom resources and labels as
    they are; one CPU (none if the type has none) and at most `SIM_GPUS` GPUs."""
    resources = dict(spec["resources"])
    cpus, gpus = resources.pop("CPU", 0), resources.pop("GPU", 0)
    return dict(num_cpus=min(cpus, 1), num_gpus=min(gpus, SIM_GPUS), resources=resources,
                labels=dict(spec.get("labels", {})))


def sim_topology(name: str, gang: int) -> dict:
    """The topology's placement with one replica per stage and CPU shares a 2-core machine can give."""
    from wan_ray.runtime.topology import STAGES, load_topology

    topology = load_topology(name)
    stages = {}
    for stage in STAGES:
        spec = topology.stage(stage).model_dump(exclude_none=True)
        spec.update(replicas=1, num_cpus=SIM_CPUS[stage], batch_size=1)
        if stage == "denoise_high" and gang > 1:
            spec["gang_size"] = gang
        stages[stage] = spec
    return {"name": f"{topology.name}-sim", "stages": stages}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("release")
    p.add_argument("manifest")
    p.add_argument("output")
    p.add_argument("--cluster", default=str(REPO / "cluster.yaml"))
    p.add_argument("--topology", default="aws-t2v")
    p.add_argument("--gang", type=int, default=1)
    args = p.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from wan_ray.batch.job import JobConfig, run_job

    config = yaml.safe_load(Path(args.cluster).read_text())
    types = config["available_node_types"]
    head = node_args(types[config["head_node_type"]])
    cluster = Cluster(initialize_head=True, head_node_args=dict(include_dashboard=False, **head))
    try:
        for name, spec in types.items():
            if name != config["head_node_type"]:
                cluster.add_node(wait=False, **node_args(spec))
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        summary = run_job(JobConfig(args.manifest, args.output, model=args.release,
                                    topology=sim_topology(args.topology, args.gang), progress_every=0))
        nodes = {n["NodeID"]: n["Labels"].get("wan-ray/node-type", "") for n in ray.nodes() if n["Alive"]}
        videos = {}
        for result in summary.results:
            sidecar = json.loads(Path(result.sidecar_uri).read_text()) if result.sidecar_uri else {}
            videos[result.id] = {"status": result.status, "error": result.error,
                                 "placement": sidecar.get("placement", {})}
        ranks = [a["Address"]["NodeID"] for a in ray._private.state.actors().values()
                 if a["ActorClassName"] == "GangRank"]
        print(json.dumps({"videos": videos, "nodes": nodes, "gang_rank_nodes": ranks}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()

"""Ray actors around the plain stages: one generic actor builds its stage from a recipe and calls it.

A `StageRecipe` is all an actor is given: small and picklable (a checkpoint path, never weights), so Ray
can restart the actor after a crash. `actor_for` picks the actor class for a topology entry; a gang leader
(several GPUs per replica) takes the same recipe and the same call interface. `pool_args` turns the
topology entry into the `map_batches` arguments of the stage's pool. This module knows stages and Ray,
not manifests or jobs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group_table

from ..models.checkpoint import Checkpoint, open_checkpoint
from ..stages import Decoder, Denoiser, ImageEncoder, Item, Stage, TextEncoder, Writer
from ..stages.base import describe
from .gang import Gang, GangSpec
from .ledger import MAX_WORKER_DEATHS, Ledger, LedgerClient
from .rows import Batch, from_batch, to_batch
from .topology import StageSpec, TopologyError


def model_identity(checkpoint: Checkpoint) -> dict[str, str]:
    """What sidecars record as the model, and what a rerun compares to decide that a video is current."""
    return {"task": checkpoint.task.name, "checkpoint": str(checkpoint.root.resolve()),
            "layout": checkpoint.layout}


@dataclass(frozen=True)
class StageRecipe:
    stage: str  # a topology stage name: text_encode, image_encode, denoise_high/low/single, decode, write
    model: str  # checkpoint folder
    spec: StageSpec  # the stage's topology entry
    output: str = ""  # write: where videos go
    identity: dict[str, str] = field(default_factory=dict)  # write: the model identity for sidecars
    ledger: str | None = None  # name of the job's ledger actor
    run_id: str = ""  # prefix for what the actor creates (placement groups): the driver sweeps leftovers
    test_crash: str | None = None  # test-only fault injection, see `_test_crash`

    def build(self) -> Stage | Gang:
        """The stage, or for a denoise stage with gang_size > 1 a `Gang` (called the same way), which uses
        the caller's placement group if it runs in one (a Serve replica's bundles) or reserves its own."""
        if self.stage == "write":
            return Writer(self.output, self.identity)
        if self.spec.gang_size > 1:
            return Gang(gang_spec(self), placement=ray.util.get_current_placement_group())
        checkpoint = open_checkpoint(self.model)
        on_gpu = self.spec.num_gpus > 0 and torch.cuda.is_available()
        device = "cuda" if on_gpu else "cpu"
        dtype = getattr(torch, self.spec.dtype) if self.spec.dtype else None  # None: the stage's default
        if self.stage.startswith("denoise_"):
            expert = self.stage.removeprefix("denoise_")
            stage = Denoiser(checkpoint, expert, device, dtype, fp8=self.spec.fp8,
                             step_cache=self.spec.step_cache, attention=self.spec.attention)
        else:
            kind = {"text_encode": TextEncoder, "image_encode": ImageEncoder, "decode": Decoder}[self.stage]
            stage = kind(checkpoint, device, dtype)
        stage.gpus = self.spec.num_gpus if on_gpu else 0.0  # this replica's share, for GPU-seconds
        return stage


class StageActor:
    """A Ray Data actor: builds its stage once, then runs it on each batch of rows."""

    def __init__(self, recipe: StageRecipe):
        self.recipe = recipe
        try:
            self.stage = recipe.build()
        except Exception as err:  # name the stage: Ray reports only "MapWorker(...) died in __init__"
            raise RuntimeError(f"the {recipe.stage} stage could not start: {describe(err)}") from err
        self.ledger = LedgerClient(recipe.ledger) if recipe.ledger else None

    def __call__(self, batch: Batch) -> Batch:
        return call_stage(self.run, self.recipe, self.ledger, batch)

    def run(self, items: list[Item]) -> list[Item]:
        """The stage on `items`, each live one stamped first with where the work runs (so the writer's own
        stamp reaches the sidecar). A gang's work runs on its ranks' node, not necessarily the leader's."""
        if isinstance(self.stage, Gang):
            node = placement_group_table(self.stage.pg)["bundles_to_node_id"][0]
        else:
            node = ray.get_runtime_context().get_node_id()
        where = node_info(node)
        return self.stage([item.replace(placement={**item.placement, self.recipe.stage: where})
                           if item.live else item for item in items])

    def __del__(self) -> None:
        if isinstance(getattr(self, "stage", None), Gang):
            self.stage.close()  # its ranks and placement group (a crash is covered by the driver's sweep)


# Node labels that name a node's type: ours (cluster.yaml, the KubeRay manifests), then Ray's own node group
# (set from the node type's name by the cluster launcher's autoscaler v2 and by KubeRay).
NODE_TYPE_LABELS = ("wan-ray/node-type", "ray.io/node-group")


@lru_cache(maxsize=256)
def node_info(node_id: str) -> dict[str, str]:
    """Where work ran, for sidecars: the node's id, IP and type ("" where the cluster does not say)."""
    node = next((n for n in ray.nodes() if n["NodeID"] == node_id), {})
    labels = node.get("Labels") or {}
    kind = next((labels[k] for k in NODE_TYPE_LABELS if labels.get(k)), "")
    return {"node_id": node_id, "node_ip": node.get("NodeManagerAddress", ""), "node_type": kind}


def call_stage(run: Callable[[list[Item]], list[Item]], recipe: StageRecipe,
               ledger: Ledger | LedgerClient | None, batch: Batch) -> Batch:
    """One call of a stage on a batch of rows, with the ledger told what is in flight (any actor class)."""
    items, name = from_batch(batch), recipe.stage
    if ledger is None:
        return to_batch(run(items))
    keys = [item.key for item in items]
    deaths = ledger.begin(name, keys)
    if not any(deaths):
        _test_crash(recipe, items, deaths)
        out = run(items)
        ledger.end(name, keys)
        return to_batch(out)
    # A worker died on this batch before: go row by row, so that only the row that kills workers fails.
    ledger.end(name, keys, done=False)
    out = []
    for item in items:
        (died,) = ledger.begin(name, [item.key])
        if died >= MAX_WORKER_DEATHS:
            out.append(item.failed(name, f"the {name} worker process died {died} times on this row"))
        else:
            _test_crash(recipe, [item], [died])
            out += run([item])
        ledger.end(name, [item.key])
    return to_batch(out)


def _test_crash(recipe: StageRecipe, items: list[Item], deaths: list[int]) -> None:
    """Test-only: `WAN_RAY_TEST_CRASH="<stage>:<row id>[:always]"` in the driver's environment makes that
    stage's worker process exit abruptly on that row, on the row's first attempt (or on every attempt)."""
    if not recipe.test_crash:
        return
    stage, _, row = recipe.test_crash.partition(":")
    always, row = row.endswith(":always"), row.removesuffix(":always")
    hit = any(item.id == row and (always or died == 0) for item, died in zip(items, deaths, strict=True))
    if stage == recipe.stage and hit:
        os._exit(1)


def gang_spec(recipe: StageRecipe) -> GangSpec:
    spec = recipe.spec
    resources = dict(spec.resources)
    if spec.accelerator_type:  # the same trick as Ray's accelerator_type: a sliver of the node's label
        resources[f"accelerator_type:{spec.accelerator_type}"] = 0.001
    return GangSpec(model=recipe.model, expert=recipe.stage.removeprefix("denoise_"), size=spec.gang_size,
                    cfg_parallel=spec.cfg_parallel, shard_weights=spec.shard_weights, dtype=spec.dtype,
                    num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, resources=resources,
                    name_prefix=f"{recipe.run_id or 'wan-ray'}-gang", test_kill_rank=_test_kill_rank(recipe))


def _test_kill_rank(recipe: StageRecipe) -> int | None:
    """Test-only: `WAN_RAY_TEST_CRASH="<stage>:rank<N>"` makes rank N of that stage's gang exit on its
    first batch (the gang is rebuilt and the batch retried)."""
    stage, _, target = (recipe.test_crash or "").partition(":")
    return int(target.removeprefix("rank")) if stage == recipe.stage and target.startswith("rank") else None


def actor_for(stage: str, spec: StageSpec) -> type:
    """The Ray Data actor class for a stage's topology entry (a gang's leader is the same actor)."""
    if spec.gang_size > 1 and not stage.startswith("denoise_"):
        raise TopologyError(f"{stage}: only denoise stages run as gangs")
    return StageActor


def pool_args(spec: StageSpec) -> dict[str, Any]:
    """`map_batches` arguments for a stage's actor pool, from its topology entry. A gang leader asks for
    almost nothing: its ranks' bundles carry the CPUs, GPUs and resources."""
    compute = ray.data.ActorPoolStrategy(min_size=spec.min_replicas, max_size=spec.max_replicas)
    if spec.gang_size > 1:
        return dict(compute=compute, batch_size=spec.batch_size, batch_format="numpy", num_cpus=0.05,
                    num_gpus=0)
    args = dict(compute=compute, batch_size=spec.batch_size, batch_format="numpy", num_cpus=spec.num_cpus,
                num_gpus=spec.num_gpus)
    if spec.accelerator_type:
        args["accelerator_type"] = spec.accelerator_type
    if spec.resources:
        args["resources"] = dict(spec.resources)
    return args

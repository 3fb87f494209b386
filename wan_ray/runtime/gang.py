"""Gangs: one denoise replica spanning N devices that run each DiT forward together.

A `Gang` is held by the replica's leader (a Ray Data actor, or a Serve replica). It reserves a STRICT_PACK
placement group of N bundles (or uses the replica's own, under Serve), starts one `GangRank` actor per
bundle, lets them form a process group (NCCL on GPUs, gloo on CPUs) and load their part of the expert, and
then hands each batch of items to every rank in one call; rank 0's answer is the result. If a rank dies,
the gang is torn down, rebuilt and the batch retried (a bounded number of times). `close()` (also on
garbage collection) kills the ranks and removes the placement group it created; `sweep_gangs(prefix)`
removes what a crashed leader left behind, by name.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass, field

import ray
from ray._raylet import PlacementGroupID
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..parallel.groups import NCCL_ENV
from ..stages.records import Item

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GangSpec:
    """Everything a rank needs to build its part of a denoise stage (small and picklable)."""

    model: str  # checkpoint folder or bundled name
    expert: str  # "high", "low" or "single"
    size: int
    cfg_parallel: bool = False
    shard_weights: bool = False
    dtype: str | None = None
    num_cpus: float = 1.0  # per rank
    num_gpus: float = 0.0  # per rank
    resources: dict[str, float] = field(default_factory=dict)  # per rank
    name_prefix: str = "wan-ray-gang"
    ready_timeout_s: float = 1800.0
    test_kill_rank: int | None = None  # test-only: this rank of the first build exits on its first batch


@ray.remote
class GangRank:
    """One rank of a gang: a `Denoiser` stage whose model is parallelised over the gang."""

    def __init__(self, spec: GangSpec, rank: int, generation: int = 0):
        self.spec, self.rank, self.generation = spec, rank, generation
        self.stage = None

    def free_address(self) -> str:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def setup(self, address: str) -> None:
        import torch

        from ..models.checkpoint import open_checkpoint
        from ..parallel import init_gang, load_parallel_dit, make_groups
        from ..stages.denoise import Denoiser

        spec = self.spec
        init_gang(self.rank, spec.size, address)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = getattr(torch, spec.dtype) if spec.dtype else (torch.bfloat16 if device == "cuda" else None)
        checkpoint = open_checkpoint(spec.model)
        model = load_parallel_dit(checkpoint.experts[spec.expert], make_groups(spec.cfg_parallel),
                                  device=device, dtype=dtype, shard_weights=spec.shard_weights)
        gpus = spec.num_gpus * spec.size
        self.stage = Denoiser(checkpoint, spec.expert, device, model=model, gpus=gpus)

    def process(self, items: list[Item]) -> list[Item]:
        if self.spec.test_kill_rank == self.rank and self.generation == 0:
            os._exit(1)  # test-only fault injection: a rank dying mid-job, once
        return self.stage(items)


class Gang:
    """N ranks working as one denoise stage. Call it like a stage: `gang(items) -> items`."""

    def __init__(self, spec: GangSpec, placement: PlacementGroup | None = None, max_rebuilds: int = 2):
        self.spec = spec
        self.max_rebuilds = max_rebuilds
        self._external_pg = placement  # a Serve replica's own group: used, never removed
        self.name = f"{spec.name_prefix}-{spec.expert}-{uuid.uuid4().hex[:8]}"
        self.pg: PlacementGroup | None = None
        self.ranks: list = []
        self.generation = 0  # how many times the gang was rebuilt
        self._start()

    @property
    def stage_name(self) -> str:
        return f"denoise_{self.spec.expert}"

    def _start(self) -> None:
        spec = self.spec
        if self._external_pg is not None:
            self.pg = self._external_pg
        else:
            bundle = {"CPU": spec.num_cpus, "GPU": spec.num_gpus, **spec.resources}
            bundle = {k: v for k, v in bundle.items() if v}
            self.pg = placement_group([bundle] * spec.size, strategy="STRICT_PACK", name=self.name)
            ray.get(self.pg.ready(), timeout=spec.ready_timeout_s)
        self.ranks = [
            GangRank.options(
                num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, resources=spec.resources or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                runtime_env={"env_vars": NCCL_ENV},
            ).remote(spec, i, self.generation)
            for i in range(spec.size)
        ]
        address = ray.get(self.ranks[0].free_address.remote())
        ray.get([rank.setup.remote(address) for rank in self.ranks])

    def __call__(self, items: list[Item]) -> list[Item]:
        for attempt in range(self.max_rebuilds + 1):
            try:
                return self._run(items)
            except (RayActorError, RayTaskError) as err:
                if attempt == self.max_rebuilds:
                    reason = f"gang for {self.stage_name} failed {attempt + 1} times: {type(err).__name__}"
                    return [item.failed(self.stage_name, reason) if item.live else item for item in items]
                log.warning("a rank of %s died (%s); rebuilding the gang", self.name, type(err).__name__)
                self.close()
                self.generation += 1
                self._start()
        raise AssertionError("unreachable")

    def _run(self, items: list[Item]) -> list[Item]:
        refs = [rank.process.remote(items) for rank in self.ranks]
        pending = refs
        while pending:  # surface a dead rank at once: the others may be blocked in a collective with it
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)
        return ray.get(refs[0])

    def close(self) -> None:
        for rank in self.ranks:
            ray.kill(rank, no_restart=True)
        self.ranks = []
        if self.pg is not None and self._external_pg is None:
            remove_placement_group(self.pg)
        self.pg = None

    def __del__(self) -> None:
        try:
            if ray.is_initialized():
                self.close()
        except Exception:  # interpreter shutdown: the driver's sweep removes what is left
            pass


def sweep_gangs(prefix: str = "wan-ray-gang") -> int:
    """Remove placement groups left by gang leaders that died without closing (Ray runs no destructor
    for a crashed actor). Returns how many were removed."""
    removed = 0
    for pg_id, info in placement_group_table().items():
        if info.get("name", "").startswith(prefix) and info.get("state") != "REMOVED":
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
            removed += 1
    return removed

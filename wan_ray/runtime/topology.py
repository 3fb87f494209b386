"""Topologies: how many replicas of each stage run, on what resources, in what shape.

A topology file (`configs/topologies/*.yaml`) is read into `Topology`. Misspelled keys are errors, not
silently ignored. Per stage:

- `replicas`: a fixed count, or `{min, max}` for an autoscaling pool;
- `num_cpus`, `num_gpus`: per replica, or per rank for a denoise gang (a gang of N ranks takes N times that);
- `accelerator_type`, `resources`: where a replica may run (node types of a cluster, see cluster.yaml);
- `batch_size`: rows per call;
- denoise stages only: `gang_size` (GPUs running one DiT forward together with Ulysses sequence
  parallelism), `cfg_parallel` (conditional and unconditional passes on two halves of the gang) and
  `shard_weights` (FSDP-style sharding of the expert's weights across the gang's ranks); and two opt-in,
  lossy accelerations: `fp8` (FP8 linear layers, `wan_ray.models.fp8`) and `step_cache` (a threshold for
  skipping the blocks on steps whose input barely changed, `wan_ray.sampling.cache`); and `attention`, the
  experts' attention backend (`wan_ray.models.attention`: e.g. `cudnn`, or `quantized`, lossy and opt-in).

Stage names are those of `wan_ray.stages`: `text_encode`, `image_encode`, `denoise_high`, `denoise_low`,
`denoise_single`, `decode`, `write`. A stage the topology does not name gets the `defaults`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..models.attention import BACKENDS
from ..models.config import TaskSpec

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "topologies"  # configs/topologies
STAGES = ("text_encode", "image_encode", "denoise_high", "denoise_low", "denoise_single", "decode", "write")
GANG_SIZES = (1, 2, 4, 8)


class TopologyError(ValueError):
    """A topology file is malformed or cannot run on the given model or cluster."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReplicaRange(_Strict):
    min: int = Field(ge=1, description="replicas kept even when idle (Ray Data pools cannot scale to zero)")
    max: int = Field(ge=1, description="replicas at most")

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaRange:
        if self.min > self.max:
            raise ValueError(f"replicas min {self.min} is above max {self.max}")
        return self


class StageSpec(_Strict):
    replicas: int | ReplicaRange = Field(1, description="fixed count, or {min, max} to autoscale")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica (per rank for a gang)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (per rank for a gang)")
    accelerator_type: str | None = Field(None, description="e.g. H100, L40S: run only on such nodes")
    resources: dict[str, float] = Field(default_factory=dict, description="custom resources per replica")
    batch_size: int = Field(1, ge=1, description="rows per call")
    gang_size: int = Field(1, description="denoise only: GPUs per replica, 1, 2, 4 or 8")
    cfg_parallel: bool = Field(False, description="denoise only: split cond/uncond across the gang")
    shard_weights: bool = Field(False, description="denoise only: shard the expert's weights across ranks")
    fp8: bool = Field(False, description="denoise only: FP8 linear layers (lossy, opt-in; gang_size 1)")
    step_cache: float | None = Field(None, ge=0, description="denoise only: step-caching threshold (lossy, "
                                     "opt-in; gang_size 1)")
    attention: str | None = Field(None, description="denoise only: attention backend, e.g. cudnn, or "
                                  "quantized (lossy, opt-in); gang_size 1")
    dtype: str | None = Field(None, description="compute dtype: bfloat16, float16 or float32")

    @model_validator(mode="after")
    def _gang(self) -> StageSpec:
        if self.gang_size not in GANG_SIZES:
            raise ValueError(f"gang_size must be one of {GANG_SIZES}, got {self.gang_size}")
        if self.cfg_parallel and self.gang_size % 2:
            raise ValueError(f"cfg_parallel needs an even gang_size, got {self.gang_size}")
        if self.dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if self.attention is not None and self.attention not in BACKENDS:
            raise ValueError(f"attention must be one of {list(BACKENDS)}, got {self.attention!r}")
        return self

    @property
    def min_replicas(self) -> int:
        return self.replicas if isinstance(self.replicas, int) else self.replicas.min

    @property
    def max_replicas(self) -> int:
        return self.replicas if isinstance(self.replicas, int) else self.replicas.max

    @property
    def gpus_per_replica(self) -> float:
        return self.num_gpus * self.gang_size


class Topology(_Strict):
    name: str = "unnamed"
    description: str = ""
    defaults: StageSpec = Field(default_factory=StageSpec, description="for stages not listed")
    stages: dict[str, StageSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_stages(self) -> Topology:
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; stages are {list(STAGES)}")
        for name, spec in self.stages.items():
            gang = spec.gang_size > 1 or spec.cfg_parallel or spec.shard_weights
            per_replica = spec.fp8 or spec.step_cache or spec.attention
            if (gang or per_replica) and not name.startswith("denoise"):
                raise ValueError(f"{name}: gang_size, cfg_parallel, shard_weights, fp8, step_cache and "
                                 "attention are for denoise stages")
            if per_replica and spec.gang_size > 1:
                raise ValueError(f"{name}: fp8, step_cache and attention run on single-GPU replicas "
                                 "(gang_size 1) for now")
        return self

    def stage(self, name: str) -> StageSpec:
        if name not in STAGES:
            raise KeyError(f"unknown stage {name!r}; stages are {list(STAGES)}")
        return self.stages.get(name, self.defaults)

    def check_model(self, task: TaskSpec) -> None:
        """Gang sizes must divide the model's head count (Ulysses scatters heads across ranks)."""
        heads = task.dit.num_heads
        for name in ("denoise_high", "denoise_low", "denoise_single"):
            spec = self.stage(name)
            ulysses = spec.gang_size // (2 if spec.cfg_parallel else 1)
            if heads % ulysses:
                accepted = [g for g in GANG_SIZES if heads % g == 0]
                raise TopologyError(f"{self.name}: {name} gang_size {spec.gang_size} ({ulysses}-way sequence "
                                    f"parallel) does not divide {task.name}'s {heads} attention heads; gang "
                                    f"sizes that do: {accepted}")

    def check_cluster(self, resources: dict[str, float], stages: list[str]) -> None:
        """Every replica must fit the cluster at its largest (the total of each resource it can ever have),
        and so must every pool at its minimum size at once: pools keep their replicas, so a pool that cannot
        start would wait forever while the others hold the resources."""
        total: dict[str, float] = {}
        for name in stages:
            spec = self.stage(name)
            need = {"CPU": spec.num_cpus * spec.gang_size, "GPU": spec.gpus_per_replica, **spec.resources}
            for resource, amount in need.items():
                if amount > resources.get(resource, 0.0) + 1e-9:
                    have = resources.get(resource, 0.0)
                    raise TopologyError(f"{self.name}: one {name} replica needs {amount:g} {resource}, but "
                                        f"the cluster has at most {have:g}")
                total[resource] = total.get(resource, 0.0) + amount * spec.min_replicas
        for resource, amount in total.items():
            if amount > resources.get(resource, 0.0) + 1e-9:
                raise TopologyError(f"{self.name}: the stages {stages} at their minimum replicas need "
                                    f"{amount:g} {resource} together, but the cluster has at most "
                                    f"{resources.get(resource, 0.0):g}")


def bundled_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_topology(source: str | Path | dict[str, Any] | None) -> Topology:
    """Read a topology from a YAML file, a bundled preset name (`local`, `1gpu`, `8xh100`) or a dict."""
    if source is None:
        source = "local"
    if isinstance(source, dict):
        data, origin = source, "topology"
    else:
        path = Path(source)
        if not path.exists() and not path.suffix:
            path = PRESET_DIR / f"{source}.yaml"
        if not path.exists():
            raise TopologyError(f"topology {str(source)!r} is neither a file nor a bundled preset "
                                f"{bundled_presets()}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise TopologyError(f"{path} is not valid YAML: {err}") from None
        origin = str(path)
    try:
        return Topology.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'topology'}: {e['msg']}"
                             for e in err.errors())
        raise TopologyError(f"{origin}: {problems}") from None

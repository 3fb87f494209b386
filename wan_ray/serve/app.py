"""The Serve application: its settings, its deployments' options, and the builder.

`build_app(args)` is the application's import path (`wan_ray.serve.app:build_app`, as in
`configs/serve.yaml` for `serve run` / `serve deploy`) and what `wan-ray serve` calls. `args` are
`ServeArgs`; misspelled keys anywhere in them are errors, so are autoscaling keys that Serve's
`AutoscalingConfig` does not know (Serve itself would silently ignore them).

Deployments, named like the topology's stages:

    VideoAPI       the FastAPI ingress; one replica, which owns the queue (records live in storage)
    text_encode    TextEncoder
    image_encode   ImageEncoder (i2v, ti2v)
    denoise_high   Denoiser of the high-noise expert  } or denoise_single for one-expert models
    denoise_low    Denoiser of the low-noise expert   }
    decode         Decoder, then Writer (the video goes to storage from here)

Each stage deployment's CPUs, GPUs, accelerator type, custom resources, dtype and replicas (fixed, or
{min, max} to autoscale) come from the topology; `deployments.<name>` adds Serve's own options on top.
Every deployment's `graceful_shutdown_timeout_s` must exceed `video_timeout_s`, the longest a video may
take, so that downscaling or a redeploy never kills a running video.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from ray.serve.config import AutoscalingConfig

from ..models.checkpoint import BUNDLED, Checkpoint, open_checkpoint
from ..runtime.actors import StageRecipe, model_identity
from ..runtime.topology import STAGES, StageSpec, Topology, load_topology
from .auth import env_digests
from .forms import Limits
from .ingress import EndpointSettings, VideoAPI
from .records import RecordStore
from .stages import StageServer

INGRESS = "VideoAPI"
IMPORT_PATH = "wan_ray.serve.app:build_app"
DEPLOYMENTS = (INGRESS, *(s for s in STAGES if s != "write"))  # the writer runs inside `decode`
ONGOING = {"text_encode": 4, "image_encode": 4}  # videos a stage replica accepts at once (default 1)


class ServeConfigError(ValueError):
    """The application's arguments are malformed or do not fit the model."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeploymentOptions(_Strict):
    """Serve options of one deployment, on top of what the topology gives it."""

    num_cpus: float | None = Field(None, ge=0, description="VideoAPI only; stages: from the topology")
    max_ongoing_requests: int | None = Field(None, ge=1, description="calls a replica accepts at once")
    max_queued_requests: int | None = Field(None, ge=-1, description="calls waiting in callers; -1: no bound")
    autoscaling_config: dict[str, Any] | None = Field(None, description="Serve's AutoscalingConfig fields")
    graceful_shutdown_timeout_s: float | None = Field(None, ge=0, description="wait for running work")
    graceful_shutdown_wait_loop_s: float | None = Field(None, ge=0)
    health_check_period_s: float | None = Field(None, gt=0)
    health_check_timeout_s: float | None = Field(None, gt=0)

    @field_validator("autoscaling_config")
    @classmethod
    def _known_keys(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        known = sorted(AutoscalingConfig.model_fields)
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown autoscaling_config keys {unknown}; accepted: {known}")
        AutoscalingConfig(**value)  # the values: ranges, min <= max
        return value

    def serve_options(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude={"num_cpus", "autoscaling_config"})


class ServeArgs(_Strict):
    """The application's `args`."""

    model: str = Field("tiny", description="bundled model name or checkpoint folder")
    model_name: str | None = Field(None, description="the model as the API names it; default: model's name")
    topology: str | dict[str, Any] = Field("local", description="preset name, YAML file or mapping")
    storage: str = Field(description="records and videos: an absolute folder, file:// or s3:// URI")
    api_key_env: str | None = Field("WAN_RAY_API_KEY", description="variable holding accepted keys")
    api_key_sha256: tuple[str, ...] = Field((), description="SHA-256 hex digests of accepted keys")
    allow_no_key: bool = Field(False, description="serve without keys (local use only)")
    limits: Limits = Field(default_factory=Limits)
    video_timeout_s: float = Field(1800.0, gt=0, description="a video running longer fails")
    stage_attempts: int = Field(2, ge=1, description="tries of a stage whose replica dies mid-video")
    restart_attempts: int = Field(3, ge=1, description="owners a video may have before it is failed")
    takeover_interval_s: float = Field(10.0, gt=0, description="how often orphaned videos are looked for")
    deployments: dict[str, DeploymentOptions] = Field(default_factory=dict)

    @field_validator("storage")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not (value.startswith(("s3://", "file://")) or Path(value).is_absolute()):
            raise ValueError(f"storage {value!r} must be an absolute path, a file:// or an s3:// URI: "
                             "replicas do not share a working directory")
        return value

    @field_validator("api_key_sha256")
    @classmethod
    def _digests(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for digest in value:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError("api_key_sha256 holds SHA-256 hex digests of keys, never keys")
        return value

    @model_validator(mode="after")
    def _deployments(self) -> ServeArgs:
        for name, options in self.deployments.items():
            if name not in DEPLOYMENTS:
                raise ValueError(f"unknown deployment {name!r}; deployments are {list(DEPLOYMENTS)}")
            if name == INGRESS and options.autoscaling_config is not None:
                raise ValueError(f"{INGRESS} runs as one replica (it owns the queue of videos): scale the "
                                 "stage deployments instead")
            if name != INGRESS and options.num_cpus is not None:
                raise ValueError(f"{name}: a stage's CPUs come from the topology, not deployments.num_cpus")
            grace = options.graceful_shutdown_timeout_s
            if grace is not None and grace <= self.video_timeout_s:
                raise ValueError(f"{name}: graceful_shutdown_timeout_s {grace:g} must exceed video_timeout_s "
                                 f"{self.video_timeout_s:g}, or downscaling could kill a running video")
        return self

    def options(self, name: str) -> DeploymentOptions:
        return self.deployments.get(name, DeploymentOptions())


def parse_args(args: dict[str, Any] | ServeArgs) -> ServeArgs:
    if isinstance(args, ServeArgs):
        return args
    try:
        return ServeArgs.model_validate(args or {})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'args'}: {e['msg']}" for e in err.errors())
        raise ServeConfigError(f"wan-ray serve arguments: {problems}") from None


# ---------------------------------------------------------------------------------------------------------
# the application


def build_app(args: dict[str, Any]) -> serve.Application:
    """The wan-ray Serve application from its `args` (a dict, or `ServeArgs`)."""
    settings = parse_args(args)
    checkpoint = open_checkpoint(settings.model)
    model = settings.model if settings.model in BUNDLED else str(checkpoint.root.resolve())
    topology = load_topology(settings.topology)
    topology.check_model(checkpoint.task)
    if not (settings.allow_no_key or settings.api_key_sha256 or env_digests(settings.api_key_env)):
        raise ServeConfigError(f"no API key: set ${settings.api_key_env} or pass --api-key; "
                               "allow_no_key (wan-ray serve --no-api-key) is for local use only")
    store, stages = RecordStore(settings.storage), pipeline_stages(checkpoint)
    stage = serve.deployment(StageServer)
    handles = {name: stage.options(**stage_options(name, topology.stage(name), settings))
               .bind(stage_recipes(name, model, topology, store, model_identity(checkpoint)))
               for name in stages}
    endpoint = EndpointSettings(
        model=model, model_name=settings.model_name or (model if model in BUNDLED else checkpoint.task.name),
        stages=stages, storage=settings.storage, limits=settings.limits, key_digests=settings.api_key_sha256,
        api_key_env=settings.api_key_env, allow_no_key=settings.allow_no_key,
        video_timeout_s=settings.video_timeout_s, drain_timeout_s=_drain(settings),
        stage_attempts=settings.stage_attempts, restart_attempts=settings.restart_attempts,
        takeover_interval_s=settings.takeover_interval_s)
    return serve.deployment(VideoAPI).options(**ingress_options(settings)).bind(endpoint, handles)


def ingress_options(settings: ServeArgs) -> dict[str, Any]:
    own = settings.options(INGRESS)
    return {"name": INGRESS, "num_replicas": 1, "max_ongoing_requests": 256,  # polls and downloads
            "graceful_shutdown_timeout_s": _grace(INGRESS, settings),
            "ray_actor_options": {"num_cpus": 0.1 if own.num_cpus is None else own.num_cpus},
            **own.serve_options()}


def pipeline_stages(checkpoint: Checkpoint) -> tuple[str, ...]:
    """The stage deployments a video goes through, in order."""
    image = () if checkpoint.task.dit.model_type == "t2v" else ("image_encode",)
    return ("text_encode", *image, *(f"denoise_{expert}" for expert in checkpoint.experts), "decode")


def stage_recipes(name: str, model: str, topology: Topology, store: RecordStore,
                  identity: dict[str, str]) -> list[StageRecipe]:
    recipes = [StageRecipe(model=model, stage=name, spec=topology.stage(name))]
    if name == "decode":
        recipes.append(StageRecipe(model=model, stage="write", spec=topology.stage("write"),
                                   output=store.videos, identity=identity))
    return recipes


GANG_LEADER_CPUS = 0.05  # a gang's replica only hands videos to its ranks


def stage_options(name: str, spec: StageSpec, settings: ServeArgs) -> dict[str, Any]:
    """A stage deployment's Serve options: resources and replicas from the topology, then overrides."""
    overrides = settings.options(name)
    options: dict[str, Any] = {"name": name, "max_ongoing_requests": ONGOING.get(name, 1),
                               "graceful_shutdown_timeout_s": _grace(name, settings)}
    if spec.gang_size > 1:  # a gang: one bundle per rank; the replica, its leader, sits in bundle 0 too
        rank = {"CPU": spec.num_cpus, "GPU": spec.num_gpus, **spec.resources}
        if spec.accelerator_type:
            rank[f"accelerator_type:{spec.accelerator_type}"] = 0.001
        rank = {k: v for k, v in rank.items() if v}
        leader = {"CPU": GANG_LEADER_CPUS}
        first = {k: rank.get(k, 0) + leader.get(k, 0) for k in {*rank, *leader}}
        options.update(ray_actor_options={"num_cpus": GANG_LEADER_CPUS, "num_gpus": 0},
                       placement_group_bundles=[first] + [rank] * (spec.gang_size - 1),
                       placement_group_strategy="STRICT_PACK")
    else:
        actor: dict[str, Any] = {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus}
        if spec.accelerator_type:
            actor["accelerator_type"] = spec.accelerator_type
        if spec.resources:
            actor["resources"] = dict(spec.resources)
        options["ray_actor_options"] = actor
    if overrides.autoscaling_config is None and isinstance(spec.replicas, int):
        options["num_replicas"] = spec.replicas
    else:  # a replica works on one video at a time: more than one ongoing means videos wait
        options["autoscaling_config"] = {"min_replicas": spec.min_replicas, "max_replicas": spec.max_replicas,
                                         "target_ongoing_requests": 1, **(overrides.autoscaling_config or {})}
    options.update(overrides.serve_options())
    return options


def _drain(settings: ServeArgs) -> float:
    """How long the ingress waits for its running videos on shutdown: a little less than Serve does."""
    grace = _grace(INGRESS, settings)
    return max(grace - 10, 0.9 * grace)


def _grace(name: str, settings: ServeArgs) -> float:
    grace = settings.options(name).graceful_shutdown_timeout_s
    return settings.video_timeout_s + 60 if grace is None else grace


# ---------------------------------------------------------------------------------------------------------
# config files


def check_config(path: str | Path) -> dict[str, Any]:
    """Validate a Serve config file as `serve deploy` would (`ServeDeploySchema`), and the args of every
    wan-ray application in it as `build_app` would, without starting anything. Returns the parsed YAML."""
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(Path(path).read_text())
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as err:
        raise ServeConfigError(f"{path}: not a valid Serve config: {err}") from None
    for app in config.get("applications", []):
        if app.get("import_path") == IMPORT_PATH:
            parse_args(app.get("args") or {})
            load_topology((app.get("args") or {}).get("topology"))
    return config

"""The denoising loop, cut into segments that can stop on one worker and continue on another.

`DenoiseState` holds everything a segment needs to continue exactly where the last one stopped: the plan,
the latent, the index of the next step, the multistep solver's history and the image conditioning.
`to_bytes()` / `from_bytes()` ship it between processes; on a CPU, two segments in two processes give the
same latent, bit for bit, as one uninterrupted loop.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .plan import Plan, Segment
from .schedulers import FlowScheduler, make_scheduler


@dataclass(frozen=True)
class ImageCondition:
    """First-frame conditioning, constant over the loop (spec §4.5-4.6)."""

    y: torch.Tensor | None = None  # i2v: [B, 4 + z, T, h, w] mask and image latent, fed beside the noise
    first_frame: torch.Tensor | None = None  # ti2v: [B, z, 1, h, w] clean latent, re-imposed after each step
    patch: tuple[int, int, int] = (1, 2, 2)  # the DiT's patch: per-token timesteps live on its token grid

    def to(self, device: torch.device | str) -> ImageCondition:
        return dataclasses.replace(self, **{k: None if v is None else v.to(device)
                                            for k, v in (("y", self.y), ("first_frame", self.first_frame))})


@dataclass(frozen=True)
class DenoiseState:
    plan: Plan
    latent: torch.Tensor  # [B, C, T, h, w] float32
    step: int  # index of the next step to run
    solver: dict  # the scheduler's state_dict
    condition: ImageCondition | None = None

    @property
    def done(self) -> bool:
        return self.step >= self.plan.num_steps

    def to(self, device: torch.device | str) -> DenoiseState:
        condition = None if self.condition is None else self.condition.to(device)
        return dataclasses.replace(self, latent=self.latent.to(device), condition=condition,
                                   solver=_to_device(self.solver, device))

    def scheduler(self) -> FlowScheduler:
        plan = self.plan
        scheduler = make_scheduler(plan.solver, plan.num_steps, plan.shift, plan.num_train_timesteps)
        scheduler.load_state_dict(self.solver)
        return scheduler

    def to_bytes(self) -> bytes:
        """Plain tensors and Python values, readable with `torch.load(weights_only=True)`."""
        payload = {
            "plan": {**dataclasses.asdict(self.plan),
                     "segments": [dataclasses.asdict(s) for s in self.plan.segments]},
            "latent": self.latent.detach().cpu(), "step": self.step, "solver": _to_cpu(self.solver),
            "condition": None if self.condition is None else {
                "y": _to_cpu(self.condition.y), "first_frame": _to_cpu(self.condition.first_frame),
                "patch": list(self.condition.patch)},
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, device: torch.device | str = "cpu") -> DenoiseState:
        payload = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        plan_fields = payload["plan"]
        plan = Plan(**{**plan_fields, "timesteps": tuple(plan_fields["timesteps"]),
                       "segments": tuple(Segment(**s) for s in plan_fields["segments"]),
                       "latent_shape": None if plan_fields["latent_shape"] is None
                       else tuple(plan_fields["latent_shape"])})
        cond = payload["condition"]
        condition = None if cond is None else ImageCondition(
            cond["y"], cond["first_frame"], tuple(cond["patch"])).to(device)
        return cls(plan, payload["latent"].to(device), payload["step"], payload["solver"], condition)


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _to_cpu(value):
    return _to_device(value, "cpu")


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """float32 Gaussian noise from a CPU generator: the same video on every device and gang size."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def start_state(plan: Plan, noise: torch.Tensor, condition: ImageCondition | None = None) -> DenoiseState:
    """The state before step 0: the noise (with the clean first frame for ti2v) and a fresh solver."""
    if noise.ndim != 5:
        raise ValueError(f"noise must be [B, C, T, h, w], got {tuple(noise.shape)}")
    latent = _impose_first_frame(noise.float(), condition)
    solver = make_scheduler(plan.solver, plan.num_steps, plan.shift, plan.num_train_timesteps).state_dict()
    return DenoiseState(plan, latent, 0, solver, condition)


def _impose_first_frame(latent: torch.Tensor, condition: ImageCondition | None) -> torch.Tensor:
    if condition is None or condition.first_frame is None:
        return latent
    return torch.cat([condition.first_frame.to(latent), latent[:, :, 1:]], dim=2)


def model_timesteps(t: int, latent: torch.Tensor, condition: ImageCondition | None) -> torch.Tensor:
    """The DiT's timestep input: [B], or per token [B, L] with 0 on first-frame tokens (ti2v + image)."""
    B = latent.shape[0]
    if condition is None or condition.first_frame is None:
        return torch.full((B,), float(t), device=latent.device)
    T, h, w = (n // p for n, p in zip(latent.shape[2:], condition.patch, strict=True))
    per_token = torch.full((B, T, h, w), float(t), device=latent.device)
    per_token[:, 0] = 0.0  # the first frame is clean
    return per_token.flatten(1)


def pad_contexts(contexts: list[torch.Tensor]) -> torch.Tensor:
    """[L_i, D] text embeddings -> [B, max L_i, D], zero rows after each (the DiT pads with zeros anyway)."""
    length = max(c.shape[0] for c in contexts)
    return torch.stack([F.pad(c, (0, 0, 0, length - c.shape[0])) for c in contexts])


def guided_velocity(model: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                    context_null: torch.Tensor, scale: float, y: torch.Tensor | None = None,
                    batched: bool = True) -> torch.Tensor:
    """Classifier-free guidance: v_uncond + scale * (v_cond - v_uncond).

    `batched` runs both passes as one forward of batch 2B (faster on a GPU, and what CFG parallelism splits
    across a gang); otherwise two forwards, as the official code does. A scale of 1 needs no uncond pass.
    """
    if scale == 1.0:
        return model(x, t, context, y=y)
    if not batched:
        return _combine(model(x, t, context, y=y), model(x, t, context_null, y=y), scale)
    contexts = pad_contexts([*context, *context_null])
    two = lambda a: None if a is None else torch.cat([a, a])
    cond, uncond = model(two(x), two(t), contexts, y=two(y)).chunk(2)
    return _combine(cond, uncond, scale)


def _combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


StepCallback = Callable[[int, int], None]  # (steps done, total steps)


@torch.no_grad()
def run_segment(state: DenoiseState, segment: Segment, model: nn.Module, context: torch.Tensor,
                context_null: torch.Tensor, *, batched_cfg: bool = True,
                on_step: StepCallback | None = None) -> DenoiseState:
    """Run `segment`'s steps with `model` from `state`, which must stand at the segment's first step."""
    if state.step != segment.start:
        raise ValueError(f"state is at step {state.step} but segment {segment.expert!r} starts at "
                         f"{segment.start}")
    plan, condition = state.plan, state.condition
    device = next(model.parameters()).device
    scheduler = state.scheduler()
    x = state.latent.to(device)
    context, context_null = context.to(device), context_null.to(device)
    if condition is not None:
        condition = condition.to(device)
    y = None if condition is None else condition.y
    for k in segment.steps:
        t = plan.timesteps[k]
        v = guided_velocity(model, x, model_timesteps(t, x, condition), context, context_null,
                            segment.guide_scale, y, batched=batched_cfg)
        x = _impose_first_frame(scheduler.step(v.float(), t, x), condition)
        if on_step is not None:
            on_step(k + 1, plan.num_steps)
    return DenoiseState(plan, x, segment.stop, scheduler.state_dict(), state.condition)


def sample(experts: Mapping[str, nn.Module], noise: torch.Tensor, context: torch.Tensor,
           context_null: torch.Tensor, plan: Plan, condition: ImageCondition | None = None, *,
           batched_cfg: bool = True, on_step: StepCallback | None = None) -> torch.Tensor:
    """The whole loop in one process: the final latent [B, C, T, h, w] (float32)."""
    missing = [s.expert for s in plan.segments if s.expert not in experts]
    if missing:
        raise ValueError(f"plan needs expert(s) {missing}; given {sorted(experts)}")
    state = start_state(plan, noise, condition)
    for segment in plan.segments:
        state = run_segment(state, segment, experts[segment.expert], context, context_null,
                            batched_cfg=batched_cfg, on_step=on_step)
    return state.latent

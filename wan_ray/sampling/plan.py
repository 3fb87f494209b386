"""The `Plan` record: timesteps, and the split of the steps between experts, for one video.

A plan is a pure function of (steps, shift, solver, boundary, guidance) and, through `plan_request`, of a
request and its task. Two-expert tasks (A14B) run the high-noise expert while t >= boundary * 1000 and the
low-noise expert after that, each with its own guidance scale; single-expert tasks have one segment.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.config import TaskSpec
from .request import Request
from .schedulers import make_scheduler


@dataclass(frozen=True)
class Segment:
    """A run of consecutive steps [start, stop) done by one expert with one guidance scale."""

    expert: str  # "high", "low" or "single"
    start: int
    stop: int
    guide_scale: float

    @property
    def steps(self) -> range:
        return range(self.start, self.stop)


@dataclass(frozen=True)
class Plan:
    solver: str
    num_steps: int
    shift: float
    timesteps: tuple[int, ...]
    segments: tuple[Segment, ...]
    num_train_timesteps: int = 1000
    latent_shape: tuple[int, ...] | None = None  # [C, T, h, w] of one video, when made from a request

    def segment(self, expert: str) -> Segment | None:
        return next((s for s in self.segments if s.expert == expert), None)


def make_plan(num_steps: int, shift: float, solver: str = "unipc", boundary: float | None = None,
              guide_scale: float | tuple[float, float] = 5.0, num_train_timesteps: int = 1000,
              latent_shape: tuple[int, ...] | None = None) -> Plan:
    """Timesteps of `solver` and their segments. `guide_scale` is (low-noise, high-noise) or one float."""
    timesteps = tuple(int(t) for t in make_scheduler(solver, num_steps, shift, num_train_timesteps).timesteps)
    low, high = guide_scale if isinstance(guide_scale, (tuple, list)) else (guide_scale, guide_scale)
    if boundary is None:
        if isinstance(guide_scale, (tuple, list)):
            raise ValueError("a (low-noise, high-noise) guide_scale pair needs a two-expert plan (boundary)")
        segments = (Segment("single", 0, num_steps, float(guide_scale)),)
    else:
        if not 0 < boundary < 1:
            raise ValueError(f"boundary must be in (0, 1), got {boundary}")
        threshold = boundary * num_train_timesteps
        switch = next((i for i, t in enumerate(timesteps) if t < threshold), num_steps)
        segments = tuple(s for s in (Segment("high", 0, switch, float(high)),
                                     Segment("low", switch, num_steps, float(low))) if s.start < s.stop)
    return Plan(solver=solver, num_steps=num_steps, shift=float(shift), timesteps=timesteps,
                segments=segments, num_train_timesteps=num_train_timesteps, latent_shape=latent_shape)


def latent_shape(task: TaskSpec, width: int, height: int, frames: int) -> tuple[int, int, int, int]:
    """[C, T, h, w] of the latent of a `width` x `height` x `frames` video."""
    st, sh, sw = task.vae_stride
    _, ph, pw = task.dit.patch_size
    if width % (sw * pw) or height % (sh * ph):
        raise ValueError(f"{width}x{height} is not a multiple of {sw * pw}x{sh * ph} (VAE stride x patch)")
    return (task.z_dim, (frames - 1) // st + 1, height // sh, width // sw)


def plan_request(request: Request, task: TaskSpec, width: int | None = None,
                 height: int | None = None) -> Plan:
    """The plan of a request; `width`/`height` override the requested size (image-conditioned tasks)."""
    shape = latent_shape(task, width or request.width, height or request.height, request.frames)
    return make_plan(request.steps, request.shift, request.solver, task.boundary, request.guide_scale,
                     task.num_train_timesteps, latent_shape=shape)

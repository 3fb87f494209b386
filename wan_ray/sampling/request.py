"""The `Request` record: one video to make, validated once at the door against a task's limits.

Every later stage trusts a `Request`. Validation turns loose input (manifest cells, HTTP fields, CLI flags)
into typed values and raises `RequestError` with a message that names the field, the value and what is
accepted, so a bad row becomes a readable `failed` result instead of a crash.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..models.config import TaskSpec

SOLVERS = ("unipc", "dpm++", "euler")
MAX_STEPS = 1000
MAX_PROMPT_CHARS = 10_000
_ID_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_ID_CHARS = 128


class RequestError(ValueError):
    """A request field is missing, has the wrong type, or is outside what the model accepts."""


@dataclass(frozen=True)
class Request:
    """One video: what the user asked for, with the task's defaults filled in."""

    id: str
    task: str
    prompt: str
    negative_prompt: str
    width: int  # for image-conditioned tasks, with the height an area budget (the image sets the aspect)
    height: int
    frames: int
    fps: int
    steps: int
    shift: float
    guide_scale: float | tuple[float, float]  # (low-noise, high-noise) for two-expert tasks
    solver: str
    seed: int
    image: str | None = None  # path or URI of the conditioning image (i2v, ti2v)
    extras: dict[str, Any] = field(default_factory=dict, compare=False)  # pass-through columns

    @property
    def size(self) -> str:
        return f"{self.width}*{self.height}"

    def settings(self) -> dict[str, Any]:
        """Everything that determines the output video (the key under which a result can be reused)."""
        return {"task": self.task, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
                "size": self.size, "frames": self.frames, "fps": self.fps, "steps": self.steps,
                "shift": self.shift, "guide_scale": self.guide_scale, "solver": self.solver,
                "seed": self.seed, "image": self.image}


def parse_size(size: Any) -> tuple[int, int]:
    """"832*480", "832x480" or (832, 480) -> (width, height)."""
    if isinstance(size, (tuple, list)) and len(size) == 2:
        w, h = size
    elif isinstance(size, str) and (m := re.fullmatch(r"\s*(\d+)\s*[*xX×]\s*(\d+)\s*", size)):
        w, h = m.groups()
    else:
        raise RequestError(f"size {size!r} is not WIDTH*HEIGHT or WIDTHxHEIGHT (e.g. '832*480')")
    return int(w), int(h)


def safe_id(raw: str) -> str:
    """A storage key from a user id: only [A-Za-z0-9._-], no leading dots, bounded; a hash keeps it unique."""
    cleaned = _ID_SAFE.sub("_", raw).strip("._")[:MAX_ID_CHARS - 9]
    if cleaned == raw and cleaned:
        return cleaned
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    return f"{cleaned or 'id'}-{digest}"


def content_id(*parts: Any) -> str:
    """A stable id for a row that has none, derived from its content."""
    return "r" + hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def derived_seed(*parts: Any) -> int:
    """A stable seed for a request that gives none: the same input makes the same video on every rerun."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


def frames_for_seconds(seconds: float, fps: int, max_frames: int) -> int:
    """The 4n+1 frame count nearest to seconds * fps, within [1, max_frames]."""
    n = round((seconds * fps - 1) / 4)
    return max(1, min(4 * n + 1, max_frames - (max_frames - 1) % 4))


def _number(name: str, value: Any, kind: type, *, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise RequestError(f"{name} must be a number, got {value!r}") from None
        else:
            raise RequestError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(f"{name} must be finite, got {value}")
    if kind is int:
        if float(value) != int(value):
            raise RequestError(f"{name} must be a whole number, got {value}")
        value = int(value)
    else:
        value = float(value)
    if low is not None and (value <= low if low_open else value < low):
        raise RequestError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and value > high:
        raise RequestError(f"{name} must be <= {high:g}, got {value:g}")
    return value


def _guide_scale(value: Any, task: TaskSpec) -> float | tuple[float, float]:
    if isinstance(value, (tuple, list)):
        if not task.is_moe or len(value) != 2:
            raise RequestError(f"guide_scale {value!r}: a (low-noise, high-noise) pair is accepted only by "
                               f"two-expert tasks; {task.name} takes one number")
        return tuple(_number("guide_scale", v, float, low=0) for v in value)  # type: ignore[return-value]
    scale = _number("guide_scale", value, float, low=0)
    return (scale, scale) if task.is_moe else scale


def make_request(task: TaskSpec, *, prompt: Any, id: Any = None, negative_prompt: Any = None,
                 size: Any = None, frames: Any = None, fps: Any = None, steps: Any = None,
                 shift: Any = None, guide_scale: Any = None, solver: Any = None, seed: Any = None,
                 image: Any = None, extras: dict[str, Any] | None = None) -> Request:
    """Validate loose input into a `Request`; missing values take the task's defaults."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(f"prompt must be a non-empty string, got {prompt!r}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise RequestError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")

    accepted = ", ".join(f"{w}*{h}" for w, h in task.sizes)
    width, height = parse_size(size) if size is not None else task.sizes[0]
    if image is None and (width, height) not in task.sizes:
        raise RequestError(f"size {width}*{height} is not supported by {task.name}; accepted: {accepted}")
    if image is not None:
        if not isinstance(image, str) or not image.strip():
            raise RequestError(f"image must be a path or URI string, got {image!r}")
        if task.dit.model_type == "t2v":
            raise RequestError(f"{task.name} is text-to-video and takes no image")
        if width * height > max(w * h for w, h in task.sizes) or width < 16 or height < 16:
            raise RequestError(f"size {width}*{height} is an area budget for image-conditioned {task.name}; "
                               f"accepted: at most the area of {accepted}")
    elif task.dit.model_type == "i2v":
        raise RequestError(f"{task.name} is image-to-video: an image is required")

    top = task.max_frames - (task.max_frames - 1) % 4
    frames = task.frame_num if frames is None else _number("frames", frames, int, low=1, high=task.max_frames)
    if frames % 4 != 1:
        raise RequestError(f"frames must be 4n+1 (1, 5, 9, ..., {top}), got {frames}")
    solver = task.sample_solver if solver is None else solver
    if solver not in SOLVERS:
        raise RequestError(f"solver {solver!r} is not one of {list(SOLVERS)}")
    steps = task.sample_steps if steps is None else _number("steps", steps, int, low=1, high=MAX_STEPS)
    shift = task.sample_shift if shift is None else _number("shift", shift, float, low=0, low_open=True)
    guide = _guide_scale(task.guide_scale if guide_scale is None else guide_scale, task)
    fps = task.fps if fps is None else _number("fps", fps, int, low=1, high=120)

    negative = negative_prompt if negative_prompt and negative_prompt.strip() else task.negative_prompt
    if id is None or (isinstance(id, str) and not id.strip()):
        id = content_id(task.name, prompt, negative, width, height, frames, fps, steps, shift, guide, solver,
                        seed, image)
    elif not isinstance(id, (str, int)) or isinstance(id, bool):
        raise RequestError(f"id must be a string, got {type(id).__name__}")
    if seed is None or seed == -1:
        seed = derived_seed(task.name, prompt, negative, width, height, frames, image)
    else:
        seed = _number("seed", seed, int, low=0, high=2**63 - 1)
    return Request(id=str(id), task=task.name, prompt=prompt, negative_prompt=negative, width=width,
                   height=height, frames=frames, fps=fps, steps=steps, shift=shift, guide_scale=guide,
                   solver=solver, seed=seed, image=image, extras=dict(extras or {}))

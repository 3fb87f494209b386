"""The records that travel between stages, and the envelope that carries them.

An `Item` is one input row on its way through the pipeline. It holds the validated `Request` and one slot
per hand-off record, each filled by the stage that makes it:

| slot | record | made by | read by |
|---|---|---|---|
| `embeds` | `PromptEmbeds` | TextEncoder | Denoiser |
| `image` | `ImageLatents` | ImageEncoder (i2v, ti2v) | Denoiser (first segment) |
| `state` | `DenoiseState` | Denoiser | the next Denoiser, Decoder |
| `video` | `Video` | Decoder | Writer |
| `outputs` | URIs of what was written | Writer | the results manifest |

A row that failed carries `error` (and the stage it failed in) and passes every later stage untouched, so
it still reaches the results. Tensors in records are on the CPU: records cross process boundaries.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..sampling.loop import DenoiseState, ImageCondition
from ..sampling.plan import Plan
from ..sampling.request import Request

Status = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True)
class PromptEmbeds:
    """umT5 outputs of the prompt and the negative prompt, each trimmed to its true length."""

    context: torch.Tensor  # [L, D]
    context_null: torch.Tensor  # [L_null, D]


@dataclass(frozen=True)
class ImageLatents:
    """The encoded conditioning image and the video size it sets (the request's size is an area budget)."""

    condition: ImageCondition
    width: int
    height: int


@dataclass(frozen=True)
class Video:
    """An encoded video. Decoded frames never leave the Decoder; these bytes are all that travels."""

    mp4: bytes
    thumbnail: bytes  # JPEG
    num_frames: int
    fps: int
    width: int
    height: int
    plan: Plan  # how it was sampled, for the sidecar


@dataclass(frozen=True)
class Item:
    id: str  # the row's id as given (or derived from its content)
    key: str  # the safe storage key derived from the id
    request: Request | None  # None when the row failed validation
    embeds: PromptEmbeds | None = None
    image: ImageLatents | None = None
    state: DenoiseState | None = None
    video: Video | None = None
    outputs: dict[str, str] = field(default_factory=dict)  # "video", "thumbnail", "sidecar" -> URI
    status: Status = "ok"
    error: str | None = None
    failed_stage: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    gpu_seconds: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)  # the input row's other columns, passed through
    placement: dict[str, dict[str, str]] = field(default_factory=dict)  # stage -> node_id, node_ip, node_type

    @property
    def live(self) -> bool:
        """Still to be processed: neither failed nor skipped."""
        return self.status == "ok"

    def replace(self, **changes: Any) -> Item:
        return dataclasses.replace(self, **changes)

    def failed(self, stage: str, error: str) -> Item:
        return self.replace(status="failed", error=error, failed_stage=stage, embeds=None, image=None,
                            state=None, video=None)


@dataclass(frozen=True)
class Result:
    """The outcome of one input row: exactly one per row, always."""

    id: str
    key: str
    status: Status
    video_uri: str | None = None
    thumbnail_uri: str | None = None
    sidecar_uri: str | None = None
    error: str | None = None
    failed_stage: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    gpu_seconds: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)

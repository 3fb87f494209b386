"""Video records: what the endpoint knows about each video, kept through `wan_ray.io.storage`.

A `VideoRecord` is the state of one video job: the validated request, its status and progress, who drives
it, and where its outputs are. `RecordStore` keeps records and outputs under one root (a local folder or
`s3://bucket/prefix`), so a restarted application lists and serves every video the last one made:

    records/<id>.json        one record per video
    videos/<id>.mp4 .jpg .json   the Writer's video, thumbnail and sidecar (the batch job's layout)
    videos/<id>.sprite.jpg   the spritesheet, made on first request
    inputs/<id>              the uploaded input_reference image

Records are written at each status change, not at each denoising step: progress lives in memory. This
module knows storage and records, not HTTP or Ray.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from ..io import storage
from ..sampling.request import Request

Status = Literal["queued", "in_progress", "completed", "failed"]
FINAL = ("completed", "failed")
ID_PATTERN = re.compile(r"video_[0-9a-f]{32}")


def new_video_id() -> str:
    """128 random bits: ids are unguessable, so knowing one video's id reveals no other."""
    return "video_" + secrets.token_hex(16)


def duration_text(frames: int, fps: int) -> str:
    """Seconds of video as the API shows them: '4.06' for 65 frames at 16 fps, '2' for 16 at 8."""
    return f"{frames / fps:.2f}".rstrip("0").rstrip(".")


@dataclass
class VideoRecord:
    id: str
    created_at: float  # unix seconds, with sub-second precision so that listing order is exact
    model: str
    request: dict[str, Any]  # the validated `Request`'s fields
    size: str  # "WxH": the request's, then the actual one once the input image has set the aspect
    status: Status = "queued"
    progress: int = 0  # 0-100, following the denoising steps (kept in memory, not written at each step)
    completed_at: float | None = None
    error: dict[str, str] | None = None  # {"code", "message"} of a failed video
    owner: str = ""  # the ingress replica driving this video
    attempts: int = 0  # how many times a replica started making it (restarts resume it)
    outputs: dict[str, str] = field(default_factory=dict)  # "video", "thumbnail", "sidecar" -> URI
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds

    @classmethod
    def new(cls, request: Request, model: str, created_at: float) -> VideoRecord:
        fields = json.loads(json.dumps(dataclasses.asdict(request)))  # as it will read back from storage
        return cls(id=request.id, created_at=created_at, model=model, request=fields,
                   size=f"{request.width}x{request.height}")

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def to_request(self) -> Request:
        fields = dict(self.request)
        if isinstance(fields["guide_scale"], list):
            fields["guide_scale"] = tuple(fields["guide_scale"])
        return Request(**fields)

    def to_api(self) -> dict[str, Any]:
        """The OpenAI video object, plus the Wan settings that reproduce the video."""
        r = self.request
        return {
            "id": self.id, "object": "video", "model": self.model, "status": self.status,
            "progress": self.progress, "created_at": int(self.created_at),
            "completed_at": None if self.completed_at is None else int(self.completed_at),
            "expires_at": None, "size": self.size, "seconds": duration_text(r["frames"], r["fps"]),
            "prompt": r["prompt"], "error": self.error, "remixed_from_video_id": None,
            "frames": r["frames"], "fps": r["fps"], "steps": r["steps"], "seed": r["seed"],
        }

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, default=str).encode()

    @classmethod
    def from_json(cls, data: bytes) -> VideoRecord:
        fields = json.loads(data)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in known})


class RecordStore:
    def __init__(self, root: str):
        self.root = root
        self.videos = storage.join(root, "videos")  # the Writer's output folder

    def _record(self, video_id: str) -> str:
        return storage.join(self.root, "records", f"{video_id}.json")

    def input_uri(self, video_id: str) -> str:
        return storage.join(self.root, "inputs", video_id)

    def sprite_uri(self, video_id: str) -> str:
        return storage.join(self.videos, f"{video_id}.sprite.jpg")

    def save(self, record: VideoRecord) -> None:
        self.write(record.id, record.to_json())

    def write(self, video_id: str, data: bytes) -> None:
        storage.write_bytes(self._record(video_id), data, content_type="application/json")

    def load(self, video_id: str) -> VideoRecord | None:
        try:
            return VideoRecord.from_json(storage.read_bytes(self._record(video_id)))
        except FileNotFoundError:
            return None

    def load_all(self) -> list[VideoRecord]:
        uris = [u for u in storage.list_uris(storage.join(self.root, "records")) if u.endswith(".json")]
        with ThreadPoolExecutor(8) as pool:  # S3 answers each GET in tens of ms: read them in parallel
            return list(pool.map(lambda uri: VideoRecord.from_json(storage.read_bytes(uri)), uris))

    def delete(self, record: VideoRecord) -> None:
        """The record first (the video is gone for every reader), then its files."""
        storage.delete(self._record(record.id))
        for uri in (*record.outputs.values(), self.sprite_uri(record.id), self.input_uri(record.id)):
            storage.delete(uri)

"""Writer: a finished video's MP4, thumbnail and JSON sidecar to storage (a local folder or S3).

The sidecar is written last: its presence, with the same settings fingerprint, is what tells a rerun that
a row is already done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from typing import Any

from .. import __version__
from ..io import storage
from ..sampling.request import Request
from .base import Stage
from .records import Item


def fingerprint(request: Request, model: dict[str, Any]) -> str:
    """Hash of everything that determines a row's video: its settings and the model's identity."""
    blob = json.dumps({"settings": request.settings(), "model": model}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def output_uris(output: str, key: str) -> dict[str, str]:
    return {kind: storage.join(output, f"{key}{ext}")
            for kind, ext in (("video", ".mp4"), ("thumbnail", ".jpg"), ("sidecar", ".json"))}


def versions() -> dict[str, str]:
    import torch

    out = {"wan_ray": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:
        pass
    return out


class Writer(Stage):
    name = "write"

    def __init__(self, output: str, model: dict[str, Any]):
        self.output = output
        self.model = model  # identity of the model that made the videos: task, checkpoint, layout

    def sidecar(self, item: Item) -> dict[str, Any]:
        request, video = item.request, item.video
        return {
            "id": item.id, "key": item.key, "request": {**request.settings(), "id": request.id},
            "fingerprint": fingerprint(request, self.model), "model": self.model, "seed": request.seed,
            "video": {"frames": video.num_frames, "fps": video.fps, "width": video.width,
                      "height": video.height},
            "plan": dataclasses.asdict(video.plan), "timings": item.timings, "gpu_seconds": item.gpu_seconds,
            "extras": item.extras,
            "placement": item.placement,  # stage -> the node that ran it (batch job)
            "versions": versions(),
        }

    def process(self, item: Item) -> Item:
        uris = output_uris(self.output, item.key)
        storage.write_bytes(uris["video"], item.video.mp4, content_type="video/mp4")
        storage.write_bytes(uris["thumbnail"], item.video.thumbnail, content_type="image/jpeg")
        sidecar = json.dumps(self.sidecar(item), indent=2, default=str, ensure_ascii=False)
        storage.write_bytes(uris["sidecar"], sidecar.encode(), content_type="application/json")
        return item.replace(video=None, outputs=uris)

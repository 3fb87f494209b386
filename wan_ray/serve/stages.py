"""`StageServer`: a Serve replica of one pipeline stage, built from the recipes the batch job's actors use.

A replica builds its stages once (`StageRecipe.build`, as a Ray Data actor does) and then runs one video
at a time on a worker thread, so the replica's event loop stays free for health checks and cancellation.
A call is a stream of events for the ingress: `("started", None)` when the work begins, `("progress",
(done, total))` after each denoising step, and `("item", item)` last. When the caller cancels (the video
was deleted, or timed out), the next denoising step raises `VideoCancelled`, which the stage envelope turns
into a failed item nobody waits for, and the replica is free again.

The decode deployment runs two stages, `Decoder` then `Writer`: the video's bytes go to storage from the
replica that made them and never travel back. A denoise stage whose topology asks for a gang builds a
`Gang` over the replica's own placement group (`placement_group_bundles`, one bundle per rank); a gang
reports progress and notices cancellation between segments rather than at every step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..runtime.actors import StageRecipe
from ..stages import Denoiser
from ..stages.records import Item

log = logging.getLogger(__name__)

Emit = Callable[[str, Any], None]


class VideoCancelled(Exception):
    """Raised at a denoising step of a video whose caller went away."""


class StageServer:
    def __init__(self, recipes: list[StageRecipe]):
        self.name = "+".join(recipe.stage for recipe in recipes)
        self.stages = [recipe.build() for recipe in recipes]
        self.worker = ThreadPoolExecutor(1, thread_name_prefix=f"wan-ray-{self.name}")  # one video at a time
        self.broken: str | None = None

    async def run(self, item: Item) -> AsyncIterator[tuple[str, Any]]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(kind: str, value: Any = None) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        self.worker.submit(self._work, item, emit, cancelled)
        try:
            while True:
                kind, value = await events.get()
                if kind == "error":
                    raise value
                yield kind, value
                if kind == "item":
                    return
        finally:  # finished, failed, or the caller cancelled: in every case no further step is wanted
            cancelled.set()

    def _work(self, item: Item, emit: Emit, cancelled: threading.Event) -> None:
        try:
            if cancelled.is_set():  # cancelled while it waited for the worker
                return
            emit("started")

            def progress(video_id: str, done: int, total: int) -> None:
                if cancelled.is_set():
                    raise VideoCancelled(f"video {video_id} was cancelled")
                emit("progress", (done, total))

            for stage in self.stages:
                if isinstance(stage, Denoiser):
                    stage.progress = progress
                item = stage([item])[0]
            if not item.live and "CUDA error" in (item.error or ""):
                self.broken = item.error  # the device context is unusable: let Serve replace this replica
            emit("item", item)
        except BaseException as err:  # a bug outside the stage envelope: the caller gets it
            emit("error", err)

    def check_health(self) -> None:
        if self.broken:
            raise RuntimeError(f"{self.name} replica is unusable after: {self.broken}")

    def __del__(self) -> None:
        if hasattr(self, "worker"):  # not when the constructor failed
            self.worker.shutdown(wait=False, cancel_futures=True)

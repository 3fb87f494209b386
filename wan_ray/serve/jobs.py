"""`Jobs`: the queue of videos one ingress replica drives through the stage deployments.

Each accepted video is a `VideoRecord` in storage and one asyncio task here that calls the stages in
order (text encoding, image encoding when there is an image, the denoise experts, decoding + writing),
passing the `Item` from one to the next as the batch job's pools do. A stage call is a stream of events
from the replica: `started` (the video becomes `in_progress`), `progress` (denoising steps) and finally
the `item`.

What keeps a video from being stuck `in_progress`:
- a stage replica that dies mid-video: the stage is retried on another replica (`stage_attempts`), then
  the video fails with the reason;
- a video running past `video_timeout_s` fails;
- an ingress replica that dies: every record names its `owner` replica. A new ingress resumes, from the
  start, the unfinished videos whose owner is dead, at startup and then periodically (the owner of a
  rolling update may still be finishing its own), up to `restart_attempts` times, then fails them;
- cancellation (DELETE, shutdown) writes nothing: a deleted video is removed, an interrupted one is
  resumed by the next owner.

The stage calls come in as `run_stage(name, item)`, so this module knows records and stages, not Serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from ray.exceptions import RayActorError

from ..stages.records import Item
from .errors import APIError, not_found
from .metrics import NoMetrics
from .records import RecordStore, VideoRecord

log = logging.getLogger(__name__)

RunStage = Callable[[str, Item], AsyncIterator[tuple[str, Any]]]  # (stage, item) -> its events


class StageLost(RuntimeError):
    """A stage's replicas kept dying on this video."""


class Jobs:
    def __init__(self, store: RecordStore, stages: Sequence[str], run_stage: RunStage, *, owner: str,
                 owner_alive: Callable[[str], bool], max_pending: int, video_timeout_s: float,
                 stage_attempts: int = 2, restart_attempts: int = 3, takeover_interval_s: float = 10.0,
                 metrics: Any = None):
        self.store, self.stages, self.run_stage = store, list(stages), run_stage
        self.owner, self.owner_alive = owner, owner_alive
        self.max_pending, self.video_timeout_s = max_pending, video_timeout_s
        self.stage_attempts, self.restart_attempts = stage_attempts, restart_attempts
        self.takeover_interval_s = takeover_interval_s
        self.metrics = metrics or NoMetrics()
        self.records: dict[str, VideoRecord] = {}
        self.foreign: set[str] = set()  # unfinished videos of another owner (alive, or not checked yet)
        self.tasks: dict[str, asyncio.Task] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.closing = False
        self._watcher: asyncio.Task | None = None

    # ----------------------------------------------------------------------------- startup

    def start(self) -> None:
        """Load every record, resume the unfinished ones whose owner is gone; call on the event loop."""
        for record in self.store.load_all():
            self.records[record.id] = record
            if not record.final:
                self.foreign.add(record.id)
        self._watcher = asyncio.get_running_loop().create_task(self._watch_foreign())

    async def _watch_foreign(self) -> None:
        while True:
            for video_id in list(self.foreign):
                try:
                    await self._check_foreign(video_id)
                except Exception:  # e.g. storage unreachable for a moment: look again next round
                    log.exception("video %s: could not check its owner", video_id)
            await asyncio.sleep(self.takeover_interval_s)

    async def _check_foreign(self, video_id: str) -> None:
        record = await asyncio.to_thread(self.store.load, video_id)
        alive = bool(record and not record.final and record.owner
                     and await asyncio.to_thread(self.owner_alive, record.owner))
        if video_id not in self.foreign:  # settled meanwhile (by the watcher or a request)
            return
        if record is None:
            self.foreign.discard(video_id)
            self.records.pop(video_id, None)
            return
        self.records[video_id] = record
        if record.final or not alive:
            self.foreign.discard(video_id)
        if not record.final and not alive:
            await self._take_over(record)

    async def _take_over(self, record: VideoRecord) -> None:
        if record.attempts >= self.restart_attempts:
            log.warning("video %s: interrupted %d times; failing it", record.id, record.attempts)
            await self._fail(record, "interrupted", f"the server stopped {record.attempts} times while "
                             "making this video")
            return
        log.info("video %s: resuming the video of %s", record.id, record.owner or "a stopped replica")
        record.owner, record.status, record.progress = self.owner, "queued", 0
        record.attempts += 1
        await self._save(record)
        self._spawn(record)

    def check(self) -> None:
        """For the health check: the watcher must be running."""
        if self._watcher is not None and self._watcher.done() and not self._watcher.cancelled():
            raise RuntimeError(f"the takeover watcher stopped: {self._watcher.exception()!r}")

    # ----------------------------------------------------------------------------- the API's operations

    @property
    def pending(self) -> int:
        return len(self.tasks)

    def admit(self) -> None:
        """Raise unless there is room for one more video."""
        if self.closing:
            raise APIError(503, "the server is shutting down; retry shortly", code="shutting_down")
        if self.pending >= self.max_pending:
            raise APIError(429, f"the queue is full ({self.max_pending} videos queued or in progress); retry "
                           "later", code="queue_full", headers={"Retry-After": "5"})

    async def submit(self, record: VideoRecord) -> None:
        self.admit()
        record.owner, record.attempts = self.owner, 1
        self.records[record.id] = record
        self.tasks[record.id] = None  # type: ignore[assignment]  # holds the slot while the record is saved
        try:
            await self._save(record)
        except BaseException:
            self.records.pop(record.id, None)
            self.tasks.pop(record.id, None)
            raise
        self._spawn(record)

    async def get(self, video_id: str) -> VideoRecord:
        if video_id in self.foreign:  # its owner writes it: read the latest
            await self._check_foreign(video_id)
        record = self.records.get(video_id)
        if record is None:
            raise not_found(video_id)
        return record

    def list(self, *, after: str | None, limit: int, order: str) -> tuple[list[VideoRecord], bool]:
        """A page of records by creation time (`order` "desc": newest first), after the id `after`."""
        ordered = sorted(self.records.values(), key=lambda r: (r.created_at, r.id), reverse=order == "desc")
        start = 0
        if after:
            ids = [r.id for r in ordered]
            if after not in ids:
                raise APIError(400, f"after: no video with id {after!r}", param="after", code="invalid_value")
            start = ids.index(after) + 1
        page = ordered[start:start + limit]
        return page, start + limit < len(ordered)

    async def delete(self, video_id: str) -> None:
        """Cancel the video's work if any, then remove its record and files."""
        record = await self.get(video_id)
        if video_id in self.foreign:
            raise APIError(409, "this video is being finished by a replica that is shutting down; retry in a "
                           "few seconds", code="video_busy")
        task = self.tasks.get(video_id)
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        async with self._lock(video_id):
            await asyncio.to_thread(self.store.delete, record)
        self.records.pop(video_id, None)
        self.locks.pop(video_id, None)

    async def close(self, timeout_s: float) -> None:
        """Stop taking videos, give the running ones `timeout_s` to finish, then stop them (unwritten: the
        next owner resumes them)."""
        self.closing = True
        if self._watcher is not None:
            self._watcher.cancel()
        running = {t for t in self.tasks.values() if t is not None}
        if running:
            log.info("waiting up to %.0f s for %d videos to finish", timeout_s, len(running))
            _, unfinished = await asyncio.wait(running, timeout=timeout_s)
            for task in unfinished:
                task.cancel()
            if unfinished:
                await asyncio.wait(unfinished)

    # ----------------------------------------------------------------------------- making one video

    def _spawn(self, record: VideoRecord) -> None:
        task = asyncio.get_running_loop().create_task(self._drive(record))
        self.tasks[record.id] = task
        task.add_done_callback(lambda _: self._forget(record.id, task))
        self._report_depth()

    def _forget(self, video_id: str, task: asyncio.Task) -> None:
        if self.tasks.get(video_id) is task:
            del self.tasks[video_id]
            self.locks.pop(video_id, None)  # the task wrote last; a delete makes a new lock
        self._report_depth()

    async def _drive(self, record: VideoRecord) -> None:
        # A cancellation (delete, or this replica stopping) is not caught: nothing is written for it.
        try:
            item = await asyncio.wait_for(self._pipeline(record), self.video_timeout_s)
            outcome = self._finish(record, item)
        except asyncio.TimeoutError:
            outcome = self._fail(record, "timeout", f"the video took longer than {self.video_timeout_s:g} s")
        except StageLost as err:
            outcome = self._fail(record, "interrupted", str(err))
        except Exception as err:
            log.exception("video %s failed", record.id)
            outcome = self._fail(record, "internal_error", f"{type(err).__name__}: {err}")
        try:
            await outcome
        except Exception:  # this replica shows the outcome; after a restart the video is made again
            log.exception("video %s: could not store its outcome", record.id)

    async def _pipeline(self, record: VideoRecord) -> Item:
        request = record.to_request()
        item = Item(id=record.id, key=record.id, request=request)
        for name in self.stages:
            if name == "image_encode" and request.image is None:
                continue
            item = await self._stage(record, name, item)
            if item.image is not None:  # the image set the aspect: the size is now the real one
                record.size = f"{item.image.width}x{item.image.height}"
            if not item.live:
                break
        return item

    async def _stage(self, record: VideoRecord, name: str, item: Item) -> Item:
        for attempt in range(1, self.stage_attempts + 1):
            result = None
            try:
                async with contextlib.aclosing(self.run_stage(name, item)) as events:
                    async for kind, value in events:
                        if kind == "started" and record.status == "queued":
                            record.status = "in_progress"
                            self._report_depth()
                            await self._save(record)
                        elif kind == "progress":
                            done, total = value
                            record.progress = max(record.progress, min(99, 100 * done // max(total, 1)))
                        elif kind == "item":
                            result = value
            except RayActorError as err:
                if attempt == self.stage_attempts:
                    raise StageLost(f"the {name} replica died {attempt} times while making this video "
                                    f"({type(err).__name__})") from err
                log.warning("video %s: a %s replica died (%s); retrying", record.id, name, type(err).__name__)
                continue
            if result is None:
                raise RuntimeError(f"the {name} stage ended without returning the video")
            return result
        raise AssertionError("unreachable")

    async def _finish(self, record: VideoRecord, item: Item) -> None:
        record.timings = dict(item.timings)
        if item.live:
            record.status, record.progress, record.outputs = "completed", 100, dict(item.outputs)
            record.completed_at = time.time()
            await self._save(record)
            self.metrics.finished("completed", record.completed_at - record.created_at, record.timings, None)
        else:
            await self._fail(record, "generation_failed", f"{item.failed_stage}: {item.error}",
                             stage=item.failed_stage)

    async def _fail(self, record: VideoRecord, code: str, message: str, stage: str | None = None) -> None:
        record.status, record.error = "failed", {"code": code, "message": message}
        record.completed_at, record.owner = time.time(), self.owner
        await self._save(record)
        seconds = record.completed_at - record.created_at
        self.metrics.finished("failed", seconds, record.timings, stage or code)

    # ----------------------------------------------------------------------------- bookkeeping

    def _lock(self, video_id: str) -> asyncio.Lock:
        return self.locks.setdefault(video_id, asyncio.Lock())

    async def _save(self, record: VideoRecord) -> None:
        """Write the record; a write once started always completes before its lock is released, so a
        cancelled video can never be written back after its deletion."""
        async with self._lock(record.id):
            data = record.to_json()  # here, not in the thread: the loop goes on changing the record
            write = asyncio.ensure_future(asyncio.to_thread(self.store.write, record.id, data))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                await write
                raise

    def _report_depth(self) -> None:
        mine = [self.records[i] for i in self.tasks if i in self.records]
        queued = sum(r.status == "queued" for r in mine)
        self.metrics.depth(queued, len(mine) - queued)

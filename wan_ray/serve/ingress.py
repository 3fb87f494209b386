"""`VideoAPI`: the ingress deployment, a FastAPI app speaking the OpenAI Videos API.

    POST   /v1/videos                      create (multipart form as the openai client sends it, or JSON)
    GET    /v1/videos                      list, newest first (`limit`, `after`, `order`)
    GET    /v1/videos/{id}                 retrieve
    DELETE /v1/videos/{id}                 cancel queued or running work, delete the video and its files
    GET    /v1/videos/{id}/content         `variant` = video (MP4), thumbnail (JPEG) or spritesheet (JPEG)
    GET    /health                         liveness, without a key

Every route but /health wants `Authorization: Bearer <key>`. Errors have the OpenAI shape. One replica
owns the queue (`Jobs`); records and outputs live in storage, so a new replica picks up where the last
one stopped. Retrieve answers carry `openai-poll-after-ms`, which `create_and_poll` follows: about a
tenth of the video's age, between 50 ms and 2 s.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (`request: Request`)
# from functions that Serve has serialized, where string annotations no longer resolve.
import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException

from ..io import storage
from ..io.media import decode_mp4, spritesheet
from ..models.checkpoint import open_checkpoint
from ..stages.records import Item
from .auth import KeyCheck, env_digests
from .errors import APIError, error_body, invalid, not_found
from .forms import Limits, input_image, parse_body, video_request
from .jobs import Jobs
from .metrics import Metrics
from .records import ID_PATTERN, RecordStore, VideoRecord, new_video_id

log = logging.getLogger(__name__)

VARIANTS = {"video": ("video", "video/mp4", "mp4"), "thumbnail": ("thumbnail", "image/jpeg", "jpg"),
            "spritesheet": ("spritesheet", "image/jpeg", "jpg")}


@dataclass(frozen=True)
class EndpointSettings:
    """What the ingress is given by the application builder (never an API key itself)."""

    model: str  # checkpoint name or folder, as the stage replicas open it
    model_name: str  # the model as the API names it
    stages: tuple[str, ...]  # the stage deployments in the order a video goes through them
    storage: str  # root URI of records and outputs
    limits: Limits
    key_digests: tuple[str, ...] = ()  # SHA-256 of accepted keys
    api_key_env: str | None = "WAN_RAY_API_KEY"  # accepted keys also come from here, in this process
    allow_no_key: bool = False
    video_timeout_s: float = 1800.0
    drain_timeout_s: float = 1800.0  # on shutdown, how long running videos get to finish
    stage_attempts: int = 2
    restart_attempts: int = 3
    takeover_interval_s: float = 10.0


api = FastAPI(title="wan-ray", summary="Wan2.2 video generation, OpenAI Videos API", docs_url=None,
              redoc_url=None, openapi_url=None)


@api.exception_handler(APIError)
async def _api_error(request: Request, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    return JSONResponse(error_body(err.status_code, str(err.detail)), status_code=err.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    return JSONResponse(error_body(400, str(err)), status_code=400)


@api.exception_handler(Exception)
async def _server_error(request: Request, err: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse(error_body(500, f"internal error ({type(err).__name__})"), status_code=500)


# Module-level helpers come before the class: `serve.ingress` serializes the class while decorating it,
# and with it the globals its methods use that exist by then.

async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is longer than `limit`."""
    too_large = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def poll_after_ms(record: VideoRecord) -> int:
    return int(min(2000, max(50, 100 * (time.time() - record.created_at))))


def replica_name() -> str:
    context = ray.get_runtime_context()
    return f"{context.namespace}/{context.get_actor_name()}"


def actor_alive(owner: str) -> bool:
    """Whether the replica named by a record's `owner` is still alive (names of dead actors are freed)."""
    namespace, _, name = owner.partition("/")
    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    return True


@serve.ingress(api)
class VideoAPI:
    def __init__(self, settings: EndpointSettings, stages: dict[str, Any]):
        self.settings, self.limits = settings, settings.limits
        self.task = open_checkpoint(settings.model).task
        self.model_names = (settings.model_name, self.task.name, f"Wan2.2-{self.task.name}")  # any case
        self.check_key = KeyCheck([*settings.key_digests, *env_digests(settings.api_key_env)])
        if self.check_key.open:
            if not settings.allow_no_key:
                raise RuntimeError(f"no API key: set ${settings.api_key_env} (or `wan-ray serve --api-key`), "
                                   "or allow_no_key for local use only")
            log.warning("serving WITHOUT an API key: anyone who can reach this port can make and delete "
                        "videos")
        self.handles = {name: handle.options(stream=True) for name, handle in stages.items()}
        self.store = RecordStore(settings.storage)
        self.metrics = Metrics(settings.model_name)
        self.sprite_locks: dict[str, asyncio.Lock] = {}
        self.jobs = Jobs(self.store, settings.stages, self._run_stage, owner=replica_name(),
                         owner_alive=actor_alive, max_pending=self.limits.max_pending_videos,
                         video_timeout_s=settings.video_timeout_s, stage_attempts=settings.stage_attempts,
                         restart_attempts=settings.restart_attempts,
                         takeover_interval_s=settings.takeover_interval_s, metrics=self.metrics)
        self.jobs.start()

    async def _run_stage(self, name: str, item: Item):
        stream = self.handles[name].run.remote(item)
        finished = False
        try:
            async for event in stream:
                yield event
            finished = True
        finally:
            if not finished:  # deleted, timed out or failed: stop the replica's work too
                stream.cancel()

    # ----------------------------------------------------------------------------- routes

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok", "model": self.settings.model_name}

    @api.post("/v1/videos")
    async def create(self, request: Request) -> JSONResponse:
        self.check_key(request.headers.get("authorization"))
        try:
            body = await read_body(request, self.limits.max_body_bytes)
            video_id = new_video_id()
            content_type = request.headers.get("content-type", "")
            video, image = await asyncio.to_thread(self._validate, body, content_type, video_id)
            self.jobs.admit()  # a full queue refuses before any upload is stored
            if image is not None:
                await asyncio.to_thread(storage.write_bytes, video.request["image"], image)
            await self.jobs.submit(video)
        except APIError as err:
            self.metrics.reject(err.code or str(err.status))
            raise
        return JSONResponse(video.to_api())

    def _validate(self, body: bytes, content_type: str, video_id: str) -> tuple[VideoRecord, bytes | None]:
        fields = parse_body(body, content_type)
        image = input_image(fields.get("input_reference"), self.limits)
        image_uri = None if image is None else self.store.input_uri(video_id)
        request = video_request(fields, self.task, self.limits, video_id=video_id,
                                model_names=self.model_names, image_uri=image_uri)
        return VideoRecord.new(request, self.settings.model_name, time.time()), image

    @api.get("/v1/videos")
    async def list_videos(self, request: Request) -> JSONResponse:
        self.check_key(request.headers.get("authorization"))
        query = request.query_params
        order = query.get("order") or "desc"
        if order not in ("asc", "desc"):
            raise invalid(f"order must be 'asc' or 'desc', got {order!r}", "order")
        try:
            limit = int(query.get("limit") or 20)
        except ValueError:
            raise invalid(f"limit must be a whole number, got {query.get('limit')!r}", "limit") from None
        if not 1 <= limit <= 100:
            raise invalid(f"limit must be between 1 and 100, got {limit}", "limit")
        page, more = self.jobs.list(after=query.get("after") or None, limit=limit, order=order)
        first, last = (page[0].id, page[-1].id) if page else (None, None)
        return JSONResponse({"object": "list", "data": [r.to_api() for r in page], "first_id": first,
                             "last_id": last, "has_more": more})

    @api.get("/v1/videos/{video_id}")
    async def retrieve(self, video_id: str, request: Request) -> JSONResponse:
        self.check_key(request.headers.get("authorization"))
        record = await self._record(video_id)
        headers = {} if record.final else {"openai-poll-after-ms": str(poll_after_ms(record))}
        return JSONResponse(record.to_api(), headers=headers)

    @api.delete("/v1/videos/{video_id}")
    async def delete(self, video_id: str, request: Request) -> JSONResponse:
        self.check_key(request.headers.get("authorization"))
        await self._record(video_id)
        await self.jobs.delete(video_id)
        return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})

    @api.get("/v1/videos/{video_id}/content")
    async def content(self, video_id: str, request: Request) -> Response:
        self.check_key(request.headers.get("authorization"))
        variant = request.query_params.get("variant") or "video"
        if variant not in VARIANTS:
            raise invalid(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}", "variant")
        record = await self._record(video_id)
        if record.status != "completed":
            why = f": {record.error['message']}" if record.error else ""
            raise APIError(409, f"video {video_id} is {record.status}{why}; its content is available once it "
                           "is completed", code="video_not_ready", headers={"x-should-retry": "false"})
        kind, media_type, extension = VARIANTS[variant]
        try:
            if kind == "spritesheet":
                data = await self._spritesheet(record)
            else:
                data = await asyncio.to_thread(storage.read_bytes, record.outputs[kind])
        except (FileNotFoundError, KeyError):
            raise APIError(404, f"the {variant} of video {video_id} is missing from storage",
                           code="content_missing") from None
        disposition = f'inline; filename="{video_id}.{extension}"'
        return Response(data, media_type=media_type, headers={"Content-Disposition": disposition})

    async def _record(self, video_id: str) -> VideoRecord:
        if not ID_PATTERN.fullmatch(video_id):
            raise not_found(video_id)
        return await self.jobs.get(video_id)

    async def _spritesheet(self, record: VideoRecord) -> bytes:
        """Made from the MP4 on first request, then kept: few callers want one, and making it is work."""
        uri = self.store.sprite_uri(record.id)
        async with self.sprite_locks.setdefault(record.id, asyncio.Lock()):
            if await asyncio.to_thread(storage.exists, uri):
                return await asyncio.to_thread(storage.read_bytes, uri)

            def make() -> bytes:
                frames, _ = decode_mp4(storage.read_bytes(record.outputs["video"]))
                sheet = spritesheet(frames)
                storage.write_bytes(uri, sheet, content_type="image/jpeg")
                return sheet

            return await asyncio.to_thread(make)

    # ----------------------------------------------------------------------------- Serve's hooks

    def check_health(self) -> None:
        self.jobs.check()

    async def __del__(self) -> None:
        if hasattr(self, "jobs"):  # not when the constructor failed
            await self.jobs.close(self.settings.drain_timeout_s)

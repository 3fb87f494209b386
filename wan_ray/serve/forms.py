"""`POST /v1/videos` bodies to validated `Request`s.

The `openai` client sends a multipart form (every field a string, `extra_body` fields merged in, nested
values as `name[key]` and lists as `name[]`); other clients send JSON. Both become one dict of fields,
which `video_request` checks against the endpoint's `Limits` and the model (through `make_request`) and
turns into a `Request`. Every problem is an `APIError` 400 naming the field and what is accepted.

Fields: the OpenAI ones (`prompt`, `model`, `size` "WxH", `seconds`, `input_reference`) and the Wan ones
(`negative_prompt`, `seed`, `steps`, `guidance_scale`, `frames`, `fps`). `seconds` becomes the 4n+1 frame
count nearest to seconds x fps; `frames` overrides it. `input_reference` is an uploaded image, or
`{"image_url": "data:image/...;base64,..."}`: the server never fetches URLs (no requests on a caller's
behalf into the network it runs in).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass, field
from email.message import Message
from email.utils import collapse_rfc2231_value
from typing import Any
from urllib.parse import parse_qsl

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from ..models.config import TaskSpec
from ..sampling.request import Request, RequestError, frames_for_seconds, make_request
from .errors import APIError, invalid

FIELDS = ("prompt", "model", "size", "seconds", "input_reference", "negative_prompt", "seed", "steps",
          "guidance_scale", "frames", "fps")
_API_NAMES = {"guide_scale": "guidance_scale", "image": "input_reference"}  # Request field -> API field


class Limits(BaseModel):
    """What one request may ask for; beyond these it gets a 400 (or 413 for the body, 429 for the queue)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_prompt_chars: int = Field(2000, ge=1, description="prompt and negative prompt, each")
    max_steps: int = Field(100, ge=1, description="denoising steps")
    max_frames: int | None = Field(None, ge=1, description="frames per video; default: the model's limit")
    max_upload_bytes: int = Field(16 * 2**20, ge=1024, description="input_reference image, encoded")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="input_reference image, decoded")
    max_pending_videos: int = Field(32, ge=1, description="videos queued or in progress; then 429")

    @property
    def max_body_bytes(self) -> int:
        return self.max_upload_bytes + 2**20  # the image plus the other fields and multipart framing


@dataclass(frozen=True)
class Upload:
    data: bytes = field(repr=False)  # never into a message or a log
    filename: str | None = None


# ---------------------------------------------------------------------------------------------------------
# bodies to fields


def parse_body(body: bytes, content_type: str) -> dict[str, Any]:
    """JSON, multipart/form-data or urlencoded bytes -> a dict of fields (uploads as `Upload`)."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            fields = json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise invalid(f"the body is not valid JSON: {err}") from None
        if not isinstance(fields, dict):
            raise invalid(f"the JSON body must be an object, got {type(fields).__name__}")
        return fields
    if kind == "multipart/form-data":
        return _nest(parse_multipart(body, content_type))
    if kind == "application/x-www-form-urlencoded":
        return _nest([(k, v) for k, v in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)])
    raise APIError(415, f"Content-Type {kind or '(none)'!r} is not accepted: send application/json or "
                   "multipart/form-data", code="unsupported_media_type")


def parse_multipart(body: bytes, content_type: str) -> list[tuple[str, str | Upload]]:
    """(name, value) pairs of a multipart/form-data body; parts with a filename become `Upload`s."""
    boundary = _header_param("content-type", content_type, "boundary")
    if not boundary:
        raise invalid("multipart/form-data without a boundary parameter")
    # A delimiter is CRLF + "--" + boundary (RFC 2046); the first one may start the body without the CRLF.
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    if len(chunks) < 2 or not chunks[-1].startswith(b"--"):
        raise invalid("malformed multipart body: no closing boundary")
    fields = []
    for chunk in chunks[1:-1]:
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise invalid("malformed multipart body: a part without headers")
        headers = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        disposition = headers.get("content-disposition", "")
        name = _header_param("content-disposition", disposition, "name")
        if not name:
            raise invalid("malformed multipart body: a part without a name")
        filename = _header_param("content-disposition", disposition, "filename")
        if filename is not None or "filename=" in disposition:
            fields.append((name, Upload(content, filename)))
        else:
            fields.append((name, content.decode("utf-8", "replace")))
    return fields


def _header_param(header: str, value: str, param: str) -> str | None:
    """A parameter of a header value (quoted or not, RFC 2231 or not), parsed by the stdlib."""
    message = Message()
    message[header] = value
    found = message.get_param(param, header=header)
    return None if found is None else collapse_rfc2231_value(found)


def _nest(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Form names as the client flattens them: `a[b]` -> {"a": {"b": ...}}, `a[]` -> {"a": [...]}."""
    out: dict[str, Any] = {}
    for name, value in pairs:
        match = re.fullmatch(r"([^\[\]]+)\[([^\[\]]*)\]", name)
        if match is None:
            out[name] = value
        elif match.group(2) == "":
            out.setdefault(match.group(1), []).append(value)
        else:
            out.setdefault(match.group(1), {})[match.group(2)] = value
    return out


# ---------------------------------------------------------------------------------------------------------
# fields to a request


def input_image(value: Any, limits: Limits) -> bytes | None:
    """The `input_reference` field -> the image's encoded bytes (checked to decode), or None."""
    if value is None or value == "":
        return None
    if isinstance(value, Upload):
        data = value.data
    else:
        if isinstance(value, dict):
            if "file_id" in value:
                raise invalid("input_reference.file_id is not supported: upload the image, or give "
                              "input_reference.image_url as a data: URL", "input_reference")
            value = value.get("image_url")
        if not isinstance(value, str) or not value.startswith("data:"):
            raise invalid("input_reference must be an uploaded image file or a base64 data: URL "
                          "(data:image/png;base64,...); this server does not fetch URLs", "input_reference")
        header, _, payload = value.partition(",")
        if not header.endswith(";base64"):
            raise invalid("input_reference data: URL must be base64-encoded", "input_reference")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise invalid("input_reference data: URL has invalid base64", "input_reference") from None
    if len(data) > limits.max_upload_bytes:
        raise APIError(413, f"input_reference is {len(data)} bytes; at most {limits.max_upload_bytes} are "
                       "accepted", param="input_reference", code="file_too_large")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # read from the header: no decoding yet
            if width * height > limits.max_image_pixels:
                raise invalid(f"input_reference is {width}x{height} pixels; at most {limits.max_image_pixels}"
                              " pixels are accepted", "input_reference")
            image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise invalid(f"input_reference is not an image Pillow can read (PNG, JPEG, WebP, ...): "
                      f"{type(err).__name__}", "input_reference") from None
    return data


def video_request(fields: dict[str, Any], task: TaskSpec, limits: Limits, *, video_id: str,
                  model_names: tuple[str, ...], image_uri: str | None) -> Request:
    """Check the fields against the limits and the model; `image_uri` is where the upload will be."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise invalid(f"unknown field {unknown[0]!r}; accepted: {', '.join(FIELDS)}", unknown[0],
                      code="unknown_parameter")
    files = sorted(k for k, v in fields.items() if isinstance(v, Upload) and k != "input_reference")
    if files:
        raise invalid(f"{files[0]} must be a form field, not a file upload", files[0])
    model = fields.get("model")
    if model not in (None, "") and str(model).lower() not in {name.lower() for name in model_names}:
        raise invalid(f"model {model!r} is not served here; this endpoint serves {model_names[0]!r}", "model",
                      code="model_not_found")
    prompt = fields.get("prompt")
    if prompt is None:
        raise invalid("prompt is required", "prompt", code="missing_required_parameter")
    for name in ("prompt", "negative_prompt"):
        text = fields.get(name)
        if isinstance(text, str) and len(text) > limits.max_prompt_chars:
            raise invalid(f"{name} has {len(text)} characters; at most {limits.max_prompt_chars} are "
                          "accepted", name)
    max_frames = min(task.max_frames, limits.max_frames or task.max_frames)
    fps = _positive("fps", fields.get("fps"), task.fps)
    frames = _blank_to_none(fields.get("frames"))
    if frames is None and _blank_to_none(fields.get("seconds")) is not None:
        seconds = _positive("seconds", fields["seconds"], None)
        longest = max_frames / fps
        if seconds > longest + 0.5 / fps:
            raise invalid(f"seconds {seconds:g} is longer than this model's longest video, {longest:.2f} s "
                          f"({max_frames} frames at {fps:g} fps)", "seconds")
        frames = frames_for_seconds(seconds, round(fps), max_frames)
    steps = _blank_to_none(fields.get("steps"))
    _at_most("frames", frames, max_frames)
    _at_most("steps", steps, limits.max_steps)
    try:
        return make_request(task, id=video_id, prompt=prompt, negative_prompt=fields.get("negative_prompt"),
                            size=_blank_to_none(fields.get("size")), frames=frames,
                            fps=_blank_to_none(fields.get("fps")), steps=steps,
                            guide_scale=_blank_to_none(fields.get("guidance_scale")),
                            seed=_blank_to_none(fields.get("seed")), image=image_uri)
    except RequestError as err:
        raise _api_error(str(err)) from None


def _blank_to_none(value: Any) -> Any:
    return None if value is None or (isinstance(value, str) and not value.strip()) else value


def _at_most(name: str, value: Any, high: int) -> None:
    """The endpoint's own ceiling; a value that is not a number is left to `make_request` to explain."""
    try:
        too_big = value is not None and float(value) > high
    except (TypeError, ValueError):
        return
    if too_big:
        raise invalid(f"{name} must be <= {high}, got {value}", name)


def _positive(name: str, value: Any, default: float | None) -> float:
    value = _blank_to_none(value)
    if value is None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise invalid(f"{name} must be a number, got {value!r}", name) from None
    if not 0 < number < float("inf"):
        raise invalid(f"{name} must be a positive number, got {value!r}", name)
    return number


def _api_error(message: str) -> APIError:
    """A `RequestError` in the API's words: its field names, sizes written WxH."""
    first = message.split(" ", 1)[0]
    param = _API_NAMES.get(first, first if first in FIELDS else None)
    if param is None and "image" in message:  # "... is image-to-video: an image is required"
        param = "input_reference"
    if param and param != first:
        message = param + message[len(first):]
    if param == "size":
        message = re.sub(r"(\d+)\*(\d+)", r"\1x\2", message)
    return invalid(message, param)

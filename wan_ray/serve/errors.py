"""Errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP status.

`APIError` is raised anywhere below the routes (parsing, validation, the job queue) and turned into a
response by the ingress's exception handler. This module knows HTTP status codes, not FastAPI or Ray.
"""

from __future__ import annotations

from typing import Any

# status -> the OpenAI error `type` that clients see for it
TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         409: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
         429: "rate_limit_error", 503: "server_error", 500: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(video_id: str) -> APIError:
    return APIError(404, f"no video with id {video_id!r}", param="video_id", code="not_found")

"""Bearer API keys, compared by their SHA-256 digests.

Keys come from `--api-key` (the CLI passes only its digest to the application, so no key sits in the
deployment's arguments) and from an environment variable (`WAN_RAY_API_KEY`, comma-separated for
rotation) read in the ingress's own process. Keys are never logged; failed checks say only what was wrong
with the header.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from .errors import APIError


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def env_digests(variable: str | None) -> list[str]:
    """Digests of the comma-separated keys in `$variable` (none if unset or empty)."""
    raw = os.environ.get(variable, "") if variable else ""
    return [key_digest(k.strip()) for k in raw.split(",") if k.strip()]


class KeyCheck:
    """Checks `Authorization: Bearer <key>` against a set of digests; with none, lets everyone in."""

    def __init__(self, digests: list[str]):
        self.digests = [bytes.fromhex(d) for d in digests]

    @property
    def open(self) -> bool:
        return not self.digests

    def __call__(self, authorization: str | None) -> None:
        if self.open:
            return
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        digest = hashlib.sha256(key.strip().encode()).digest()
        # compare against every key, in constant time per key: timing reveals nothing about a near match
        if not any([hmac.compare_digest(digest, d) for d in self.digests]):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

"""Storage addressed by URI: plain paths, `file://` URIs and `s3://bucket/key`.

Every function takes a URI string and picks the backend from its scheme, so callers never branch on
where their outputs go. S3 goes through one lazily created boto3 client per process, configured only
by the standard AWS configuration (`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3`, credential env vars
or profiles, `AWS_REGION` / `AWS_DEFAULT_REGION`); `arrow_filesystem` builds the matching
pyarrow filesystem from the same settings for Parquet and Ray Data.

Semantics are those of an object store, also for local paths: a URI names a file (object), `list_uris`
is recursive, `delete` of a missing object is not an error. Local writes are atomic (temp file +
rename), so a crash never leaves a half-written file that a resumed job would take for finished.

This module knows nothing about videos, manifests or Ray. It never logs, and its errors never carry
credentials: they name the URI, the bucket or the endpoint (without user info), nothing else.
"""

from __future__ import annotations

import contextlib
import io
import mimetypes
import os
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import boto3
import botocore.config
import botocore.credentials
import botocore.exceptions
import pyarrow.fs as pafs
from boto3.s3.transfer import TransferConfig

ACCEPTED = "plain paths, file:// URIs and s3://bucket/key URIs"
PART_SIZE = 8 * 2**20  # multipart threshold and part size (boto3's default; S3 needs parts >= 5 MiB)

# S3 bucket naming rules: 3-63 chars of lowercase letters, digits, '.' and '-', alphanumeric ends.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_TMP_PREFIX, _TMP_SUFFIX = ".", ".part"  # names of in-flight atomic writes, hidden from list_uris


# ----------------------------------------------------------------------------- URIs


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _scheme(uri: str) -> str:
    """'' for plain paths, else the scheme; raises on schemes we do not serve."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", str(uri))
    scheme = match.group(1).lower() if match else ""
    if scheme not in ("", "file", "s3"):
        raise ValueError(f"unsupported URI scheme {scheme!r} in {uri!r}: accepted are {ACCEPTED}")
    return scheme


def split_s3(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b'); validates the bucket name."""
    bucket, _, key = str(uri)[len("s3://") :].partition("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ValueError(
            f"invalid S3 bucket name {bucket!r} in {uri!r}: bucket names are 3-63 characters of "
            "lowercase letters, digits, '.' and '-', starting and ending with a letter or digit"
        )
    return bucket, key


def _local_path(uri: str) -> Path:
    if _scheme(uri) == "":
        return Path(uri)
    parts = urlsplit(str(uri))
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file:// URI {uri!r} names host {parts.netloc!r}: only local files are accepted")
    return Path(url2pathname(parts.path))


def _object_key(uri: str) -> tuple[str, str]:
    bucket, key = split_s3(uri)
    if not key or key.endswith("/"):
        raise ValueError(f"S3 URI {uri!r} names no object: expected s3://bucket/key")
    return bucket, key


def join(base_uri: str, *parts: str) -> str:
    """Join path parts onto a base with '/', keeping the base's form (plain path, file://, s3://)."""
    _scheme(base_uri)
    base = str(base_uri)
    for part in parts:
        part = str(part).strip("/")
        if part:
            base = f"{base}{part}" if base.endswith("/") else f"{base}/{part}"
    return base


# ----------------------------------------------------------------------------- S3 client

_client_lock = threading.Lock()
_cached: tuple[int, boto3.session.Session, object] | None = None  # (pid, session, client)


def _s3() -> tuple[boto3.session.Session, object]:
    global _cached
    with _client_lock:
        if _cached is None or _cached[0] != os.getpid():  # a forked child makes its own
            # botocore reads AWS_DEFAULT_REGION and profiles but not AWS_REGION, which newer SDKs prefer
            session = boto3.session.Session(region_name=os.environ.get("AWS_REGION") or None)
            config = botocore.config.Config(retries={"mode": "standard", "max_attempts": 5})
            _cached = (os.getpid(), session, session.client("s3", config=config))
        return _cached[1], _cached[2]


def s3_client():
    """The process's boto3 S3 client, created on first use from the standard AWS configuration."""
    return _s3()[1]


def reset_s3_client() -> None:
    """Forget the cached client, so the next call reads the AWS configuration again (tests, env changes)."""
    global _cached
    with _client_lock:
        _cached = None


def _endpoint(client) -> tuple[str, str]:
    """(scheme, 'host[:port]') of the client's endpoint, without any user info it may carry."""
    parts = urlsplit(client.meta.endpoint_url)
    return parts.scheme, (parts.hostname or "") + (f":{parts.port}" if parts.port else "")


@contextlib.contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Turn botocore's errors into the builtin ones, naming the URI and never a credential."""
    try:
        yield
    except botocore.exceptions.ClientError as err:
        error = err.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code == "NoSuchBucket":
            raise FileNotFoundError(f"S3 bucket {split_s3(uri)[0]!r} does not exist ({uri})") from err
        if code in ("NoSuchKey", "404", "NotFound"):
            raise FileNotFoundError(f"no such object: {uri}") from err
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise PermissionError(f"S3 refused access to {uri} ({code})") from err
        raise OSError(f"S3 request for {uri} failed: {code} {error.get('Message', '')}".rstrip()) from err
    except botocore.exceptions.NoCredentialsError as err:
        raise PermissionError(
            f"no AWS credentials for {uri}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE "
            "or an instance role"
        ) from err
    except botocore.exceptions.EndpointConnectionError as err:
        scheme, host = _endpoint(s3_client())
        raise ConnectionError(f"cannot reach the S3 endpoint {scheme}://{host} for {uri}") from err


# ----------------------------------------------------------------------------- operations


def read_bytes(uri: str) -> bytes:
    if _scheme(uri) == "s3":
        bucket, key = _object_key(uri)
        with _s3_errors(uri):
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    path = _local_path(uri)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {uri}")
    return path.read_bytes()


def write_bytes(
    uri: str, data: bytes, content_type: str | None = None, *, part_size: int = PART_SIZE
) -> None:
    """Write an object whole. S3 payloads above `part_size` go up as a multipart upload in parts of
    `part_size` (S3 needs >= 5 MiB). The content type defaults to a guess from the extension."""
    if _scheme(uri) == "s3":
        bucket, key = _object_key(uri)
        content_type = content_type or mimetypes.guess_type(key)[0] or "application/octet-stream"
        transfer = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size)
        with _s3_errors(uri):
            s3_client().upload_fileobj(
                io.BytesIO(data), bucket, key, ExtraArgs={"ContentType": content_type}, Config=transfer
            )
        return
    _atomic_write(_local_path(uri), data)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write next to the target, fsync, then rename over it: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, like open()
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def exists(uri: str) -> bool:
    """Whether an object (a file, for local paths) exists at `uri`."""
    if _scheme(uri) == "s3":
        bucket, key = _object_key(uri)
        try:
            with _s3_errors(uri):
                s3_client().head_object(Bucket=bucket, Key=key)
        except FileNotFoundError:  # HEAD has no body: a missing bucket is a 404 as well
            return False
        return True
    return _local_path(uri).is_file()


def list_uris(prefix_uri: str) -> list[str]:
    """Sorted URIs of all objects below a folder-like prefix, recursively ('a/b' lists 'a/b/...',
    not 'a/bc'). An absent prefix lists as empty."""
    if _scheme(prefix_uri) == "s3":
        bucket, key = split_s3(prefix_uri)
        prefix = key if not key or key.endswith("/") else key + "/"
        keys = []
        with _s3_errors(prefix_uri):
            for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                # keys ending in '/' are folder markers (pyarrow's create_dir makes them), not objects
                keys += [obj["Key"] for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
        return sorted(f"s3://{bucket}/{k}" for k in keys)
    root = _local_path(prefix_uri)
    if not root.is_dir():
        return []
    files = [
        p
        for p in root.rglob("*")
        if p.is_file() and not (p.name.startswith(_TMP_PREFIX) and p.name.endswith(_TMP_SUFFIX))
    ]
    return sorted(join(prefix_uri, p.relative_to(root).as_posix()) for p in files)


def delete(uri: str) -> None:
    """Delete one object; deleting a missing object is not an error (a missing bucket is)."""
    if _scheme(uri) == "s3":
        bucket, key = _object_key(uri)
        with _s3_errors(uri):
            s3_client().delete_object(Bucket=bucket, Key=key)
        return
    path = _local_path(uri)
    if path.is_dir():
        raise IsADirectoryError(f"delete() removes objects, and {uri} is a directory")
    path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- pyarrow


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for `uri`, for pyarrow.parquet and Ray Data
    (`read_parquet(path, filesystem=fs)`). For S3 it is configured from boto3's view of the AWS
    configuration, since pyarrow does not reliably read AWS_ENDPOINT_URL and Ray Data would otherwise
    ask real AWS for the bucket's region."""
    if _scheme(uri) != "s3":
        return pafs.LocalFileSystem(), str(_local_path(uri).absolute())
    bucket, key = split_s3(uri)
    session, client = _s3()
    scheme, host = _endpoint(client)
    custom = not host.split(":")[0].endswith((".amazonaws.com", ".amazonaws.com.cn"))
    options: dict = {}
    if custom:  # MinIO, moto, Ceph, ...: pyarrow sends path-style requests to this host
        options |= {"endpoint_override": host, "scheme": scheme}
    default_region = "us-east-1" if custom else None
    options["region"] = session.region_name or default_region or pafs.resolve_s3_region(bucket)
    options |= _arrow_credentials(session.get_credentials())
    # Delayed open sends a small file as one PUT rather than a three-request multipart upload: faster,
    # and it sidesteps moto 5.2.1's misnamed CompleteMultipartUpload reply, which pyarrow rejects
    # (getmoto/moto#10055). Errors such as a missing bucket then surface when the file is closed.
    options["allow_delayed_open"] = True
    return pafs.S3FileSystem(**options), f"{bucket}/{key}".rstrip("/")


def _arrow_credentials(creds: botocore.credentials.Credentials | None) -> dict:
    """Static credentials (env vars, profiles) are handed over as they are. Refreshable ones (instance
    roles, assumed roles, SSO) would expire inside a long job if frozen now, so for those pyarrow's own
    AWS SDK resolves and refreshes them from the same configuration."""
    if creds is None:
        return {"anonymous": True}
    if isinstance(creds, botocore.credentials.RefreshableCredentials):
        return {}
    frozen = creds.get_frozen_credentials()
    return {"access_key": frozen.access_key, "secret_key": frozen.secret_key, "session_token": frozen.token}

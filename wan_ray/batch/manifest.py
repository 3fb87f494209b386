"""The manifest: Parquet rows in, one validated `Item` per row out.

A manifest is one Parquet file, a folder of them, or a glob, on local disk or S3. Column `prompt` is
required; the other known columns (`COLUMNS`) are optional and take the model's defaults where missing or
null; any other column passes through to the results manifest and the sidecar. A row that fails
validation is not dropped: its `Item` is `failed` (stage "validate") with a message that names the
field, the value and what is accepted. Problems with the manifest as a whole (unreadable, no `prompt`
column) raise `ManifestError`.

This module reads the manifest in the driver: a manifest is a list of prompts, small next to the work it
describes, and reading it whole gives every row its number and lets duplicates be found.
"""

from __future__ import annotations

import fnmatch
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..io import storage
from ..models.config import TaskSpec
from ..sampling.request import RequestError, content_id, make_request, safe_id
from ..stages.records import Item

# name -> (kind, what is accepted); the kind drives the type check of each cell
COLUMNS: dict[str, tuple[str, str]] = {
    "prompt": ("text", "string, required: what the video shows"),
    "id": ("id", "string or integer: the row's name; outputs go under a safe key derived from it "
                 "(default: derived from the row's content)"),
    "negative_prompt": ("text", "string (default: the model's)"),
    "seed": ("int", "integer >= 0; -1 or missing: derived from the row's content"),
    "size": ("text", "WIDTH*HEIGHT or WIDTHxHEIGHT, e.g. \"832*480\" (default: the model's first size)"),
    "frames": ("int", "integer 4n+1 (default: the model's)"),
    "steps": ("int", "integer >= 1 (default: the model's)"),
    "shift": ("number", "number > 0 (default: the model's)"),
    "guide_scale": ("number", "number >= 0; two-expert models also take a [low-noise, high-noise] pair"),
    "solver": ("text", "unipc, dpm++ or euler (default: the model's)"),
    "image": ("text", "local path or s3:// URI of the first frame (i2v, ti2v)"),
}
STAGE = "validate"  # the failed_stage of rows rejected here


class ManifestError(ValueError):
    """The manifest as a whole cannot be used: missing, unreadable, or without a `prompt` column."""


@dataclass(frozen=True)
class Admission:
    items: list[Item]  # one per manifest row, in manifest order
    duplicates: dict[int, int]  # row -> an earlier row with the same id and settings (made once, shared)


# ---------------------------------------------------------------------------------------------------------
# Reading


def manifest_files(uri: str) -> list[str]:
    """The Parquet files a manifest URI names: the file itself, the `.parquet` files below a folder (names
    starting with `_` or `.` skipped), or the files a glob matches."""
    uri = uri if storage.is_s3(uri) else os.path.abspath(uri)
    if any(c in uri for c in "*?["):
        base = uri[:min(uri.index(c) for c in "*?[" if c in uri)].rpartition("/")[0]
        files = [u for u in storage.list_uris(base)
                 if u.count("/") == uri.count("/") and fnmatch.fnmatchcase(u, uri)]
    elif _is_object(uri):
        files = [uri]
    else:
        files = [u for u in storage.list_uris(uri) if u.endswith(".parquet")
                 and not any(p.startswith(("_", ".")) for p in u[len(uri):].split("/"))]
    if not files:
        raise ManifestError(f"no Parquet files at {uri}: give a .parquet file, a folder of them, or a glob")
    return files


def _is_object(uri: str) -> bool:
    """A file, not a folder (`s3://bucket`, `s3://bucket/prefix/` and local folders are folders)."""
    if uri.endswith("/") or (storage.is_s3(uri) and not storage.split_s3(uri)[1]):
        return False
    return storage.exists(uri)


def read_manifest(uri: str) -> pa.Table:
    """All rows of a manifest as one table; raises `ManifestError` if it cannot be used."""
    tables = []
    for file in manifest_files(uri):
        fs, path = storage.arrow_filesystem(file)
        try:
            tables.append(pq.read_table(path, filesystem=fs))
        except (OSError, pa.ArrowException) as err:
            raise ManifestError(f"cannot read {file} as Parquet: {err}") from None
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException:
        types = {name: {str(t.schema.field(name).type) for t in tables if name in t.column_names}
                 for t in tables for name in t.column_names}
        clash = {name: sorted(kinds) for name, kinds in types.items() if len(kinds) > 1}
        raise ManifestError(f"the files of {uri} disagree on column types {clash}: give each column one "
                            "type in every file") from None
    if "prompt" not in table.column_names:
        raise ManifestError(f"{uri} has no 'prompt' column (it has {table.column_names}); 'prompt' is "
                            f"required, and optional columns are {[c for c in COLUMNS if c != 'prompt']}")
    return table


# ---------------------------------------------------------------------------------------------------------
# Validation


def admit(table: pa.Table, task: TaskSpec, check_images: bool = True) -> Admission:
    """One `Item` per row: live with its `Request`, or failed with the reason."""
    items = [admit_row(row, task) for row in table.to_pylist()]
    if check_images:
        items = _check_images(items)
    return _deduplicate(items)


def admit_row(row: dict[str, Any], task: TaskSpec) -> Item:
    extras = {name: value for name, value in row.items() if name not in COLUMNS}
    try:
        fields = {name: cell for name in COLUMNS if (cell := _cell(name, row.get(name))) is not None}
    except RequestError as err:
        id = _fallback_id(row, task)
        return Item(id=id, key=safe_id(id), request=None, extras=extras).failed(STAGE, str(err))
    id = str(fields.pop("id")) if "id" in fields else content_id(task.name, sorted(fields.items()))
    item = Item(id=id, key=safe_id(id), request=None, extras=extras)
    try:
        return item.replace(request=make_request(task, **{"prompt": None, **fields, "id": id}))
    except RequestError as err:
        return item.failed(STAGE, str(err))


def _cell(name: str, value: Any) -> Any:
    """A cell checked against its column's type; None if missing (null, NaN as pandas writes it, blank id)."""
    blank = name == "id" and isinstance(value, str) and not value.strip()
    if value is None or blank or (isinstance(value, float) and math.isnan(value)):
        return None
    kind = COLUMNS[name][0]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    whole = number and float(value).is_integer()
    ok = {"text": isinstance(value, str), "id": isinstance(value, str) or whole, "int": whole,
          "number": number or (name == "guide_scale" and isinstance(value, (list, tuple)))}[kind]
    if not ok:
        raise RequestError(f"{name} must be {_KINDS[kind]}, got {type(value).__name__} {value!r}")
    return int(value) if kind in ("int", "id") and number else value


_KINDS = {"text": "a string", "id": "a string or an integer", "int": "an integer", "number": "a number"}


def _fallback_id(row: dict[str, Any], task: TaskSpec) -> str:
    """The row's id if it is usable, else one derived from its content (a row always has an id)."""
    raw = row.get("id")
    if (isinstance(raw, str) and raw.strip()) or (isinstance(raw, int) and not isinstance(raw, bool)):
        return str(raw)
    return content_id(task.name, sorted((k, repr(v)) for k, v in row.items() if k in COLUMNS))


def _check_images(items: list[Item]) -> list[Item]:
    """Fail rows whose conditioning image does not exist, before any model work is spent on them."""
    def check(item: Item) -> Item:
        if not item.live or item.request.image is None:
            return item
        try:
            found = storage.exists(item.request.image)
        except (OSError, ValueError) as err:
            return item.failed(STAGE, f"image {item.request.image!r} cannot be read: {err}")
        return item if found else item.failed(STAGE, f"image {item.request.image!r} does not exist")

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(check, items))


def _deduplicate(items: list[Item]) -> Admission:
    """Rows sharing an id: with the same settings the video is made once and shared; otherwise the later
    rows fail, since their outputs would overwrite each other."""
    first: dict[str, int] = {}
    duplicates = {}
    for i, item in enumerate(items):
        if not item.live:
            continue
        j = first.setdefault(item.key, i)
        if j == i:
            continue
        if items[j].request.settings() == item.request.settings():
            duplicates[i] = j
        else:
            items[i] = item.failed(STAGE, f"id {item.id!r} is also the id of row {j}, with other settings; "
                                          "ids must be unique within a manifest")
    return Admission(items, duplicates)

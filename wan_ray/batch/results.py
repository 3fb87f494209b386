"""Results: what became of each row, resume, and the results manifest (`_results/results.parquet`).

Every input row gets exactly one `Result`, whatever happened to it: `ok` (its video was written now),
`skipped` (outputs for the same settings were already there, or an identical row earlier in the manifest
made them) or `failed` (with the error and the stage it failed in).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..io import storage
from ..stages.records import Item, Result
from ..stages.write import fingerprint, output_uris

RESULTS_FILE = "_results/results.parquet"  # one file, replaced by each run: one row per input row, always


def mark_finished(items: list[Item], output: str, identity: dict[str, Any]) -> list[Item]:
    """Live rows whose sidecar (written last) exists with the same settings fingerprint become `skipped`."""
    present = set(storage.list_uris(output))

    def check(item: Item) -> Item:
        uris = output_uris(output, item.key)
        if not item.live or uris["sidecar"] not in present:
            return item
        try:
            sidecar = json.loads(storage.read_bytes(uris["sidecar"]))
        except (OSError, ValueError):  # unreadable or half-written by hand: make the video again
            return item
        if sidecar.get("fingerprint") != fingerprint(item.request, identity):
            return item
        return item.replace(status="skipped", outputs=uris)

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(check, items))


def result_of(item: Item) -> Result:
    if item.status == "ok" and "sidecar" not in item.outputs:
        item = item.failed("write", "the row came through every stage, but nothing was written")
    return Result(id=item.id, key=item.key, status=item.status, video_uri=item.outputs.get("video"),
                  thumbnail_uri=item.outputs.get("thumbnail"), sidecar_uri=item.outputs.get("sidecar"),
                  error=item.error, failed_stage=item.failed_stage, timings=dict(item.timings),
                  gpu_seconds=item.gpu_seconds, extras=item.extras)


def shared_result(result: Result) -> Result:
    """The result of a row whose identical twin earlier in the manifest made the video."""
    status = "failed" if result.status == "failed" else "skipped"
    return Result(id=result.id, key=result.key, status=status, video_uri=result.video_uri,
                  thumbnail_uri=result.thumbnail_uri, sidecar_uri=result.sidecar_uri, error=result.error,
                  failed_stage=result.failed_stage)


def results_table(results: list[Result], manifest: pa.Table, stages: list[str]) -> pa.Table:
    """The results manifest: our columns, then the input's own (renamed `input_<name>` on a clash)."""
    text = ("id", "key", "status", "video_uri", "thumbnail_uri", "sidecar_uri", "error", "failed_stage")
    columns: dict[str, pa.Array] = {name: pa.array([getattr(r, name) for r in results], pa.string())
                                    for name in text}
    for stage in stages:
        columns[f"time_{stage}"] = pa.array([r.timings.get(stage) for r in results], pa.float64())
    columns["gpu_seconds"] = pa.array([r.gpu_seconds for r in results], pa.float64())
    table = pa.table(columns)
    for name in manifest.column_names:
        if name != "id":  # our `id` is the input's id (as a string) or the one derived for the row
            table = table.append_column(name if name not in columns else f"input_{name}", manifest[name])
    return table


def write_results(output: str, table: pa.Table) -> str:
    uri = storage.join(output, RESULTS_FILE)
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    storage.write_bytes(uri, buffer.getvalue().to_pybytes())
    return uri

"""The per-row envelope: how `Item`s ride in Ray Data batches. The only place that knows the row layout.

A row is one video on its way through the stage pools: the pickled `Item` (request, hand-off records,
status, timings) plus two plain columns that make a dataset readable when debugging (`key`, `status`).
Pickle is safe here: rows are made and read only by this job's own processes.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import numpy as np

from ..stages.records import Item

Batch = dict[str, np.ndarray]


def to_batch(items: Sequence[Item]) -> Batch:
    return {"item": _objects([pickle.dumps(item, protocol=5) for item in items]),
            "key": np.array([item.key for item in items], dtype=object),
            "status": np.array([item.status for item in items], dtype=object)}


def from_batch(batch: Batch) -> list[Item]:
    return [pickle.loads(blob) for blob in batch["item"]]


def to_rows(items: Sequence[Item]) -> list[dict]:
    """The same layout row by row, for `ray.data.from_items`."""
    batch = to_batch(items)
    return [{name: column[i] for name, column in batch.items()} for i in range(len(items))]


def _objects(values: list[bytes]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)  # not np.array(values): that would make fixed-width bytes
    out[:] = values
    return out

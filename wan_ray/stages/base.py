"""The stage envelope: what every stage does around its own work.

A stage is a plain class with one job, built once (it may load a model) and then called on lists of
`Item`s. The base class, not the subclasses, skips rows that already failed or were skipped, times the
work, counts GPU-seconds, and turns an exception into that row's `failed` status so the rest of the batch
goes on. Stages know nothing of Ray Data or Serve: the runtime wraps them.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Sequence
from typing import ClassVar

import torch

from .records import Item

log = logging.getLogger(__name__)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """The compute dtype of the models on `device`: bf16 on a GPU (each model keeps float32 where its
    precision map needs it), float32 on a CPU."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


class Stage:
    name: ClassVar[str]
    gpus: float = 0.0  # GPUs this stage's work occupies, for GPU-seconds accounting

    def __call__(self, items: Sequence[Item]) -> list[Item]:
        live = [item for item in items if item.live]
        if not live:
            return list(items)
        if len(live) == 1:
            done = [self._one(live[0])]
        else:
            start = time.perf_counter()
            try:
                done = self.process_batch(live)
                if len(done) != len(live):
                    raise RuntimeError(f"{self.name} returned {len(done)} items for {len(live)}")
                share = (time.perf_counter() - start) / len(live)
                done = [self._account(item, share) for item in done]
            except Exception:
                # One bad row must not fail its neighbours: redo the batch row by row to find it.
                done = [self._one(item) for item in live]
        out = iter(done)
        return [next(out) if item.live else item for item in items]

    def _one(self, item: Item) -> Item:
        start = time.perf_counter()
        try:
            (result,) = self.process_batch([item])
        except Exception as err:  # the row's failure becomes its result
            log.warning("%s failed on %s: %s", self.name, item.id, err)
            log.debug("%s", traceback.format_exc())
            result = item.failed(self.name, describe(err))
        return self._account(result, time.perf_counter() - start)

    def _account(self, item: Item, seconds: float) -> Item:
        return item.replace(timings={**item.timings, self.name: item.timings.get(self.name, 0.0) + seconds},
                            gpu_seconds=item.gpu_seconds + seconds * self.gpus)

    def process_batch(self, items: list[Item]) -> list[Item]:
        """Process live items in order; the default runs `process` on each."""
        return [self.process(item) for item in items]

    def process(self, item: Item) -> Item:
        raise NotImplementedError


def describe(err: BaseException) -> str:
    """A one-line, human-readable reason."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__

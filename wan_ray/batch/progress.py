"""The progress display while a job runs: rows done per stage, videos per minute, and the ETA.

A background thread reads the job's ledger every few seconds and prints one line: rewritten in place on a
terminal, appended in logs (`ray job logs`).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

import ray


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(counts: dict[str, int], stages: list[str], total: int, elapsed: float,
                  eta: float | None) -> str:
    """`[0:00:42] text_encode 16/16 | ... | write 6/16 | 8.6 videos/min | ETA 0:01:05`"""
    done = counts.get(stages[-1], 0)
    per_stage = " | ".join(f"{stage} {min(counts.get(stage, 0), total)}/{total}" for stage in stages)
    rate = done / elapsed * 60 if elapsed > 0 else 0.0
    left = "--" if eta is None else clock(eta)
    return f"[{clock(elapsed)}] {per_stage} | {rate:.1f} videos/min | ETA {left}"


def estimate(first: tuple[float, int] | None, now: float, done: int, total: int) -> float | None:
    """Seconds left at the pace since the first video was finished (model loading is behind us by then)."""
    if first is None or done <= first[1] or now <= first[0]:
        return 0.0 if done >= total else None
    return (total - done) * (now - first[0]) / (done - first[1])


class ProgressDisplay:
    def __init__(self, ledger: Any, stages: list[str], total: int, every: float = 10.0,
                 stream: TextIO | None = None):
        self.ledger, self.stages, self.total, self.every = ledger, stages, total, every
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.first: tuple[float, int] | None = None  # (when, videos done) at the first finished video
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="wan-ray-progress", daemon=True)

    def __enter__(self) -> ProgressDisplay:
        if self.every > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            self.show(final=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.show()

    def show(self, final: bool = False) -> None:
        try:
            counts = ray.get(self.ledger.counts.remote(), timeout=10)
        except Exception:  # the display must never take the job down
            return
        now, done = time.monotonic(), counts.get(self.stages[-1], 0)
        if self.first is None and done:
            self.first = (now, done)
        eta = estimate(self.first, now, done, self.total)
        line = progress_line(counts, self.stages, self.total, now - self.start, eta)
        if self.stream.isatty():
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

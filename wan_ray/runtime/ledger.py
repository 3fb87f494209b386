"""The ledger: one small actor per job that knows which rows each stage has started and finished.

It serves two purposes. The driver reads it for the progress display (rows done per stage). And it bounds
retries after crashes: Ray restarts a dead stage actor and resends it the same batch, and a row that
was still open in the ledger when that happens was in flight when the worker died. `begin` counts those
deaths per row; the stage envelope (`actors.call_stage`) fails a row that has killed its worker
`MAX_WORKER_DEATHS` times instead of letting it crash the pool forever.
"""

from __future__ import annotations

from collections import Counter

import ray

MAX_WORKER_DEATHS = 2


class Ledger:
    def __init__(self) -> None:
        self.open: set[tuple[str, str]] = set()  # (stage, key) begun and not yet ended
        self.deaths: Counter[tuple[str, str]] = Counter()
        self.done: dict[str, set[str]] = {}  # stage -> keys finished (a set: a re-run row counts once)

    def begin(self, stage: str, keys: list[str]) -> list[int]:
        """Open the rows; returns for each how many workers died while it was open."""
        for key in keys:
            if (stage, key) in self.open:
                self.deaths[stage, key] += 1
            self.open.add((stage, key))
        return [self.deaths[stage, key] for key in keys]

    def end(self, stage: str, keys: list[str], done: bool = True) -> None:
        for key in keys:
            self.open.discard((stage, key))
        if done:
            self.done.setdefault(stage, set()).update(keys)

    def counts(self) -> dict[str, int]:
        """Rows finished per stage."""
        return {stage: len(keys) for stage, keys in self.done.items()}

    def in_flight(self) -> dict[str, str]:
        """key -> the stage it was open in (where a row that never came out was lost)."""
        return {key: stage for stage, key in self.open}


def start_ledger(name: str) -> ray.actor.ActorHandle:
    # no CPU reservation: it must never wait behind the stage pools for a slot
    return ray.remote(num_cpus=0, max_restarts=0)(Ledger).options(name=name).remote()


class LedgerClient:
    """The job's ledger actor as a stage actor sees it: `begin` waits for its answer, `end` does not."""

    def __init__(self, name: str):
        self.actor = ray.get_actor(name)

    def begin(self, stage: str, keys: list[str]) -> list[int]:
        return ray.get(self.actor.begin.remote(stage, keys))

    def end(self, stage: str, keys: list[str], done: bool = True) -> None:
        self.actor.end.remote(stage, keys, done)

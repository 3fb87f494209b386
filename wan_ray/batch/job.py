"""The batch job: a Parquet manifest in; videos, sidecars, a results manifest and a report out.

    manifest ─► admit ─► text_encode ─► [image_encode] ─► denoise_high ─► denoise_low ─► decode ─► write
    (driver:             (one Ray Data actor pool per stage, sized and placed by the topology;
     validate, resume)    single-expert models have one denoise_single stage)

The driver reads and validates the manifest and skips rows already done; only the rest enter Ray Data,
one row per block, each carrying its `Item` (`wan_ray.runtime.rows`). Every row comes out as a `Result`:
rows that failed validation, failed in a stage, were lost to crashing workers or to a pipeline that
stopped all end `failed` with the reason. The topology decides the resources of each pool;
`wan_ray.runtime.actors` what an actor does with them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from ..models.checkpoint import open_checkpoint
from ..models.config import TaskSpec
from ..runtime.actors import StageRecipe, actor_for, model_identity, pool_args
from ..runtime.gang import sweep_gangs
from ..runtime.ledger import start_ledger
from ..runtime.rows import from_batch, to_rows
from ..runtime.topology import Topology, TopologyError, load_topology
from ..stages.base import describe
from ..stages.records import Item
from .manifest import admit, read_manifest
from .progress import ProgressDisplay
from .report import Summary, write_report
from .results import mark_finished, result_of, results_table, shared_result, write_results

log = logging.getLogger(__name__)

# Ray Data settings for the job's datasets (restored afterwards).
DATA_CONTEXT = dict(
    # One row per block: a video is the unit of work, so a crashed worker costs the rows of its own batch.
    target_max_block_size=1,
    # A block lost to an error must not stop the job; its rows still get their results (failed).
    max_errored_blocks=-1,
    # A model load plus one long video segment can keep every queue still for a while; a hung job still ends.
    execution_no_progress_timeout_s=6 * 3600,
    enable_progress_bars=False,  # the job prints its own progress (ProgressDisplay)
    print_on_execution_start=False,
)


@dataclass(frozen=True)
class JobConfig:
    manifest: str  # a Parquet file, a folder of them or a glob; local or s3://
    output: str  # a local folder or s3:// prefix
    model: str = "tiny"  # a bundled model name or a checkpoint folder
    topology: str | Path | dict[str, Any] | None = None  # file, preset or dict; None: `default_topology()`
    strict_resources: bool = True  # the cluster cannot grow: a topology that does not fit it is an error
    progress_every: float = 10.0  # seconds between progress lines; 0 for none


def stage_names(task: TaskSpec) -> list[str]:
    """The stages a video of `task` goes through, in order."""
    image = ["image_encode"] if task.dit.model_type != "t2v" else []
    experts = ["denoise_high", "denoise_low"] if task.is_moe else ["denoise_single"]
    return ["text_encode", *image, *experts, "decode", "write"]


def run_job(config: JobConfig) -> Summary:
    """Run a job on the connected Ray cluster; returns its summary (the results are written already)."""
    start = time.monotonic()
    checkpoint = open_checkpoint(config.model)
    stages = stage_names(checkpoint.task)
    topology = load_topology(config.topology or default_topology())
    check_topology(topology, checkpoint.task, stages, config.strict_resources)
    output = absolute(config.output)
    identity = model_identity(checkpoint)
    manifest = read_manifest(config.manifest)
    admission = admit(manifest, checkpoint.task)
    items = mark_finished(admission.items, output, identity)
    todo = [item for i, item in enumerate(items) if item.live and i not in admission.duplicates]
    print(f"wan-ray: {len(items)} rows, {len(todo)} to make, {sum(i.status == 'skipped' for i in items)} "
          f"done already, {sum(i.status == 'failed' for i in items)} invalid; model {checkpoint.task.name} "
          f"({checkpoint.root.resolve()}), topology {topology.name}, output {output}", file=sys.stderr)

    crash = os.environ.get("WAN_RAY_TEST_CRASH")  # test-only fault injection (runtime.actors._test_crash)
    recipes = [StageRecipe(stage, str(checkpoint.root.resolve()), topology.stage(stage), output=output,
                           identity=identity, test_crash=crash) for stage in stages]
    made = run_stages(todo, recipes, config.progress_every) if todo else {}
    results = [result_of(made.get(item.key, item) if item.live else item) for item in items]
    for i, j in admission.duplicates.items():
        results[i] = shared_result(results[j])
    write_results(output, results_table(results, manifest, stages))
    prompts = [item.request.prompt if item.request else None for item in items]
    summary = Summary(results, prompts, stages, time.monotonic() - start)
    write_report(output, summary)
    return summary


def run_stages(items: list[Item], recipes: list[StageRecipe], progress_every: float = 10.0
               ) -> dict[str, Item]:
    """Push live rows through one actor pool per stage, in order; returns every row by key (lost: failed)."""
    run_id = f"wan-ray-{uuid.uuid4().hex[:8]}"
    ledger = start_ledger(f"{run_id}-ledger")
    stages = [recipe.stage for recipe in recipes]
    out: dict[str, Item] = {}
    reason = "the row was lost in the pipeline (a task failed; see the Ray Data logs)"
    lost: dict[str, str] = {}
    try:
        with data_context():
            ds = ray.data.from_items(to_rows(items), override_num_blocks=len(items))
            for recipe in recipes:
                kwargs = {"recipe": dataclasses.replace(recipe, ledger=f"{run_id}-ledger", run_id=run_id)}
                ds = ds.map_batches(actor_for(recipe.stage, recipe.spec), fn_constructor_kwargs=kwargs,
                                    **pool_args(recipe.spec))
            with ProgressDisplay(ledger, stages, len(items), progress_every):
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    out.update((item.key, item) for item in from_batch(batch))
    except Exception as err:  # the pipeline stopped: the rows not out yet fail with the reason
        log.exception("the pipeline stopped")
        reason = f"the job stopped before this row was done: {root_cause(err)}"
    finally:
        with contextlib.suppress(Exception):
            lost = ray.get(ledger.in_flight.remote(), timeout=30)
        ray.kill(ledger)
        sweep_gangs(run_id)  # placement groups of gang leaders that crashed (no destructor ran)
    for item in items:
        if item.key not in out:
            out[item.key] = item.failed(lost.get(item.key, "pipeline"), reason)
    return out


def default_topology() -> str:
    return "1gpu" if ray.cluster_resources().get("GPU", 0) >= 1 else "local"


def check_topology(topology: Topology, task: TaskSpec, stages: list[str], strict: bool = True) -> None:
    """Raise `TopologyError` for a topology this model or cluster cannot run, before any work starts."""
    topology.check_model(task)
    for stage in stages:
        actor_for(stage, topology.stage(stage))
    try:
        topology.check_cluster(ray.cluster_resources(), stages)
    except TopologyError as err:
        if strict:
            raise
        log.warning("%s (the cluster may still grow to fit)", err)


@contextlib.contextmanager
def data_context() -> Iterator[None]:
    ctx = ray.data.DataContext.get_current()
    saved = {name: getattr(ctx, name) for name in DATA_CONTEXT}
    for name, value in DATA_CONTEXT.items():
        setattr(ctx, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(ctx, name, value)


def root_cause(err: BaseException) -> str:
    """The innermost `SomeError: message` line of a Ray error (whose own text is a colored traceback)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    causes = re.findall(r"^(?:\w+\.)*\w*(?:Error|Exception): .+$", text, re.MULTILINE)
    return causes[-1] if causes else describe(err)


def absolute(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(uri)


"""`wan-ray generate` and `wan-ray validate`, shared by the `wan-ray` command and `jobs/generate.py`.

Exit codes: 0 when every row is `ok` or `skipped`; 1 when some rows failed (validate: are invalid), the
results manifest saying which and why; 2 when the job cannot start (arguments, manifest, model, topology).
Ray and the models are imported only when a command runs, so `wan-ray --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..runtime.topology import bundled_presets

STARTUP_ERRORS = (ValueError, OSError)  # ManifestError, TopologyError, CheckpointError, missing files, S3


def generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="Parquet manifest: a file, a folder of them or a glob; local or s3://")
    p.add_argument("--output", required=True, help="local folder or s3:// prefix for videos and results")
    p.add_argument("--model", default="tiny", help="bundled model name or checkpoint folder (default: tiny)")
    p.add_argument("--topology", default=None,
                   help=f"topology file or preset: {', '.join(bundled_presets())} (default: 1gpu if the "
                        "cluster has a GPU, else local)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: the Ray Job's cluster, else a new local Ray)")
    p.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                   help="seconds between progress lines, 0 for none (default: 10)")


def generate(args: argparse.Namespace) -> int:
    import ray

    from ..models.checkpoint import open_checkpoint
    from .job import JobConfig, run_job
    from .report import summary_text

    local = args.address is None and "RAY_ADDRESS" not in os.environ
    started = not ray.is_initialized()
    try:
        open_checkpoint(args.model)  # a wrong --model fails before Ray starts
        if started:  # a local Ray without the dashboard starts faster; the job prints its own progress
            extra = {"include_dashboard": False} if local else {}
            ray.init(address=args.address, log_to_driver=False, **extra)
        summary = run_job(JobConfig(args.manifest, args.output, args.model, args.topology,
                                    strict_resources=local, progress_every=args.progress_every))
    except STARTUP_ERRORS as err:
        print(f"wan-ray generate: {err}", file=sys.stderr)
        return 2
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
    print(summary_text(summary))
    return 1 if summary.counts["failed"] else 0


def validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="Parquet manifest: a file, a folder of them or a glob; local or s3://")
    p.add_argument("--model", default="tiny",
                   help="the model the manifest is meant for (sizes, frames, image inputs; default: tiny)")


def validate(args: argparse.Namespace) -> int:
    from ..models.checkpoint import open_checkpoint
    from .manifest import admit, read_manifest

    try:
        task = open_checkpoint(args.model).task
        admission = admit(read_manifest(args.manifest), task)
    except STARTUP_ERRORS as err:
        print(f"wan-ray validate: {err}", file=sys.stderr)
        return 2
    bad = [(i, item) for i, item in enumerate(admission.items) if item.status == "failed"]
    for i, item in bad:
        print(f"row {i} (id {item.id!r}): {item.error}")
    for i, j in admission.duplicates.items():
        print(f"row {i} (id {admission.items[i].id!r}): same id and settings as row {j}; made once, shared")
    total = len(admission.items)
    print(f"{total} rows: {total - len(bad)} valid, {len(bad)} invalid (model {task.name})")
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`jobs/generate.py`: the arguments of `wan-ray generate`."""
    parser = argparse.ArgumentParser(prog="generate.py", description="wan-ray batch job (Ray Job entrypoint)")
    generate_arguments(parser)
    return generate(parser.parse_args(argv))

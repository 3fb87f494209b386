"""wan_ray.batch: the batch job. A Parquet manifest in; videos, sidecars, a results manifest and a report out.

- `manifest`: reading a manifest (file, folder, glob; local or S3) and validating its rows into `Item`s;
- `job`: the stage graph on Ray Data (`run_job`, `JobConfig`, `stage_names`);
- `results`: resume, one `Result` per input row, the results manifest;
- `progress`, `report`: the progress display, the final summary and `_report/index.html`;
- `command`: `wan-ray generate` / `wan-ray validate` and `jobs/generate.py`.

See docs/batch.md. Importing this package is cheap: Ray and the models load when a job runs.
"""

from typing import Any

__all__ = ["JobConfig", "run_job", "stage_names"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import job

        return getattr(job, name)
    raise AttributeError(f"module 'wan_ray.batch' has no attribute {name!r}")

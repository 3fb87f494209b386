"""wan_ray.serve: the online endpoint, a Ray Serve application that speaks the OpenAI Videos API.

`app.build_app(args)` builds it (the import path of `configs/serve.yaml`); `wan-ray serve` runs it. The
ingress (`ingress.VideoAPI`) validates requests and drives each video through stage deployments
(`stages.StageServer`) that wrap the same stage classes as the batch job; `jobs.Jobs` is the queue and
`records.RecordStore` keeps records and videos in storage. See docs/serve.md.
"""

from typing import Any

__all__ = ["build_app"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `wan-ray --help` and the CLI's parser stay free of Ray Serve and torch.
    if name == "build_app":
        from .app import build_app

        return build_app
    raise AttributeError(f"module 'wan_ray.serve' has no attribute {name!r}")

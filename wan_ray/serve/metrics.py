"""The endpoint's metrics, through `ray.util.metrics` (exported with Ray's own, in Prometheus format).

Ray prefixes the names with `ray_`: e.g. `ray_wan_ray_videos_completed_total`. Serve adds its own request
metrics (`ray_serve_*`) per deployment.
"""

from __future__ import annotations

SECONDS = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600]


class Metrics:
    def __init__(self, model: str):
        from ray.util import metrics

        tags = {"model": model}
        self.queue = metrics.Gauge("wan_ray_video_queue_depth", "videos accepted and not finished, by status",
                                   tag_keys=("model", "status"))
        self.completed = metrics.Counter("wan_ray_videos_completed", "videos made", tag_keys=("model",))
        self.failed = metrics.Counter("wan_ray_videos_failed", "videos that failed, by the stage that failed",
                                      tag_keys=("model", "stage"))
        self.rejected = metrics.Counter("wan_ray_requests_rejected", "create requests turned away, by reason",
                                        tag_keys=("model", "reason"))
        self.stage_seconds = metrics.Histogram("wan_ray_stage_seconds", "seconds of work per stage per video",
                                               boundaries=SECONDS, tag_keys=("model", "stage"))
        self.video_seconds = metrics.Histogram("wan_ray_video_seconds", "seconds from request to finished "
                                               "video", boundaries=SECONDS, tag_keys=("model", "status"))
        for metric in (self.queue, self.completed, self.failed, self.rejected, self.stage_seconds,
                       self.video_seconds):
            metric.set_default_tags(tags)

    def depth(self, queued: int, in_progress: int) -> None:
        self.queue.set(queued, {"status": "queued"})
        self.queue.set(in_progress, {"status": "in_progress"})

    def finished(self, status: str, seconds: float, timings: dict[str, float], stage: str | None) -> None:
        if status == "completed":
            self.completed.inc()
        else:
            self.failed.inc(tags={"stage": stage or "none"})
        self.video_seconds.observe(seconds, {"status": status})
        for name, value in timings.items():
            self.stage_seconds.observe(value, {"stage": name})

    def reject(self, reason: str) -> None:
        self.rejected.inc(tags={"reason": reason})


class NoMetrics:
    """For a `Jobs` outside Ray (unit tests)."""

    def depth(self, queued: int, in_progress: int) -> None: ...

    def finished(self, status: str, seconds: float, timings: dict[str, float], stage: str | None) -> None: ...

    def reject(self, reason: str) -> None: ...

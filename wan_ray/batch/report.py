"""What a finished job tells people: the summary table printed at the end, and `_report/index.html`.

The HTML report is one dependency-free file next to the results: a contact sheet of thumbnails linking to
the videos, a per-stage timing chart (inline SVG) and the failed rows with their errors. Its links are
relative (`../<key>.mp4`), so it works wherever the output folder is browsed or copied to.
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass

from ..io import storage
from ..stages.records import Result

REPORT_FILE = "_report/index.html"


@dataclass(frozen=True)
class Summary:
    results: list[Result]
    prompts: list[str | None]  # per row, for captions
    stages: list[str]
    seconds: float  # wall time of the whole job

    @property
    def counts(self) -> Counter[str]:
        return Counter(r.status for r in self.results)

    @property
    def made(self) -> list[Result]:
        """Rows whose video was made by this run."""
        return [r for r in self.results if r.status == "ok"]

    def stage_seconds(self, stage: str) -> float:
        """Mean seconds per video made now."""
        return sum(r.timings.get(stage, 0.0) for r in self.made) / max(len(self.made), 1)

    @property
    def gpu_seconds_per_video(self) -> float:
        return sum(r.gpu_seconds for r in self.made) / max(len(self.made), 1)


def summary_text(s: Summary) -> str:
    c = s.counts
    rate = len(s.made) / s.seconds * 60 if s.seconds > 0 else 0.0
    lines = [f"{len(s.results)} rows: {c['ok']} ok, {c['failed']} failed, {c['skipped']} skipped "
             f"in {s.seconds:.1f} s ({rate:.1f} videos/min)",
             f"{'stage':<16}{'videos':>8}{'total s':>10}{'s/video':>10}"]
    for stage in s.stages:
        mean = s.stage_seconds(stage)
        lines.append(f"{stage:<16}{len(s.made):>8}{mean * len(s.made):>10.2f}{mean:>10.2f}")
    lines.append(f"GPU-seconds per video: {s.gpu_seconds_per_video:.2f}")
    failed = [r for r in s.results if r.status == "failed"]
    lines += [f"failed {r.id!r} in {r.failed_stage}: {r.error}" for r in failed[:20]]
    if len(failed) > 20:
        lines.append(f"... and {len(failed) - 20} more failed rows: see the results manifest")
    return "\n".join(lines)


def write_report(output: str, s: Summary) -> str:
    uri = storage.join(output, REPORT_FILE)
    storage.write_bytes(uri, report_html(s).encode(), content_type="text/html; charset=utf-8")
    return uri


def report_html(s: Summary) -> str:
    esc = html.escape
    tiles = "".join(
        f'<figure><a href="../{esc(r.key)}.mp4"><img src="../{esc(r.key)}.jpg" alt="{esc(r.id)}"></a>'
        f"<figcaption><b>{esc(r.id)}</b> {esc(r.status)}<br>{esc((prompt or '')[:120])}</figcaption></figure>"
        for r, prompt in zip(s.results, s.prompts, strict=True) if r.video_uri)
    failed = "".join(f"<tr><td>{i}</td><td>{esc(r.id)}</td><td>{esc(r.failed_stage or '')}</td>"
                     f"<td>{esc(r.error or '')}</td></tr>"
                     for i, r in enumerate(s.results) if r.status == "failed")
    c = s.counts
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>wan-ray job report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
.sheet {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: 200px; font-size: 12px; }}
figure img {{ width: 200px; border-radius: 4px; background: #eee; }}
table {{ border-collapse: collapse; font-size: 13px; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
</style></head><body>
<h1>wan-ray job report</h1>
<p>{len(s.results)} rows: {c['ok']} ok, {c['failed']} failed, {c['skipped']} skipped, in {s.seconds:.1f} s;
{s.gpu_seconds_per_video:.2f} GPU-seconds per video.</p>
<h2>Seconds per video, by stage</h2>
{timing_svg(s)}
<h2>Videos</h2>
<div class="sheet">{tiles or "<p>none</p>"}</div>
<h2>Failed rows</h2>
{f"<table><tr><th>row</th><th>id</th><th>stage</th><th>error</th></tr>{failed}</table>" if failed else "none"}
</body></html>
"""


def timing_svg(s: Summary) -> str:
    """Horizontal bars: mean seconds per video in each stage."""
    means = [(stage, s.stage_seconds(stage)) for stage in s.stages]
    top = max((m for _, m in means), default=0.0) or 1.0
    row, label, width = 24, 130, 400
    bars = "".join(
        f'<text x="0" y="{i * row + 16}">{html.escape(stage)}</text>'
        f'<rect x="{label}" y="{i * row + 4}" width="{m / top * width:.1f}" height="16" fill="#4a7bd0"/>'
        f'<text x="{label + m / top * width + 6:.1f}" y="{i * row + 16}">{m:.2f} s</text>'
        for i, (stage, m) in enumerate(means))
    size = f'width="{label + width + 80}" height="{len(means) * row}" font-size="12" font-family="sans-serif"'
    return f'<svg xmlns="http://www.w3.org/2000/svg" {size}>{bars}</svg>'

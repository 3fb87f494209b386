"""The batch job end to end on local Ray (2 CPUs, fake GPUs) with tiny random releases: S3 (moto) and
local manifests, failures of every kind, killed workers, resume, parity with the in-process Generator,
and nothing left behind."""

import io
import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from releases import write_release

import wan_ray
from wan_ray.batch.job import JobConfig, run_job
from wan_ray.cli import main
from wan_ray.io import storage
from wan_ray.io.media import decode_mp4, encode_mp4, probe_mp4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    root = tmp_path_factory.mktemp("releases")
    return {task: str(write_release(root / task, task)) for task in ("t2v", "i2v")}


def png() -> bytes:
    gradient = np.linspace(0, 255, 96 * 80 * 3).reshape(80, 96, 3).astype(np.uint8)  # 96x80: 6:5
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, format="PNG")
    return buffer.getvalue()


def parquet(rows: list[dict]) -> bytes:
    names = list(dict.fromkeys(name for row in rows for name in row))
    buffer = io.BytesIO()
    pq.write_table(pa.table({name: [row.get(name) for row in rows] for name in names}), buffer)
    return buffer.getvalue()


def read_results(output: str) -> dict[str, dict]:
    table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(output, "_results/results.parquet"))))
    return {row["id"]: row for row in table.to_pylist()}


# Ray Data's own service actors: one per cluster, shared by every dataset, not the job's to end
RAY_DATA_SERVICES = {"ActorLocationTracker", "AutoscalingCoordinator", "datasets_stats_actor"}


def snapshot():
    import ray

    actors = {a["ActorID"] for a in ray._private.state.actors().values()
              if a["State"] == "ALIVE" and a["Name"] not in RAY_DATA_SERVICES}
    groups = {g for g, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"}
    return actors, groups


def assert_nothing_left(before):
    """Every actor and placement group the job made is gone (pools shut down a moment after the job)."""
    for _ in range(100):
        actors, groups = snapshot()
        if actors <= before[0] and groups <= before[1]:
            return
        time.sleep(0.2)
    raise AssertionError(f"left behind: actors {actors - before[0]}, placement groups {groups - before[1]}")


def gang_ranks() -> int:
    """How many gang rank actors this Ray has ever started."""
    import ray

    return sum(a["ActorClassName"] == "GangRank" for a in ray._private.state.actors().values())


def restarted_workers() -> int:
    import ray

    return sum(a["NumRestarts"] for a in ray._private.state.actors().values()
               if a["ActorClassName"].startswith("MapWorker(MapBatches(StageActor))"))


# ---------------------------------------------------------------------------------------------------------
# S3 in, S3 out: image-to-video, with a row for every kind of failure


def test_s3_manifest_good_and_bad_rows(ray_session, s3_env, releases, monkeypatch, capsys):
    bucket = s3_env
    storage.write_bytes(f"{bucket}/in/first.png", png())
    storage.write_bytes(f"{bucket}/in/junk.png", b"not an image")
    image = f"{bucket}/in/first.png"
    rows = [
        {"id": "good-1", "prompt": "a red cat runs", "image": image, "seed": 1, "tag": "x"},
        {"id": "good 2/../", "prompt": "a dog jumps", "image": image, "seed": 2, "tag": "y"},
        {"id": "poison", "prompt": "a cat", "image": image},  # kills its denoise_high worker every time
        {"id": "empty", "prompt": "", "image": image},
        {"id": "frames", "prompt": "a cat", "image": image, "frames": 6},
        {"id": "steps", "prompt": "a cat", "image": image, "steps": -1},
        {"id": "type", "prompt": "a cat", "image": image, "size": 64},
        {"id": "missing-image", "prompt": "a cat", "image": f"{bucket}/in/gone.png"},
        {"id": "junk-image", "prompt": "a cat", "image": f"{bucket}/in/junk.png"},
        {"id": "no-image", "prompt": "a cat"},
    ]
    # a folder manifest of two files with different columns
    storage.write_bytes(f"{bucket}/manifest/part-0.parquet", parquet(rows[:5]))
    storage.write_bytes(f"{bucket}/manifest/part-1.parquet", parquet(rows[5:]))
    monkeypatch.setenv("WAN_RAY_TEST_CRASH", "denoise_high:poison:always")
    before = snapshot()

    code = main(["generate", f"{bucket}/manifest/", "--output", f"{bucket}/out", "--model", releases["i2v"],
                 "--topology", "local", "--progress-every", "2"])
    assert code == 1  # some rows failed
    assert re.search("^10 rows: 2 ok, 8 failed, 0 skipped", capsys.readouterr().out, re.MULTILINE)
    assert_nothing_left(before)

    results = read_results(f"{bucket}/out")
    assert sorted(results) == sorted(row["id"] for row in rows)  # every row, with its original id
    failures = {id: (r["failed_stage"], r["error"]) for id, r in results.items() if r["status"] == "failed"}
    expected = {
        "poison": ("denoise_high", "the denoise_high worker process died 2 times on this row"),
        "empty": ("validate", "prompt must be a non-empty string"),
        "frames": ("validate", r"frames must be 4n\+1"),
        "steps": ("validate", "steps must be >= 1"),
        "type": ("validate", "size must be a string, got int 64"),
        "missing-image": ("validate", "gone.png' does not exist"),
        "junk-image": ("image_encode", "cannot read an image from s3://.*junk.png"),
        "no-image": ("validate", "image-to-video: an image is required"),
    }
    assert set(failures) == set(expected)
    for id, (stage, error) in expected.items():
        assert failures[id][0] == stage and re.search(error, failures[id][1]), (id, failures[id])

    for id, tag in (("good-1", "x"), ("good 2/../", "y")):
        r = results[id]
        assert r["status"] == "ok" and r["error"] is None and r["tag"] == tag
        assert re.fullmatch(r"[A-Za-z0-9._-]+", r["key"])
        assert r["video_uri"] == f"{bucket}/out/{r['key']}.mp4"
        assert r["time_denoise_high"] > 0 and r["time_image_encode"] > 0
        info = probe_mp4(storage.read_bytes(r["video_uri"]))
        # 64*64 is an area budget: the 6:5 image makes it 64x48 (the 16-pixel grid)
        assert (info["frames"], info["width"], info["height"], info["codec"]) == (5, 64, 48, "h264")
        frames, fps = decode_mp4(storage.read_bytes(r["video_uri"]))
        assert frames.shape == (5, 48, 64, 3) and fps == 16
        assert Image.open(io.BytesIO(storage.read_bytes(r["thumbnail_uri"]))).size == (64, 48)
        sidecar = json.loads(storage.read_bytes(r["sidecar_uri"]))
        assert sidecar["id"] == id and sidecar["key"] == r["key"] and sidecar["request"]["image"] == image
        assert sidecar["extras"] == {"tag": tag} and len(sidecar["fingerprint"]) == 32
    report = storage.read_bytes(f"{bucket}/out/_report/index.html").decode()
    assert '<a href="../good-1.mp4"><img src="../good-1.jpg"' in report and "junk.png" in report


# ---------------------------------------------------------------------------------------------------------
# Local paths: text-to-video, odd ids, a denoise worker killed mid-job, resume, parity


LOCAL_ROWS = [
    {"id": "../escape", "prompt": "a red cat runs", "seed": 1},
    {"id": "a/b", "prompt": "a blue dog jumps on the grass", "seed": 2},  # its worker is killed once
    {"id": "we ird:*?", "prompt": "green grass in the snow", "seed": 3},
    {"id": None, "prompt": "the cat in the snow", "seed": 4},
    {"id": "../escape", "prompt": "a red cat runs", "seed": 1},  # same id and settings: made once, shared
]


@pytest.fixture(scope="module")
def local_job(ray_session, releases, tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    manifest, output = root / "manifest.parquet", root / "out"
    manifest.write_bytes(parquet(LOCAL_ROWS))
    config = JobConfig(str(manifest), str(output), model=releases["t2v"], topology="local", progress_every=0)
    before, restarts = snapshot(), restarted_workers()
    os.environ["WAN_RAY_TEST_CRASH"] = "denoise_high:a/b"
    try:
        summary = run_job(config)
    finally:
        del os.environ["WAN_RAY_TEST_CRASH"]
    assert_nothing_left(before)
    return SimpleNamespace(root=root, manifest=manifest, output=output, config=config, summary=summary,
                           restarts=restarted_workers() - restarts)


def test_local_job_every_good_row_ok_under_safe_keys(local_job):
    results = read_results(str(local_job.output))
    assert local_job.restarts == 1  # the denoise_high worker really died once, and its video was redone
    statuses = [r["status"] for r in pq.read_table(local_job.output / "_results/results.parquet").to_pylist()]
    assert statuses == ["ok", "ok", "ok", "ok", "skipped"]  # manifest order; the twin shares row 0's video
    assert "a/b" in results and "we ird:*?" in results and "../escape" in results
    files = sorted(p.relative_to(local_job.root).as_posix() for p in local_job.root.rglob("*") if p.is_file())
    keys = [r["key"] for r in results.values()]
    assert files == sorted(["manifest.parquet", "out/_report/index.html", "out/_results/results.parquet",
                            *(f"out/{key}{ext}" for key in keys for ext in (".mp4", ".jpg", ".json"))])
    for r in results.values():
        assert re.fullmatch(r"[A-Za-z0-9._-]+", r["key"]) and not r["key"].startswith(".")
        assert json.loads(storage.read_bytes(r["sidecar_uri"]))["id"] == r["id"]
    assert local_job.summary.counts == {"ok": 4, "skipped": 1}


def test_batch_videos_equal_the_in_process_generator(local_job, releases):
    generator = wan_ray.Generator(releases["t2v"], device="cpu")
    results = read_results(str(local_job.output))
    for row in LOCAL_ROWS[:3]:
        reference = generator.generate(row["prompt"], seed=row["seed"]).frames
        batch, fps = decode_mp4(storage.read_bytes(results[row["id"]]["video_uri"]))
        encoded, _ = decode_mp4(encode_mp4(reference, fps))
        assert batch.shape == reference.shape == (5, 64, 64, 3) and fps == 16
        assert np.array_equal(batch, encoded)  # same frames in, same H.264 out
    other = generator.generate(LOCAL_ROWS[0]["prompt"], seed=99).frames  # the check tells videos apart
    first = decode_mp4(storage.read_bytes(results[LOCAL_ROWS[0]["id"]]["video_uri"]))[0]
    assert not np.array_equal(decode_mp4(encode_mp4(other, 16))[0], first)


def test_rerun_skips_finished_rows_and_redoes_changed_ones(local_job):
    sidecars = {p.name: p.stat().st_mtime_ns for p in local_job.output.glob("*.json")}
    start = time.monotonic()
    again = run_job(local_job.config)
    assert again.counts == {"skipped": 5} and time.monotonic() - start < 10  # no stage pools started
    assert {p.name: p.stat().st_mtime_ns for p in local_job.output.glob("*.json")} == sidecars

    rows = [dict(row) for row in LOCAL_ROWS]
    rows[2]["steps"] = 3  # new settings: redone
    local_job.manifest.write_bytes(parquet(rows))
    assert run_job(local_job.config).counts == {"ok": 1, "skipped": 4}
    table = pq.read_table(local_job.output / "_results/results.parquet").to_pylist()
    assert [r["status"] for r in table] == ["skipped", "skipped", "ok", "skipped", "skipped"]  # every row
    assert json.loads(storage.read_bytes(table[2]["sidecar_uri"]))["request"]["steps"] == 3


def test_gangs_make_the_same_videos_and_survive_a_dead_rank(ray_session, releases, tmp_path, monkeypatch):
    """Both experts on gangs of 2 (Ulysses over gloo, fake GPUs): the videos equal those of gang size 1, a
    rank killed on its first batch only costs a rebuild, and no placement group or rank is left."""
    manifest = tmp_path / "m.parquet"
    rows = [{"id": "g1", "prompt": "a red cat runs", "frames": 5, "seed": 1},
            {"id": "g2", "prompt": "a blue dog jumps", "frames": 5, "seed": 2}]
    manifest.write_bytes(parquet(rows))
    single = run_job(JobConfig(str(manifest), str(tmp_path / "single"), releases["t2v"], "local"))
    assert single.counts == {"ok": 2}

    gang = {"gang_size": 2, "num_gpus": 1, "num_cpus": 0.2}
    topology = {"name": "gangs", "defaults": {"num_cpus": 0.1},
                "stages": {"text_encode": {"num_cpus": 0.2}, "denoise_high": gang, "denoise_low": gang,
                           "decode": {"num_cpus": 0.3}}}
    monkeypatch.setenv("WAN_RAY_TEST_CRASH", "denoise_low:rank1")
    before, ranks_before = snapshot(), gang_ranks()
    summary = run_job(JobConfig(str(manifest), str(tmp_path / "gang"), releases["t2v"], topology))
    assert summary.counts == {"ok": 2}
    assert gang_ranks() - ranks_before == 2 + 2 + 2  # two gangs of two, and the low gang once more
    assert_nothing_left(before)
    for row in rows:
        a, _ = decode_mp4((tmp_path / "single" / f"{row['id']}.mp4").read_bytes())
        b, _ = decode_mp4((tmp_path / "gang" / f"{row['id']}.mp4").read_bytes())
        assert a.shape == b.shape
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2  # float32 rounding, then H.264


def test_the_readme_job_runs_the_bundled_tiny_model(ray_session, tmp_path):
    """The README's first command (no --model: the bundled tiny model) on part of its example manifest:
    every row ok, and each MP4 shows the colour and background its prompt names."""
    from wan_ray.tiny import data
    from wan_ray.tiny.detect import detect

    example = pq.read_table(Path(__file__).parents[1] / "examples" / "tiny_prompts.parquet").slice(0, 3)
    pq.write_table(example, tmp_path / "prompts.parquet")
    before = snapshot()
    # --topology local: what a CPU-only machine picks by itself (this test Ray advertises fake GPUs)
    code = main(["generate", str(tmp_path / "prompts.parquet"), "--output", str(tmp_path / "out"),
                 "--topology", "local"])
    assert code == 0
    assert_nothing_left(before)
    results = read_results(str(tmp_path / "out"))
    assert [results[row["id"]]["status"] for row in example.to_pylist()] == ["ok"] * 3
    for row in example.to_pylist():
        frames, fps = decode_mp4(storage.read_bytes(results[row["id"]]["video_uri"]))
        assert frames.shape == (17, 128, 128, 3) and fps == 8
        colour, _, _, background = data.parse_caption(row["prompt"])
        found = detect(frames)
        assert (found.colour, found.background) == (colour, background), (row["prompt"], found)

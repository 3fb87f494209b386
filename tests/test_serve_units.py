"""The endpoint's parts without a Ray cluster: request bodies as the openai client sends them, validation,
keys, the job queue's durability rules (with fake stages), and the application's config checks."""

import asyncio
import base64
import importlib
import io
import json
from pathlib import Path

import httpx2
import numpy as np
import openai
import pytest
from PIL import Image
from ray.exceptions import RayActorError
from releases import write_release

from wan_ray.models.config import get_preset
from wan_ray.runtime.topology import load_topology
from wan_ray.serve.app import ServeConfigError, build_app, check_config, parse_args, stage_options
from wan_ray.serve.auth import KeyCheck, key_digest
from wan_ray.serve.errors import APIError
from wan_ray.serve.forms import Limits, Upload, input_image, parse_body, video_request
from wan_ray.serve.jobs import Jobs
from wan_ray.serve.records import ID_PATTERN, RecordStore, VideoRecord, new_video_id
from wan_ray.stages.records import ImageLatents

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serve.yaml"
TINY = get_preset("tiny")  # 128x128, 17 frames at 8 fps


def png(width=40, height=30) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 120, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def sent_by_client(**create_kwargs):
    """The body and content type that the real openai client sends for `videos.create(**kwargs)`."""
    seen = {}

    def handler(request):
        seen["body"], seen["type"] = request.read(), request.headers["content-type"]
        error = {"message": "stop", "type": "x", "param": None, "code": None}
        return httpx2.Response(400, json={"error": error})

    client = openai.OpenAI(api_key="k", base_url="http://test/v1", max_retries=0,
                           http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    with pytest.raises(openai.BadRequestError):
        client.videos.create(**create_kwargs)
    return parse_body(seen["body"], seen["type"])


def request_of(fields, task=TINY, limits=None, image_uri=None):
    return video_request(fields, task, limits or Limits(), video_id="video_" + "0" * 32,
                         model_names=("tiny",), image_uri=image_uri)


# ---------------------------------------------------------------------------------------------------------
# bodies and validation


def test_the_clients_multipart_form_with_extra_body_and_an_upload():
    image = png()
    fields = sent_by_client(prompt="a cat\r\n--runs", size="128x128", seconds="2", model="tiny",
                            input_reference=("first.png", image, "image/png"),
                            extra_body={"seed": 7, "steps": 12, "guidance_scale": [2.5, 3.5],
                                        "negative_prompt": "x"})
    assert fields["prompt"] == "a cat\r\n--runs" and fields["size"] == "128x128" and fields["seconds"] == "2"
    assert (fields["seed"], fields["steps"], fields["guidance_scale"]) == ("7", "12", ["2.5", "3.5"])
    assert fields["input_reference"] == Upload(image, "first.png")
    request = request_of({k: v for k, v in fields.items() if k != "input_reference"})
    # 2 s at 8 fps -> 17 frames; (low-noise, high-noise) guidance pair for the two-expert model
    assert (request.frames, request.steps, request.seed, request.guide_scale) == (17, 12, 7, (2.5, 3.5))
    assert (request.width, request.height, request.negative_prompt) == (128, 128, "x")


def test_the_clients_image_url_reference_and_json_bodies():
    data_url = "data:image/png;base64," + base64.b64encode(png()).decode()
    # the client's `input_reference` argument takes files only: a reference object goes in extra_body
    fields = sent_by_client(prompt="a cat", extra_body={"input_reference": {"image_url": data_url}})
    assert fields["input_reference"] == {"image_url": data_url}
    assert input_image(fields["input_reference"], Limits()) == png()
    body = json.dumps({"prompt": "a dog", "frames": 9, "seed": 3}).encode()
    assert request_of(parse_body(body, "application/json")).frames == 9


@pytest.mark.parametrize("fields,param,match", [
    (dict(size="64x64"), "size", r"size 64x64 is not supported by tiny; accepted: 128x128"),
    (dict(size="big"), "size", "WIDTH"),
    (dict(steps=-1), "steps", "steps must be >= 1, got -1"),
    (dict(steps="500"), "steps", "steps must be <= 100"),
    (dict(steps="many"), "steps", "steps must be a number"),
    (dict(frames=6), "frames", r"4n\+1"),
    (dict(frames=99), "frames", f"frames must be <= {TINY.max_frames}"),
    (dict(seconds="abc"), "seconds", "seconds must be a number"),
    (dict(seconds="-2"), "seconds", "positive"),
    (dict(seconds="60"), "seconds", rf"longer than this model's longest video, "
                                    rf"{TINY.max_frames / TINY.fps:.2f} s \({TINY.max_frames} frames"),
    (dict(prompt="a" * 2001), "prompt", "prompt has 2001 characters; at most 2000"),
    (dict(prompt="  "), "prompt", "non-empty"),
    (dict(model="sora-2"), "model", "not served here; this endpoint serves 'tiny'"),
    (dict(guidance_scale=-1), "guidance_scale", "guidance_scale must be >= 0"),
    (dict(foo=1), "foo", "unknown field 'foo'; accepted: prompt, model"),
    (dict(seed=-5), "seed", "seed must be >= 0"),
    (dict(negative_prompt=Upload(b"\0" * 100, "n.txt")), "negative_prompt", "not a file upload"),
])
def test_bad_fields_name_the_field_and_what_is_accepted(fields, param, match):
    with pytest.raises(APIError, match=match) as err:
        request_of({"prompt": "a cat", **fields})
    assert err.value.status == 400 and err.value.param == param


def test_frames_override_seconds_and_the_image_task_rules():
    assert request_of({"prompt": "a", "seconds": 1, "frames": 5}).frames == 5
    assert request_of({"prompt": "a", "seconds": "1"}).frames == 9  # 8 frames -> nearest 4n+1
    assert request_of({"prompt": "a", "model": "TINY"}).task == "tiny"  # model names in any case
    with pytest.raises(APIError, match="takes no image") as err:
        request_of({"prompt": "a"}, image_uri="/x/in.png")
    assert err.value.param == "input_reference"
    i2v = get_preset("i2v-A14B")
    with pytest.raises(APIError, match="an image is required"):
        request_of({"prompt": "a"}, task=i2v)


@pytest.mark.parametrize("value,status,match", [
    ({"file_id": "file_1"}, 400, "file_id is not supported"),
    ({"image_url": "https://example.com/a.png"}, 400, "does not fetch URLs"),
    ("data:image/png;base64,@@@", 400, "invalid base64"),
    (Upload(b"not an image"), 400, "not an image Pillow can read"),
    (Upload(png(100, 100)), 400, "100x100 pixels; at most 5000"),
    (Upload(b"x" * 5000), 413, "5000 bytes; at most 4096 are accepted"),
])
def test_bad_input_references(value, status, match):
    limits = Limits(max_upload_bytes=4096, max_image_pixels=5000)
    with pytest.raises(APIError, match=match) as err:
        input_image(value, limits)
    assert err.value.status == status


def test_malformed_bodies():
    with pytest.raises(APIError, match="not valid JSON"):
        parse_body(b"{", "application/json")
    with pytest.raises(APIError, match="must be an object"):
        parse_body(b"[1]", "application/json")
    with pytest.raises(APIError, match="text/plain") as err:
        parse_body(b"x", "text/plain")
    assert err.value.status == 415
    with pytest.raises(APIError, match="boundary"):
        parse_body(b"x", "multipart/form-data")
    with pytest.raises(APIError, match="closing boundary"):
        unclosed = b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\nx'
        parse_body(unclosed, "multipart/form-data; boundary=b")


def test_api_keys():
    check = KeyCheck([key_digest("sk-one"), key_digest("sk-two")])
    check("Bearer sk-two")
    for header, match in [(None, "missing API key"), ("Basic sk-one", "missing API key"),
                          ("Bearer sk-three", "incorrect API key")]:
        with pytest.raises(APIError, match=match) as err:
            check(header)
        assert err.value.status == 401 and "sk-" not in err.value.message
    KeyCheck([])(None)  # no keys: open (only with allow_no_key)


def test_ids_are_random_and_records_round_trip(tmp_path):
    ids = {new_video_id() for _ in range(100)}
    assert len(ids) == 100 and all(ID_PATTERN.fullmatch(i) for i in ids)
    store = RecordStore(str(tmp_path))
    record = VideoRecord.new(request_of({"prompt": "a cat", "guidance_scale": [1, 2]}), "tiny", 1.5)
    store.save(record)
    (loaded,) = store.load_all()
    assert loaded == record and loaded.to_request() == record.to_request()
    assert loaded.to_request().guide_scale == (1.0, 2.0)
    api = loaded.to_api()
    assert (api["object"], api["status"], api["size"], api["seconds"], api["created_at"]) == \
        ("video", "queued", "128x128", "2.12", 1)


# ---------------------------------------------------------------------------------------------------------
# the job queue, with fake stages


class FakeStages:
    """Stage calls as the ingress makes them: a stream of events ending with the item."""

    def __init__(self, die=None, fail=None, gate=None):
        self.calls, self.die, self.fail = [], dict(die or {}), fail
        self.gate = gate  # an asyncio.Semaphore: each denoising step takes one
        self.cancelled = []

    async def __call__(self, name, item):
        self.calls.append(name)
        if self.die.get(name):
            self.die[name] -= 1
            yield "started", None
            raise RayActorError()
        yield "started", None
        try:
            if name.startswith("denoise"):
                for done in (1, 2):
                    if self.gate is not None:
                        await self.gate.acquire()
                    yield "progress", (done + 2 * (name == "denoise_low"), 4)
        except BaseException:
            self.cancelled.append(name)
            raise
        if name == self.fail:
            item = item.failed(name, "ValueError: boom")
        if name == "image_encode":
            item = item.replace(image=ImageLatents(None, 48, 64))
        if name == "decode":
            item = item.replace(outputs={"video": "v.mp4", "thumbnail": "v.jpg"}, timings={"decode": 0.5})
        yield "item", item


STAGES = ("text_encode", "denoise_high", "denoise_low", "decode")


def make_jobs(tmp_path, stages, owner="serve/me", alive=(), **kw):
    defaults = dict(max_pending=4, video_timeout_s=10.0, takeover_interval_s=0.05)
    return Jobs(RecordStore(str(tmp_path)), STAGES, stages, owner=owner, owner_alive=lambda o: o in alive,
                **{**defaults, **kw})


def new_record(prompt="a cat", created=None, **fields):
    request = request_of({"prompt": prompt, **fields}, image_uri=fields.pop("image", None))
    return VideoRecord.new(request.__class__(**{**request.__dict__, "id": new_video_id()}), "tiny",
                           created or 1.0)


async def finish(jobs, *ids):
    while any(i in jobs.tasks for i in ids):
        await asyncio.sleep(0.01)
    return [jobs.records.get(i) for i in ids]


def test_a_video_goes_through_every_stage_and_is_stored(tmp_path):
    async def main():
        stages = FakeStages()
        jobs = make_jobs(tmp_path, stages)
        jobs.start()
        record = new_record()
        await jobs.submit(record)
        (done,) = await finish(jobs, record.id)
        return stages, done

    stages, done = asyncio.run(main())
    assert stages.calls == list(STAGES)
    assert (done.status, done.progress, done.outputs["video"], done.timings) == ("completed", 100, "v.mp4",
                                                                                  {"decode": 0.5})
    assert RecordStore(str(tmp_path)).load(done.id).status == "completed"


def test_progress_follows_denoising_steps_and_delete_cancels(tmp_path):
    async def main():
        gate = asyncio.Semaphore(0)
        stages = FakeStages(gate=gate)
        jobs = make_jobs(tmp_path, stages)
        jobs.start()
        record = new_record()
        await jobs.submit(record)
        gate.release()  # one step of four
        await asyncio.sleep(0.05)
        seen = (record.status, record.progress)
        await jobs.delete(record.id)
        await asyncio.sleep(0.05)
        return stages, jobs, seen, record

    stages, jobs, seen, record = asyncio.run(main())
    assert seen == ("in_progress", 25)
    assert stages.cancelled and record.id not in jobs.records
    assert RecordStore(str(tmp_path)).load(record.id) is None  # not written back after the delete


def test_a_dying_replica_is_retried_then_the_video_fails_with_the_reason(tmp_path):
    async def run(die):
        jobs = make_jobs(tmp_path, FakeStages(die=die))
        jobs.start()
        record = new_record()
        await jobs.submit(record)
        return (await finish(jobs, record.id))[0]

    assert asyncio.run(run({"denoise_high": 1})).status == "completed"
    failed = asyncio.run(run({"denoise_low": 2}))
    assert failed.status == "failed" and failed.error["code"] == "interrupted"
    assert "denoise_low replica died 2 times" in failed.error["message"]
    stage_failure = asyncio.run(_one(tmp_path, FakeStages(fail="denoise_high")))
    assert stage_failure.error == {"code": "generation_failed", "message": "denoise_high: ValueError: boom"}


async def _one(tmp_path, stages, **kw):
    jobs = make_jobs(tmp_path, stages, **kw)
    jobs.start()
    record = new_record()
    await jobs.submit(record)
    return (await finish(jobs, record.id))[0]


def test_a_video_past_its_timeout_fails(tmp_path):
    failed = asyncio.run(_one(tmp_path, FakeStages(gate=asyncio.Semaphore(0)), video_timeout_s=0.2))
    assert failed.status == "failed" and failed.error["code"] == "timeout"


def test_the_queue_is_bounded(tmp_path):
    async def main():
        jobs = make_jobs(tmp_path, FakeStages(gate=asyncio.Semaphore(0)), max_pending=2)
        jobs.start()
        await jobs.submit(new_record())
        await jobs.submit(new_record())
        with pytest.raises(APIError, match="queue is full") as err:
            await jobs.submit(new_record())
        await jobs.close(0)
        return err.value

    err = asyncio.run(main())
    assert err.status == 429 and err.headers["Retry-After"]


def test_a_new_owner_resumes_or_fails_what_a_dead_one_left(tmp_path):
    store = RecordStore(str(tmp_path))
    orphan, worn_out, others, done = (new_record(p) for p in ("orphan", "worn", "other", "done"))
    orphan.status, orphan.owner, orphan.attempts = "in_progress", "serve/dead", 1
    worn_out.status, worn_out.owner, worn_out.attempts = "queued", "serve/dead", 3
    others.status, others.owner, others.attempts = "in_progress", "serve/alive", 1
    done.status, done.owner = "completed", "serve/dead"
    for record in (orphan, worn_out, others, done):
        store.save(record)

    async def main():
        jobs = make_jobs(tmp_path, FakeStages(), alive={"serve/alive"})
        jobs.start()
        await asyncio.sleep(0.1)  # the first look at unfinished records
        resumed, failed, _ = await finish(jobs, orphan.id, worn_out.id, others.id)
        await asyncio.sleep(0.2)
        assert others.id in jobs.foreign and jobs.records[others.id].status == "in_progress"
        jobs.owner_alive = lambda owner: False  # the other owner dies: its video is taken over too
        await asyncio.sleep(0.2)
        (taken,) = await finish(jobs, others.id)
        page, _ = jobs.list(after=None, limit=10, order="desc")
        await jobs.close(0)
        return resumed, failed, taken, page

    resumed, failed, taken, page = asyncio.run(main())
    assert resumed.status == "completed" and resumed.attempts == 2 and resumed.owner == "serve/me"
    assert failed.status == "failed" and failed.error["code"] == "interrupted"
    assert taken.status == "completed"
    assert len(page) == 4


def test_listing_is_newest_first_with_a_cursor(tmp_path):
    async def main():
        jobs = make_jobs(tmp_path, FakeStages(), max_pending=10)
        jobs.start()
        records = [new_record(created=float(t)) for t in (3, 1, 2)]
        for record in records:
            await jobs.submit(record)
        await finish(jobs, *[r.id for r in records])
        first, more = jobs.list(after=None, limit=2, order="desc")
        rest, more_after = jobs.list(after=first[-1].id, limit=2, order="desc")
        with pytest.raises(APIError, match="no video"):
            jobs.list(after="video_nope", limit=2, order="desc")
        return records, first, more, rest, more_after

    records, first, more, rest, more_after = asyncio.run(main())
    assert [r.id for r in first + rest] == [records[0].id, records[2].id, records[1].id]
    assert more and not more_after


# ---------------------------------------------------------------------------------------------------------
# the application's config


def test_the_bundled_serve_config_is_valid_and_its_import_path_builds_the_app(tmp_path):
    config = check_config(CONFIG)
    (app,) = config["applications"]
    module, _, name = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    release = write_release(tmp_path / "t2v", "t2v")  # the config names the bundled tiny model
    built = builder({**app["args"], "model": str(release), "allow_no_key": True})
    settings, handles = built._bound_deployment.init_args
    assert list(handles) == ["text_encode", "denoise_high", "denoise_low", "decode"]
    high = handles["denoise_high"]._bound_deployment._deployment_config
    assert (high.autoscaling_config.max_replicas, high.autoscaling_config.downscale_delay_s) == (2, 900)
    assert high.graceful_shutdown_timeout_s > settings.video_timeout_s
    assert settings.limits.max_pending_videos == app["args"]["limits"]["max_pending_videos"]


@pytest.mark.parametrize("change,match", [
    ({"deployments": {"denoise_high": {"autoscaling_config": {"target_ongoing_request": 1}}}},
     r"unknown autoscaling_config keys \['target_ongoing_request'\]"),
    ({"deployments": {"denoise_high": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 1}}}},
     "max_replicas"),
    ({"deployments": {"decode": {"graceful_shutdown_timeout_s": 60}}}, "must exceed video_timeout_s"),
    ({"deployments": {"VideoAPI": {"autoscaling_config": {"max_replicas": 2}}}}, "one replica"),
    ({"deployments": {"denoise": {}}}, "unknown deployment 'denoise'"),
    ({"deployments": {"decode": {"num_cpus": 2}}}, "from the topology"),
    ({"limits": {"max_step": 10}}, "max_step"),
    ({"storage": "relative/dir"}, "absolute"),
    ({"api_key_sha256": ["sk-plain-key"]}, "never keys"),
])
def test_bad_app_args_are_errors(change, match):
    with pytest.raises(ServeConfigError, match=match):
        parse_args({"storage": "/tmp/x", **change})


def test_deployment_options_come_from_the_topology_and_the_config():
    topology = load_topology({"stages": {"denoise_high": {"replicas": {"min": 1, "max": 3}, "num_gpus": 1,
                                                         "accelerator_type": "H100"},
                                         "denoise_low": {"replicas": 2, "num_cpus": 2}}})
    settings = parse_args({"storage": "s3://b/p", "deployments": {"denoise_high": {
        "autoscaling_config": {"min_replicas": 0, "downscale_delay_s": 900}, "health_check_period_s": 30}}})
    high = stage_options("denoise_high", topology.stage("denoise_high"), settings)
    assert high["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0, "accelerator_type": "H100"}
    assert high["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 1,
                                          "downscale_delay_s": 900}
    assert (high["max_ongoing_requests"], high["health_check_period_s"]) == (1, 30)
    assert high["graceful_shutdown_timeout_s"] > settings.video_timeout_s
    low = stage_options("denoise_low", topology.stage("denoise_low"), settings)
    assert low["num_replicas"] == 2 and "autoscaling_config" not in low
    gang = load_topology({"stages": {"denoise_high": {"gang_size": 2, "num_gpus": 1, "num_cpus": 2,
                                                      "accelerator_type": "H100"}}})
    options = stage_options("denoise_high", gang.stage("denoise_high"), settings)
    rank = {"CPU": 2.0, "GPU": 1.0, "accelerator_type:H100": 0.001}
    assert options["placement_group_bundles"] == [{**rank, "CPU": 2.05}, rank]  # the leader rides in bundle 0
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["ray_actor_options"] == {"num_cpus": 0.05, "num_gpus": 0}


def test_build_app_wires_the_stages_of_the_model(tmp_path, monkeypatch):
    monkeypatch.delenv("WAN_RAY_API_KEY", raising=False)
    args = {"model": str(write_release(tmp_path / "ti2v", "ti2v")), "storage": str(tmp_path / "store")}
    with pytest.raises(ServeConfigError, match="no API key"):
        build_app(args)
    app = build_app({**args, "allow_no_key": True})
    ingress = app._bound_deployment
    settings, handles = ingress.init_args
    assert settings.stages == ("text_encode", "image_encode", "denoise_single", "decode")
    assert list(handles) == list(settings.stages) and settings.model_name == "ti2v-5B"
    assert ingress._deployment_config.num_replicas == 1


def test_wan_ray_serve_wants_a_key_unless_told_otherwise(tmp_path, monkeypatch, capsys):
    from wan_ray.cli import main

    monkeypatch.delenv("WAN_RAY_API_KEY", raising=False)
    assert main(["serve", "--model", "tiny", "--storage", str(tmp_path)]) == 2
    assert "no API key" in capsys.readouterr().err

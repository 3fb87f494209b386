"""The endpoint on local Ray, driven by the real `openai` client and by raw HTTP.

Two applications on tiny random releases: a two-expert t2v model (records and videos in S3, on the moto
server) and a ti2v model taking an input image (a local folder). The module shuts Serve down at the end.
"""

import base64
import io
import socket
import statistics
import time
import uuid
from dataclasses import dataclass

import boto3
import httpx2
import numpy as np
import openai
import pytest
from PIL import Image
from releases import write_release

from wan_ray.io import storage
from wan_ray.io.media import decode_mp4, probe_mp4
from wan_ray.models.checkpoint import open_checkpoint
from wan_ray.sampling.request import make_request
from wan_ray.serve.app import build_app
from wan_ray.serve.auth import key_digest
from wan_ray.serve.records import RecordStore, VideoRecord, new_video_id

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # "The Sora API is scheduled to..."

KEY = "sk-test-" + uuid.uuid4().hex
TOPOLOGY = {"defaults": {"num_cpus": 0.05}}  # every stage fits beside the others on two cores
LIMITS = {"max_pending_videos": 2, "max_upload_bytes": 64 * 1024, "max_steps": 1000, "max_prompt_chars": 500}
FAST = {"frames": 5, "steps": 4}  # the releases' defaults: a video in a fraction of a second
LONG = {"frames": 5, "steps": 1000}  # minutes of denoising: always cancelled by the test


@dataclass
class Endpoint:
    url: str
    storage: str  # the t2v application's
    args: dict

    def client(self, path="", key=KEY, **kwargs):
        return openai.OpenAI(base_url=f"{self.url}{path}/v1", api_key=key, max_retries=0, **kwargs)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(width, height):
    pixels = np.linspace(0, 255, width * height * 3).reshape(height, width, 3).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def app_args(model, store, **extra):
    return {"model": str(model), "storage": store, "api_key_sha256": [key_digest(KEY)], "topology": TOPOLOGY,
            "limits": LIMITS, "video_timeout_s": 120, **extra}


@pytest.fixture(scope="module")
def endpoint(ray_session, s3_server, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    t2v, ti2v = write_release(root / "t2v", "t2v"), write_release(root / "ti2v", "ti2v")
    bucket = f"serve-{uuid.uuid4().hex[:12]}"
    env = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:  # this process reads the store too (the workers' env has it)
        for name, value in env.items():
            mp.setenv(name, value)
        storage.reset_s3_client()
        boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = app_args(t2v, f"s3://{bucket}/videos")
        serve.run_many([serve.RunTarget(build_app(args), name="wan", route_prefix="/"),
                        serve.RunTarget(build_app(app_args(ti2v, str(root / "ti2v-store"))), name="wan-ti2v",
                                        route_prefix="/ti2v")])
        yield Endpoint(f"http://127.0.0.1:{port}", args["storage"], args)
        serve.shutdown()
    storage.reset_s3_client()


@pytest.fixture(scope="module")
def client(endpoint):
    return endpoint.client()


def wait_for(client, video_id, until, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        video = client.videos.retrieve(video_id)
        if until(video):
            return video
        time.sleep(0.05)
    raise AssertionError(f"{video_id} never reached the state: last {video}")


# ---------------------------------------------------------------------------------------------------------
# the openai client


def test_create_and_poll_gives_the_requested_video_thumbnail_and_spritesheet(client):
    video = client.videos.create_and_poll(prompt="a red cat runs", size="64x64",
                                          extra_body={**FAST, "seed": 3})
    assert (video.status, video.progress, video.size, video.model, video.error) == \
        ("completed", 100, "64x64", "t2v-A14B", None)
    assert video.id.startswith("video_") and video.completed_at >= video.created_at
    info = probe_mp4(client.videos.download_content(video.id).content)
    assert (info["frames"], info["width"], info["height"], info["codec"]) == (5, 64, 64, "h264")
    thumbnail = client.videos.download_content(video.id, variant="thumbnail").content
    assert thumbnail[:3] == b"\xff\xd8\xff" and Image.open(io.BytesIO(thumbnail)).size == (64, 64)
    sheet = client.videos.download_content(video.id, variant="spritesheet").content
    assert sheet[:3] == b"\xff\xd8\xff" and Image.open(io.BytesIO(sheet)).size == (5 * 64, 64)  # 5 in a row


def test_seconds_become_frames_and_the_video_is_the_in_process_one(client, endpoint):
    import wan_ray

    video = client.videos.create_and_poll(prompt="a blue dog jumps", seconds="0.5", extra_body={"seed": 11})
    assert (video.status, video.seconds, video.frames) == ("completed", "0.56", 9)  # 8 frames -> 4n+1 = 9
    served, _ = decode_mp4(client.videos.download_content(video.id).content)
    generator = wan_ray.Generator(endpoint.args["model"], device="cpu")
    # both through the same H.264 encoding (its 4:2:0 chroma blurs the random model's noisy colours)
    local, _ = decode_mp4(generator.generate("a blue dog jumps", frames=9, seed=11).mp4())
    assert served.shape == local.shape == (9, 64, 64, 3)
    assert np.abs(served.astype(float) - local).mean() < 0.5


def test_list_retrieve_and_delete(client):
    first = client.videos.create_and_poll(prompt="a cat", extra_body=FAST)
    second = client.videos.create_and_poll(prompt="a dog", extra_body=FAST)
    page = client.videos.list(limit=1)
    assert [v.id for v in page.data] == [second.id] and page.has_more
    nxt = client.videos.list(limit=1, after=second.id)
    assert [v.id for v in nxt.data] == [first.id]
    ids = [v.id for v in client.videos.list(limit=100)]
    assert ids.index(second.id) < ids.index(first.id)  # newest first
    assert client.videos.retrieve(first.id).prompt == "a cat"
    deleted = client.videos.delete(first.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (first.id, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(first.id)
    assert first.id not in [v.id for v in client.videos.list(limit=100)]


def test_a_wrong_or_missing_key_gets_401(endpoint):
    with pytest.raises(openai.AuthenticationError) as err:
        endpoint.client(key="sk-wrong").videos.list()
    assert err.value.body["code"] == "invalid_api_key"
    response = httpx2.get(f"{endpoint.url}/v1/videos")
    assert response.status_code == 401 and response.json()["error"]["type"] == "invalid_request_error"
    assert httpx2.get(f"{endpoint.url}/health").json()["status"] == "ok"  # no key needed


@pytest.mark.parametrize("kwargs,param,match", [
    (dict(size="128x128"), "size", "size 128x128 is not supported by t2v-A14B; accepted: 64x64"),
    (dict(extra_body={"steps": -3}), "steps", "steps must be >= 1, got -3"),
    (dict(prompt="a" * 501), "prompt", "prompt has 501 characters; at most 500 are accepted"),
    (dict(seconds="600"), "seconds", "longer than this model's longest video"),
    (dict(extra_body={"frames": 6}), "frames", r"4n\+1"),
    (dict(model="sora-2"), "model", "not served here"),
    (dict(input_reference=("a.png", png(32, 32), "image/png")), "input_reference", "takes no image"),
])
def test_bad_requests_get_400_with_a_message(client, kwargs, param, match):
    with pytest.raises(openai.BadRequestError, match=match) as err:
        client.videos.create(**{"prompt": "a cat", **kwargs})
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"


def test_progress_a_full_queue_and_cancelling(client):
    running = client.videos.create(prompt="a slow cat", extra_body=LONG)
    waiting = client.videos.create(prompt="a slow dog", extra_body=LONG)
    assert running.status == "queued"
    with pytest.raises(openai.RateLimitError, match="queue is full") as err:
        client.videos.create(prompt="one more", extra_body=FAST)
    assert err.value.response.headers["retry-after"]
    started = wait_for(client, running.id, lambda v: v.progress > 0)
    assert started.status == "in_progress" and 0 < started.progress < 100
    with pytest.raises(openai.ConflictError, match="in_progress"):
        client.videos.download_content(running.id)
    for video in (running, waiting):
        assert client.videos.delete(video.id).deleted
    # the denoisers stopped at their next step: a new video goes straight through
    start = time.monotonic()
    assert client.videos.create_and_poll(prompt="a quick cat", extra_body=FAST).status == "completed"
    assert time.monotonic() - start < 30


def test_an_input_image_sets_the_size(endpoint):
    client = endpoint.client("/ti2v")
    video = client.videos.create_and_poll(prompt="green grass", size="64x64",
                                          input_reference=("first.png", png(256, 64), "image/png"),
                                          extra_body=FAST)
    assert video.status == "completed", video.error
    info = probe_mp4(client.videos.download_content(video.id).content)
    # the image's 4:1 aspect within the 64x64 area budget, on ti2v's 32-pixel grid
    assert (video.size, info["width"], info["height"], info["frames"]) == ("128x32", 128, 32, 5)


# ---------------------------------------------------------------------------------------------------------
# raw HTTP


def test_raw_json_and_multipart_requests(endpoint):
    headers = {"Authorization": f"Bearer {KEY}"}
    created = httpx2.post(f"{endpoint.url}/v1/videos", headers=headers,
                          json={"prompt": "a cat in snow", "size": "64*64", **FAST, "seed": 5})
    assert created.status_code == 200, created.text
    body = created.json()
    assert (body["object"], body["status"], body["progress"], body["size"]) == ("video", "queued", 0, "64x64")
    polled = httpx2.get(f"{endpoint.url}/v1/videos/{body['id']}", headers=headers)
    if polled.json()["status"] != "completed":
        assert 50 <= int(polled.headers["openai-poll-after-ms"]) <= 2000
    image = "data:image/png;base64," + base64.b64encode(png(16, 16)).decode()
    form = httpx2.post(f"{endpoint.url}/v1/videos", headers=headers, data={"prompt": "a dog", "steps": "x"},
                       files={"input_reference[image_url]": (None, image)})
    assert form.status_code == 400 and form.json()["error"]["param"] in ("steps", "input_reference")
    upload = httpx2.post(f"{endpoint.url}/v1/videos", headers=headers, data={"prompt": "a dog"},
                         files={"input_reference": ("big.png", b"\0" * (70 * 1024), "image/png")})
    assert upload.status_code == 413 and upload.json()["error"]["code"] == "file_too_large"
    huge = httpx2.post(f"{endpoint.url}/v1/videos", headers=headers, json={"prompt": "a" * (2 * 2**20)})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    text = httpx2.post(f"{endpoint.url}/v1/videos", headers={**headers, "Content-Type": "text/plain"},
                       content=b"a cat")
    assert text.status_code == 415
    for path, status in [("/v1/videos/video_nope", 404), ("/v1/nothing", 404),
                         (f"/v1/videos/{body['id']}/content?variant=gif", 400)]:
        response = httpx2.get(endpoint.url + path, headers=headers)
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    wait_for(endpoint.client(), body["id"], lambda v: v.status == "completed")


# ---------------------------------------------------------------------------------------------------------
# latency against the in-process Generator (reported by -s; the target is under a second of overhead)


def test_latency_of_one_tiny_video_against_the_in_process_generator(client, endpoint):
    import wan_ray

    generator = wan_ray.Generator(endpoint.args["model"], device="cpu")
    local, served = [], []
    for seed in range(3):
        start = time.perf_counter()
        generator.generate("a red cat runs", frames=5, seed=seed).mp4()
        local.append(time.perf_counter() - start)
        start = time.perf_counter()
        video = client.videos.create_and_poll(prompt="a red cat runs", extra_body={**FAST, "seed": seed})
        assert client.videos.download_content(video.id).content
        served.append(time.perf_counter() - start)
    overhead = statistics.median(served) - statistics.median(local)
    print(f"\ntiny video: in-process {statistics.median(local):.3f} s (with MP4), endpoint "
          f"{statistics.median(served):.3f} s (create_and_poll + download), overhead {overhead:.3f} s")
    assert overhead < 2.0  # generous: this box is shared; the figure above is what to report


def test_a_replica_dying_mid_video_is_retried(client):
    import ray

    video = client.videos.create(prompt="a cat that survives", extra_body={"frames": 5, "steps": 40})
    wait_for(client, video.id, lambda v: v.progress > 0)
    prefixes = ("SERVE_REPLICA::wan#denoise_high#", "SERVE_REPLICA::wan#denoise_low#")
    replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(prefixes)]
    assert len(replicas) == 2
    for name in replicas:  # whichever expert is working on the video dies with it
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    done = wait_for(client, video.id, lambda v: v.status in ("completed", "failed"), timeout=180)
    assert done.status == "completed", done.error


def test_metrics_are_exported_in_prometheus_format(ray_session):
    import urllib.request

    port = ray_session._private.worker.global_worker.node.metrics_export_port
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline and "ray_wan_ray_stage_seconds_bucket" not in text:
        time.sleep(1)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for name in ("ray_wan_ray_videos_completed_total", "ray_wan_ray_requests_rejected_total",
                 "ray_wan_ray_video_queue_depth", "ray_wan_ray_video_seconds_bucket"):
        assert name in text
    assert 'stage="denoise_high"' in text and 'reason="queue_full"' in text


# ---------------------------------------------------------------------------------------------------------
# durability: a restarted application keeps its videos and finishes (or fails) what the last one left


def test_a_restarted_application_keeps_and_resumes_videos(client, endpoint):
    from ray import serve

    kept = client.videos.create_and_poll(prompt="a green cat", extra_body=FAST)
    store = RecordStore(endpoint.storage)
    task = open_checkpoint(endpoint.args["model"]).task
    # what a dead application leaves: one video it was making, one that already died three times
    leftovers = []
    for prompt, attempts in (("left behind", 1), ("cursed", 3)):
        request = make_request(task, id=new_video_id(), prompt=prompt, frames=5, steps=4)
        record = VideoRecord.new(request, "t2v-A14B", time.time())
        record.status, record.owner, record.attempts = "in_progress", "serve/SERVE_REPLICA::gone", attempts
        store.save(record)
        leftovers.append(record.id)
    serve.delete("wan")
    serve.run(build_app(endpoint.args), name="wan", route_prefix="/")
    assert client.videos.retrieve(kept.id).status == "completed"
    assert probe_mp4(client.videos.download_content(kept.id).content)["frames"] == 5
    assert kept.id in [v.id for v in client.videos.list(limit=100)]
    resumed = wait_for(client, leftovers[0], lambda v: v.status in ("completed", "failed"))
    assert resumed.status == "completed"
    failed = client.videos.retrieve(leftovers[1])
    assert failed.status == "failed" and "stopped 3 times" in failed.error.message


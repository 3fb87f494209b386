"""Shared test fixtures: a local S3 (moto server over real HTTP) and an AWS environment pointing at it."""

import os
import uuid

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reporting from test clusters


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (a free port) for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """Standard AWS env vars aimed at the moto server, a fresh bucket; yields its URI 's3://<bucket>'.

    Only the environment is set, so code under test configures itself exactly as in production.
    Ray workers started before this fixture do not see it: start Ray after, or pass the env along.
    """
    from wan_ray.io import storage

    unset = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")
    for name in unset:
        monkeypatch.delenv(name, raising=False)
    env = {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        # keep the developer's ~/.aws out of the tests
        "AWS_CONFIG_FILE": str(tmp_path / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-credentials"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    storage.reset_s3_client()
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"
    storage.reset_s3_client()  # the next test must not sign with this test's settings


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the session: 2 CPUs and 4 fake GPUs (for scheduling tests; torch still sees no
    CUDA), with the moto S3 endpoint and dummy credentials in every worker's environment."""
    import ray

    env = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, object_store_memory=300 * 2**20,
             runtime_env={"env_vars": env}, log_to_driver=False)
    yield ray
    ray.shutdown()

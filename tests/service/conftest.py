"""Fixtures for the service tests: real PostgreSQL / Redis (skipped only when unreachable), tiny
models and datasets, and helpers that run the API and the worker as real processes."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_URL = "redis://127.0.0.1:6379/0"
# checkpoint_samples off: these jobs checkpoint every 2 steps; the grids (on by default for API jobs)
# are tested in test_checkpoints.py and test_dashboard_browser.py
TINY_TRAIN = {"steps": 4, "resolution": 64, "checkpoint_every": 2, "learning_rate": 1e-2,
              "adapter": {"rank": 4, "num_styles": 2}, "checkpoint_samples": False}
TINY_GENERATE = {"prompt": "a red square", "seed": 3, "steps": 2, "width": 64, "height": 64,
                 "guidance_scale": 7.5}


# -- settings of in-process tests -----------------------------------------------------------------

def sqlite_settings(monkeypatch, home: Path, **values):
    """Settings on a fresh, migrated SQLite ``home``; the shell's STYLEINJECT_* variables are cleared
    so that they cannot change what a test sees."""
    from api.core.db.migrate import upgrade
    from api.core.settings import Settings

    _clear_env(monkeypatch)
    settings = Settings(home=home, **values)
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    return settings


def env_settings(monkeypatch, home: Path, **env: str):
    """The same through the environment (``STYLEINJECT_<NAME>``, read by ``get_settings``), as a
    worker process started from this one reads them. The caller clears ``get_settings``' cache after."""
    from api.core.db.migrate import upgrade
    from api.core.settings import get_settings

    _clear_env(monkeypatch)
    monkeypatch.setenv("STYLEINJECT_HOME", str(home))
    for key, value in env.items():
        monkeypatch.setenv(f"STYLEINJECT_{key.upper()}", value)
    get_settings.cache_clear()
    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    return settings


def _clear_env(monkeypatch) -> None:
    for name in list(os.environ):
        if name.startswith("STYLEINJECT_"):
            monkeypatch.delenv(name)


@pytest.fixture
def client(settings):
    """The API in-process (TestClient) on the module's ``settings``."""
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(create_app(settings)) as client:
        yield client


# -- external services ----------------------------------------------------------------------------

def _pg_user() -> str | None:
    import psycopg

    for user in ("postgres", "root"):
        try:
            with psycopg.connect(host=PG_HOST, port=PG_PORT, user=user, dbname="test", connect_timeout=3):
                return user
        except psycopg.OperationalError:
            continue
    return None


@pytest.fixture(scope="session")
def pg_user() -> str:
    user = _pg_user()
    if user is None:
        pytest.skip(f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT} (CI starts it)")
    return user


@pytest.fixture
def make_pg_database(pg_user):
    """Factory: a fresh PostgreSQL database (dropped at teardown); returns its SQLAlchemy URL."""
    import psycopg

    created: list[str] = []

    def make() -> str:
        name = f"si_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=pg_user, dbname="test",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return f"postgresql+psycopg://{pg_user}@{PG_HOST}:{PG_PORT}/{name}"

    yield make
    for name in created:
        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=pg_user, dbname="test",
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def pg_database_module(pg_user):
    import psycopg

    name = f"si_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=pg_user, dbname="test", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://{pg_user}@{PG_HOST}:{PG_PORT}/{name}"
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=pg_user, dbname="test", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.exceptions.RedisError:
        pytest.skip(f"Redis is not reachable at {REDIS_URL} (CI starts it)")
    return REDIS_URL


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a thread of the test process; real HTTP): its endpoint URL.
    Clients authenticate with the dummy keys in S3_ENV."""
    pytest.importorskip("moto")
    from moto.server import ThreadedMotoServer

    for key, value in S3_ENV.items():
        os.environ.setdefault(key, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def make_bucket(endpoint: str) -> str:
    import boto3

    name = f"si-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **{
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
    }).create_bucket(Bucket=name)
    return name


# -- tiny models and datasets -----------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from styleinject.testing import tiny_pipeline

    return tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny")


def dataset_zip(path: Path, n: int = 2) -> Path:
    """A zip of n 64x64 images with same-name .txt captions."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(n):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
            archive.writestr(f"img{i}.png", buffer.getvalue())
            archive.writestr(f"img{i}.txt", f"a red square, style {i}")
    return path


def decode_png(data: str):
    import numpy as np
    from PIL import Image

    raw = base64.b64decode(data)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.int16)


# -- processes ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process with its output in a log file; stopped by its own pid only."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def service_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STYLEINJECT_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update({f"STYLEINJECT_{k.upper()}": str(v) for k, v in values.items()})
    return env


def wait_for_http(url: str, procs: list[Proc], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited early:\n{proc.log_tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not come up in {timeout} s:\n" + "\n".join(p.log_tail() for p in procs))


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "api.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=True)


# -- the end-to-end flow both modes run ---------------------------------------------------------------

class Service:
    """A running API (+ worker): base URL, artifact root and the processes."""

    def __init__(self, base_url: str, artifact_root: Path, procs: list[Proc]) -> None:
        self.base_url = base_url
        self.artifact_root = artifact_root
        self.procs = procs

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=180)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log_tail()}" for p in self.procs)


def wait_job(client: httpx.Client, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {job}")


def follow_events(client: httpx.Client, job_id: str, timeout: float = 180) -> list[tuple[str, dict]]:
    """Read GET /jobs/{id}/events until the `end` event; returns (event, data) pairs."""
    import json

    events, event = [], None
    with client.stream("GET", f"/jobs/{job_id}/events", timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event:
                events.append((event, json.loads(line.split(":", 1)[1])))
                if event == "end":
                    break
    return events


def upload_dataset(client: httpx.Client, path: Path) -> httpx.Response:
    with open(path, "rb") as handle:
        return client.post("/datasets", files={"file": (path.name, handle, "application/octet-stream")})


def train_and_generate(service: Service, client: httpx.Client, tmp_path: Path) -> dict:
    """Upload -> train (progress via SSE) -> adapter with checkpoints -> generate differs from base."""
    response = upload_dataset(client, dataset_zip(tmp_path / "tiny.zip"))
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["status"] == "ready" and dataset["num_items"] == 2
    assert client.get(f"/datasets/{dataset['id']}").json()["id"] == dataset["id"]

    response = client.post("/train", json={"kind": "finetune", "dataset_id": dataset["id"], **TINY_TRAIN})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued"
    events = follow_events(client, job["id"])
    progress = [data["progress"] for name, data in events if name == "progress" and data["progress"]]
    assert progress, f"no progress event seen: {events}"
    assert all(p["total"] == 4 and 1 <= p["step"] <= 4 for p in progress)
    assert events[-1][0] == "end"

    job = client.get(f"/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", (job, service.logs())
    assert job["progress"]["step"] == 4 and job["adapter_id"]
    assert job["id"] in [j["id"] for j in client.get("/jobs").json()]
    history = client.get(f"/jobs/{job['id']}/history").json()["events"]
    assert [e["status"] for e in history if e["kind"] == "status"] == ["queued", "running", "succeeded"]
    assert [e["data"]["step"] for e in history if e["kind"] == "progress"][-1] == 4
    assert [e["data"]["step"] for e in history if e["kind"] == "checkpoint"] == [2, 4]

    adapters = client.get("/adapters").json()
    assert job["adapter_id"] in [a["id"] for a in adapters]
    adapter = client.get(f"/adapters/{job['adapter_id']}").json()
    assert [c["step"] for c in adapter["checkpoints"]] == [2, 4]
    assert adapter["config"]["rank"] == 4 and adapter["config"]["num_styles"] == 2
    assert adapter["metadata"]["steps"] == "4"

    def generate(**extra) -> tuple[dict, object]:
        response = client.post("/generate", json={**TINY_GENERATE, **extra})
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["images"]) == 1
        return body, decode_png(body["images"][0])

    _, base = generate()
    body, styled = generate(adapter_id=adapter["id"])
    assert body["adapter_id"] == adapter["id"] and styled.shape == (64, 64, 3)
    _, base_again = generate()
    assert (base == base_again).all(), "the base model's image changed after an adapter request"
    assert (base != styled).any(), "the adapter did not change the image"

    response = client.get(f"/adapters/{adapter['id']}/download")
    assert response.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(response.content)).namelist()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(names)
    return {"dataset": dataset, "job": job, "adapter": adapter}


@pytest.fixture
def log_dir(tmp_path) -> Iterator[Path]:
    path = tmp_path / "logs"
    path.mkdir()
    yield path

"""Embedded default over HTTP: `styleinject serve --home tmp --port N` as a subprocess (SQLite,
SQLAlchemy broker, local artifacts, one real Celery worker process, the packaged toy demo model)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from styleinject.assets import TOY_BASE
from tests.service.conftest import (
    TINY_TRAIN,
    Proc,
    Service,
    decode_png,
    free_port,
    run_cli,
    service_env,
    train_and_generate,
    wait_for_http,
    wait_job,
)


def _styleinject() -> list[str]:
    script = Path(sys.executable).with_name("styleinject")
    if script.exists():
        return [str(script)]
    found = shutil.which("styleinject")
    return [found] if found else [sys.executable, "-m", "styleinject.cli"]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    home = root / "home"
    logs = root / "logs"
    logs.mkdir()
    # no STYLEINJECT_BASE_MODEL: the base model is the toy demo model shipped with the package
    env = service_env(progress_interval_s=0.2, lease_ttl_s=5)
    port = free_port()
    serve = Proc("serve", [*_styleinject(), "serve", "--home", str(home), "--port", str(port)], env, logs)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", [serve], timeout=120)
        key = run_cli("apikey", "create", "--tenant", "carol", "--home", str(home), env=env).stdout.strip()
        yield Service(f"http://127.0.0.1:{port}", home / "artifacts", [serve]), key, home
    finally:
        serve.stop(timeout=30)


def test_serve_prints_where_things_are(embedded):
    service, _, home = embedded
    log = service.procs[0].log_tail(20000)
    for needle in (service.base_url, f"{service.base_url}/docs", f"{service.base_url}/dashboard"):
        assert needle in log
    assert "base model: the toy demo model" in log
    assert (home / "styleinject.db").is_file() and (home / "broker.db").is_file()
    # a fresh install prints one working key for tenant admin, so a new user can call the API at once
    match = re.search(r"first start: an API key .*\n\s+(si_\S+)", log)
    assert match, log
    with service.client(match.group(1)) as client:
        assert client.get("/jobs").status_code == 200
        # the toy demo model is registered on first start: tenants name models, never paths
        assert {"name": "demo", "source": str(TOY_BASE)}.items() <= client.get("/models").json()[0].items()


def test_embedded_train_then_generate(embedded, tmp_path):
    service, key, home = embedded
    with service.client(key) as client:
        flow = train_and_generate(service, client, tmp_path)
    assert flow["adapter"]["base_model"] == "demo"  # the registered name, not the server path
    assert Path(service.artifact_root / "jobs" / flow["job"]["id"] / "adapter_model.safetensors").is_file()

    # the dashboard: the login form POSTs the key -> cookie -> HTML with the job and the adapter
    with httpx.Client(base_url=service.base_url, timeout=30) as browser:
        response = browser.post("/dashboard/login", data={"key": key}, follow_redirects=True)
        assert response.status_code == 200 and "text/html" in response.headers["content-type"]
        assert flow["job"]["id"] in response.text and flow["adapter"]["id"] in response.text
        assert key not in str(response.url)
        # an old link with the key in the URL still lands on the login form (the key unused)
        response = browser.get("/dashboard", params={"key": key}, follow_redirects=True)
        assert response.status_code == 200 and str(response.url).endswith("/dashboard/login")
        # a wrong key, a bad body: errors never repeat key material
        bad = browser.post("/generate", json={"prompt": "x", "width": key}, headers={"Authorization": f"Bearer {key}"})
        assert bad.status_code == 422 and key not in bad.text
    assert httpx.get(f"{service.base_url}/dashboard").status_code == 401

    # after login, upload, train and generate, the server's log (API access log + both workers)
    # holds no key material: the key never appears, a ?key= request is logged redacted
    log = service.procs[0].log_path.read_text(errors="replace")
    assert key not in log and key.split("_", 2)[2] not in log  # the key, nor its secret part
    assert "key=[redacted]" in log and '"POST /dashboard/login HTTP/1.1" 303' in log
    # the only key in the log is the first-start admin key, printed once by design (key + curl line)
    first = re.search(r"first start: an API key .*\n\s+(si_\S+)", log).group(1)
    assert set(re.findall(r"si_[0-9a-f]{12}_[A-Za-z0-9_\-]+", log)) == {first} and log.count(first) == 2


def test_first_generate_uses_the_demo_models_own_defaults(embedded):
    """A new user's first call, prompt only: the demo model's size (32 x 32) and guidance (4), and
    the response says which values were used."""
    service, key, _ = embedded
    with service.client(key) as client:
        response = client.post("/generate", json={"prompt": "two red circles on a white background", "seed": 1})
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["width"], body["height"], body["steps"], body["guidance_scale"]) == (32, 32, 30, 4.0)
        assert decode_png(body["images"][0]).shape == (32, 32, 3)
        # asking for more than the server allows is still refused before any work is queued
        response = client.post("/generate", json={"prompt": "x", "width": 4096, "height": 32})
        assert response.status_code == 422 and "STYLEINJECT_MAX_IMAGE_SIZE" in response.text


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _worker_pids(serve: Proc, queue: str | None = None) -> list[int]:
    """The Celery worker children of serve (of one queue: train or generate)."""
    pids = []
    for pid in _children(serve.proc.pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"celery" in b" ".join(cmdline) and (queue is None or cmdline[cmdline.index(b"--queues") + 1] == queue.encode()):
            pids.append(pid)
    return pids


def test_killed_worker_is_restarted_and_the_job_resumes(embedded, tmp_path):
    """SIGKILL the worker mid-job: serve restarts it, re-queues the job, and once the dead
    worker's lease expires the job resumes from its latest checkpoint (not from step 0)."""
    service, key, _ = embedded
    serve = service.procs[0]
    with service.client(key) as client:
        dataset = client.get("/datasets").json()[0]
        body = {**TINY_TRAIN, "steps": 60, "checkpoint_every": 2}
        job = client.post("/train", json={"kind": "finetune", "dataset_id": dataset["id"], **body}).json()
        deadline = time.monotonic() + 120
        while (client.get(f"/jobs/{job['id']}").json()["progress"] or {}).get("step", 0) < 4:
            assert time.monotonic() < deadline, service.logs()
            time.sleep(0.2)
        [pid] = _worker_pids(serve, "train")
        os.kill(pid, signal.SIGKILL)
        final = wait_job(client, job["id"], timeout=180)
    assert final["status"] == "succeeded", (final, service.logs())
    assert final["attempts"] == 2 and final["progress"]["step"] == 60
    log = serve.log_tail(200_000)
    assert "restarting (1)" in log and f"re-queued job {job['id']}" in log
    assert "resumed from" in log and "step-0000" in log
    assert len(_worker_pids(serve, "train")) == 1


def test_serve_runs_a_train_and_a_generate_worker_and_stops_them(embedded):
    """Generation never waits behind training: one solo worker for jobs, one threads worker whose
    engine batches the generate requests it holds."""
    service, _, _ = embedded
    serve = service.procs[0]
    workers = _worker_pids(serve)
    assert len(workers) == 2
    for queue, pool in (("train", b"solo"), ("generate", b"threads")):
        [pid] = _worker_pids(serve, queue)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[cmdline.index(b"--pool") + 1] == pool
    serve.stop(timeout=40)
    assert serve.proc.returncode == 0, serve.log_tail()
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or b"zombie" in Path(f"/proc/{pid}/status").read_bytes().lower()

"""Distributed mode with object storage and metrics, nothing shared on disk: the API (uvicorn, two
processes in Prometheus multiprocess mode) and a prefork Celery worker run with different home
folders, no common artifact folder; artifacts travel only through an S3 server (moto, loopback).
Then /metrics on the API and the worker's metrics port, scraped after that traffic."""

from __future__ import annotations

import io
import sys
import time
import uuid
import zipfile

import boto3
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service.conftest import (
    S3_ENV,
    TINY_GENERATE,
    Proc,
    Service,
    free_port,
    make_bucket,
    run_cli,
    service_env,
    train_and_generate,
    wait_for_http,
)

TOKEN = "scrape-token-for-tests"


@pytest.fixture(scope="module")
def s3_service(tmp_path_factory, pg_database_module, redis_url, tiny_model, s3_server):
    root = tmp_path_factory.mktemp("s3dist")
    logs = root / "logs"
    logs.mkdir()
    bucket = make_bucket(s3_server)
    prefix = f"si-test-{uuid.uuid4().hex[:8]}:"
    common = dict(database_url=pg_database_module, broker_url=redis_url, broker_key_prefix=prefix,
                  artifact_root=f"s3://{bucket}/deploy", s3_endpoint_url=s3_server, s3_region="us-east-1",
                  base_model=tiny_model, lease_ttl_s=30, progress_interval_s=0.2, metrics_token=TOKEN)
    api_env = {**service_env(home=root / "api-host", **common), **S3_ENV,
               "PROMETHEUS_MULTIPROC_DIR": str(root / "api-prom")}
    (root / "api-prom").mkdir()
    worker_port = free_port()
    worker_env = {**service_env(home=root / "worker-host", metrics_port=worker_port, **common), **S3_ENV}
    worker_env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # `styleinject worker` makes its own for prefork
    run_cli("db", "upgrade", env=api_env)
    keys = {"alice": run_cli("apikey", "create", "--tenant", "alice", env=api_env).stdout.strip(),
            "admin": run_cli("apikey", "create", "--tenant", "admin", env=api_env).stdout.strip()}
    port = free_port()
    worker = Proc("worker", [sys.executable, "-m", "worker.cli", "worker", "--pool", "prefork", "--concurrency", "1",
                             "--hostname", f"s3-{port}@%h"], worker_env, logs)
    api = Proc("api", [sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--workers", "2",
                       "--host", "127.0.0.1", "--port", str(port)], api_env, logs)
    procs = [api, worker]
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", procs)
        wait_for_http(f"http://127.0.0.1:{worker_port}/metrics", procs)
        service = Service(f"http://127.0.0.1:{port}", root / "no-shared-folder", procs)
        yield service, keys, root, bucket, worker_port, s3_server
    finally:
        for proc in procs:
            proc.stop()
        import redis

        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def total(text: str, name: str, **labels) -> float:
    """Sum over the series of ``name`` whose labels include ``labels`` (multiprocess gauges add pid)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples(text).items() if n == name and want <= set(lab))


@pytest.fixture(scope="module")
def s3_flow(s3_service, tmp_path_factory):
    service, keys, *_ = s3_service
    with service.client(keys["alice"]) as client:
        return train_and_generate(service, client, tmp_path_factory.mktemp("s3flow"))


def test_s3_worker_without_shared_disk_trains_and_generates(s3_service, s3_flow):
    service, keys, root, bucket, _, endpoint = s3_service
    job_id, adapter_id = s3_flow["job"]["id"], s3_flow["adapter"]["id"]
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys_in_bucket = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                      for o in page.get("Contents", ())}
    assert f"deploy/jobs/{job_id}/adapter_model.safetensors" in keys_in_bucket
    dataset_prefix = f"deploy/datasets/{s3_flow['dataset']['id']}/"
    assert any(k.startswith(dataset_prefix) and k.endswith("/img0.png") for k in keys_in_bucket)
    assert any(k.startswith("deploy/generations/") and k.endswith("/0.png") for k in keys_in_bucket)
    # the API host never held the job's output; the worker host fetched the dataset from the bucket
    assert not list((root / "api-host").rglob(f"jobs/{job_id}"))
    assert list((root / "worker-host" / "artifact-cache").rglob(f"datasets/{s3_flow['dataset']['id']}/**/img0.png"))
    assert not (root / "api-host" / "artifacts").exists() and not (root / "worker-host" / "artifacts").exists()

    with service.client(keys["alice"]) as client:
        archive = zipfile.ZipFile(io.BytesIO(client.get(f"/adapters/{adapter_id}/download").content))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(archive.namelist())
        assert client.delete(f"/adapters/{adapter_id}").status_code == 204
        assert client.post("/generate", json={**TINY_GENERATE, "adapter_id": adapter_id}).status_code == 404
    left = s3.list_objects_v2(Bucket=bucket, Prefix=f"deploy/jobs/{job_id}/")
    assert left.get("KeyCount", 0) == 0


def test_metrics_scraped_after_traffic_s3_deployment(s3_service, s3_flow):
    service, keys, _, _, worker_port, _ = s3_service
    auth = {"Authorization": f"Bearer {TOKEN}"}
    api_text = httpx.get(f"{service.base_url}/metrics", headers=auth, timeout=30).text
    assert httpx.get(f"{service.base_url}/metrics", timeout=30).status_code == 401
    assert httpx.get(f"{service.base_url}/metrics", headers={"Authorization": f"Bearer {keys['admin']}"},
                     timeout=30).status_code == 200
    assert value(api_text, "styleinject_http_requests_total", method="POST", route="/train", status="202") == 1
    assert value(api_text, "styleinject_http_requests_total", method="POST", route="/generate", status="200") >= 3
    assert value(api_text, "styleinject_http_request_duration_seconds_count", method="POST", route="/generate") >= 3
    assert value(api_text, "styleinject_jobs", kind="finetune", status="succeeded") == 1
    assert ("styleinject_queue_depth", (("queue", "generate"), ("state", "queued"))) in samples(api_text)
    assert value(api_text, "styleinject_job_transitions_total", status="queued") >= 1  # the API's commit

    # several API processes: the counters are the sum over both (the /healthz polls hit either)
    before = value(api_text, "styleinject_http_requests_total", method="GET", route="/healthz", status="200")
    for _ in range(6):
        httpx.get(f"{service.base_url}/healthz", timeout=10)
    after = httpx.get(f"{service.base_url}/metrics", headers=auth, timeout=30).text
    assert value(after, "styleinject_http_requests_total", method="GET", route="/healthz", status="200") == before + 6

    deadline = time.monotonic() + 30
    while True:  # the engine sampler runs once a second in the worker's child process
        worker_text = httpx.get(f"http://127.0.0.1:{worker_port}/metrics", timeout=10).text
        if total(worker_text, "styleinject_engine_steps_total") >= 6 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert total(worker_text, "styleinject_engine_steps_total") >= 6  # 3 requests x 2 steps
    assert total(worker_text, "styleinject_engine_batch_rows_total") >= total(worker_text, "styleinject_engine_steps_total")
    assert total(worker_text, "styleinject_engine_step_seconds_total") > 0
    assert total(worker_text, "styleinject_adapter_tier_misses_total", tier="host") >= 1
    assert total(worker_text, "styleinject_training_steps_total", kind="finetune") == 4
    assert total(worker_text, "styleinject_tasks_total", task="train", outcome="succeeded") == 1
    assert total(worker_text, "styleinject_tasks_total", task="generate", outcome="succeeded") >= 3
    assert total(worker_text, "styleinject_job_transitions_total", status="succeeded") == 1  # the worker's commit
    beat = max(v for (n, _), v in samples(worker_text).items() if n == "styleinject_worker_heartbeat_timestamp_seconds")
    assert time.time() - beat < 30
    time.sleep(5.5)
    later = httpx.get(f"http://127.0.0.1:{worker_port}/metrics", timeout=10).text
    assert max(v for (n, _), v in samples(later).items()
               if n == "styleinject_worker_heartbeat_timestamp_seconds") > beat  # advancing

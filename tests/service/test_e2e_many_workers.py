"""Many workers on Redis + PostgreSQL: two generate workers share the requests, two train workers
share the jobs, and a job whose training process is killed is redelivered and finishes on the
other train worker, resuming from its checkpoint. Real processes, nothing mocked."""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from api.core.db.models import GenerationRequest
from tests.service.conftest import (
    TINY_GENERATE,
    TINY_TRAIN,
    Proc,
    Service,
    dataset_zip,
    free_port,
    run_cli,
    service_env,
    upload_dataset,
    wait_for_http,
    wait_job,
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pg_database_module, redis_url, tiny_model):
    root = tmp_path_factory.mktemp("many")
    logs = root / "logs"
    logs.mkdir()
    prefix = f"si-test-{uuid.uuid4().hex[:8]}:"
    env = service_env(home=root / "home", database_url=pg_database_module, broker_url=redis_url,
                      broker_key_prefix=prefix, artifact_root=root / "shared", base_model=tiny_model,
                      lease_ttl_s=6, progress_interval_s=0.2, generate_concurrency=2)
    env["OMP_NUM_THREADS"] = "1"
    run_cli("db", "upgrade", env=env)
    key = run_cli("apikey", "create", "--tenant", "alice", env=env).stdout.strip()
    port = free_port()

    def worker(name: str, queues: str, pool: str) -> Proc:
        return Proc(name, [sys.executable, "-m", "worker.cli", "worker", "--queues", queues, "--pool", pool,
                           "--hostname", f"{name}-{port}@%h"], env, logs)

    workers = {"gen1": worker("gen1", "generate", "threads"), "gen2": worker("gen2", "generate", "threads"),
               "trainA": worker("trainA", "train", "prefork"), "trainB": worker("trainB", "train", "prefork")}
    api = Proc("api", [sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app",
                       "--host", "127.0.0.1", "--port", str(port)], env, logs)
    procs = [api, *workers.values()]
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", procs)
        time.sleep(3)  # every worker connected to the broker
        yield Service(f"http://127.0.0.1:{port}", root / "shared", procs), key, workers, pg_database_module, root
    finally:
        for proc in procs:
            proc.stop()
        import redis

        client = redis.Redis.from_url(redis_url)
        for k in client.scan_iter(match=f"{prefix}*"):
            client.delete(k)


def test_generate_requests_spread_across_both_generate_workers(cluster):
    service, key, _, database_url, _ = cluster
    with service.client(key) as client:
        ids = []
        for seed in range(8):
            response = client.post("/generations", json={**TINY_GENERATE, "seed": seed})
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            states = [client.get(f"/generations/{i}").json()["status"] for i in ids]
            if all(s in ("succeeded", "failed", "timeout") for s in states):
                break
            time.sleep(0.5)
        assert states == ["succeeded"] * 8, (states, service.logs())
    engine = create_engine(database_url)
    with Session(engine) as session:
        workers = session.scalars(select(GenerationRequest.worker_id).where(GenerationRequest.id.in_(ids))).all()
    engine.dispose()
    hosts = {w.split("@")[0].rsplit("-", 1)[0] for w in workers}
    assert hosts == {"gen1", "gen2"}, workers


def test_a_job_whose_worker_is_killed_finishes_on_the_other_train_worker(cluster, tmp_path):
    service, key, workers, _, _ = cluster
    with service.client(key) as client:
        dataset = upload_dataset(client, dataset_zip(tmp_path / "d.zip")).json()
        job = client.post("/train", json={"kind": "finetune", "dataset_id": dataset["id"],
                                          **{**TINY_TRAIN, "steps": 30, "checkpoint_every": 2}}).json()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            current = client.get(f"/jobs/{job['id']}").json()
            if current["status"] == "running" and current["checkpoints"] and (current["progress"] or {}).get("step", 0) >= 3:
                break
            assert current["status"] in ("queued", "running"), current
            time.sleep(0.2)
        else:
            raise AssertionError(f"the job never reached a checkpoint: {current}\n{service.logs()}")
        first = current["worker_id"]
        name = first.split("@")[0].rsplit("-", 1)[0]
        victim, other = (workers["trainA"], "trainB") if name == "trainA" else (workers["trainB"], "trainA")
        pool_pid = int(first.rsplit(":", 1)[1])  # the pool process of that worker (our own child's child)
        # the machine's training process dies (OOM killer, GPU fault) while its worker is shutting down
        victim.proc.send_signal(signal.SIGTERM)
        os.kill(pool_pid, signal.SIGKILL)
        final = wait_job(client, job["id"], timeout=240)
        assert final["status"] == "succeeded", (final, service.logs())
        assert final["attempts"] == 2 and final["progress"]["step"] == 30
        assert final["worker_id"].split("@")[0].rsplit("-", 1)[0] == other
        history = client.get(f"/jobs/{job['id']}/history").json()["events"]
        restart = [i for i, e in enumerate(history) if e["kind"] == "status" and e["status"] == "running"]
        assert len(restart) == 2
        after = [e["data"]["step"] for e in history[restart[1]:] if e["kind"] == "progress"]
        assert after and after[0] > 2, after  # resumed from a checkpoint, not from step 0
        assert [c["step"] for c in final["checkpoints"]][-1] == 30
    victim.proc.wait(timeout=60)

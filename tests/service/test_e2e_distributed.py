"""Distributed mode over HTTP: uvicorn + a real Celery worker process, Redis broker and results,
PostgreSQL database, a shared artifact folder. Nothing is mocked."""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
import zipfile

import pytest

from tests.service.conftest import (
    TINY_GENERATE,
    TINY_TRAIN,
    Proc,
    Service,
    free_port,
    run_cli,
    service_env,
    train_and_generate,
    upload_dataset,
    wait_for_http,
    wait_job,
)


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, pg_database_module, redis_url, tiny_model):
    from tests.eval.helpers import save_tiny_clip  # the eval helper's tiny offline CLIP

    root = tmp_path_factory.mktemp("distributed")
    logs = root / "logs"
    logs.mkdir()
    clip = save_tiny_clip(root / "tiny-clip")
    prefix = f"si-test-{uuid.uuid4().hex[:8]}:"
    env = service_env(
        home=root / "home",
        database_url=pg_database_module,
        broker_url=redis_url,
        broker_key_prefix=prefix,
        artifact_root=root / "shared",
        base_model=tiny_model,
        lease_ttl_s=30,
        progress_interval_s=0.2,
        scorer_paths=json.dumps({"clipscore": str(clip)}),
    )
    run_cli("db", "upgrade", env=env)
    keys = {name: run_cli("apikey", "create", "--tenant", name, env=env).stdout.strip()
            for name in ("alice", "bob")}
    port = free_port()
    worker = Proc("worker", [sys.executable, "-m", "worker.cli", "worker", "--pool", "prefork",
                             "--concurrency", "1", "--hostname", f"test-{port}@%h"], env, logs)
    api = Proc("api", [sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app",
                       "--host", "127.0.0.1", "--port", str(port)], env, logs)
    procs = [api, worker]
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", procs)
        yield Service(f"http://127.0.0.1:{port}", root / "shared", procs), keys, root
    finally:
        for proc in procs:
            proc.stop()
        import redis

        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)


@pytest.fixture(scope="module")
def flow(distributed, tmp_path_factory):
    service, keys, _ = distributed
    with service.client(keys["alice"]) as client:
        return train_and_generate(service, client, tmp_path_factory.mktemp("flow"))


def test_train_then_generate_with_adapter(flow):
    assert flow["adapter"]["checkpoints"]


def test_other_tenant_gets_404_everywhere(distributed, flow):
    service, keys, _ = distributed
    dataset, job, adapter = flow["dataset"]["id"], flow["job"]["id"], flow["adapter"]["id"]
    with service.client(keys["bob"]) as bob:
        requests = [
            ("GET", f"/datasets/{dataset}", None),
            ("GET", f"/jobs/{job}", None),
            ("POST", f"/jobs/{job}/cancel", None),
            ("GET", f"/jobs/{job}/events", None),
            ("GET", f"/adapters/{adapter}", None),
            ("GET", f"/adapters/{adapter}/download", None),
            ("DELETE", f"/adapters/{adapter}", None),
            ("POST", "/train", {"kind": "finetune", "dataset_id": dataset, **TINY_TRAIN}),
            ("POST", "/generate", {**TINY_GENERATE, "adapter_id": adapter}),
            ("POST", "/evaluate", {"adapter_id": adapter}),
        ]
        for method, path, body in requests:
            response = bob.request(method, path, json=body)
            assert response.status_code == 404, (method, path, response.text)
            assert "not found" in response.json()["message"]
        assert bob.get("/jobs").json() == []
        assert bob.get("/adapters").json() == []
        assert bob.get("/datasets").json() == []
    with service.client(keys["alice"]) as alice:  # untouched for its owner
        assert alice.get(f"/adapters/{adapter}").status_code == 200


def test_zip_slip_upload_is_rejected_and_leaves_nothing(distributed, tmp_path):
    service, keys, root = distributed
    evil = tmp_path / "evil.zip"
    marker = f"evil-{uuid.uuid4().hex[:8]}.txt"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("img0.txt", "a caption")
        archive.writestr(f"../../../{marker}", "pwned")
        archive.writestr(f"../{marker}", "pwned")
    before = set((service.artifact_root / "datasets").iterdir())
    with service.client(keys["alice"]) as client:
        response = upload_dataset(client, evil)
    assert 400 <= response.status_code < 500, response.text
    assert "outside" in response.json()["message"] or "traversal" in response.json()["message"]
    assert not list(root.rglob(marker)) and not list(root.parent.rglob(marker))
    assert set((service.artifact_root / "datasets").iterdir()) == before
    assert not any((service.artifact_root / "uploads").iterdir())


def test_bad_upload_says_what_is_wrong(distributed, tmp_path):
    service, keys, _ = distributed
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr("cat.png", b"not a png")
        archive.writestr("cat.txt", "a cat")
    with service.client(keys["alice"]) as client:
        response = upload_dataset(client, broken)
        assert response.status_code == 422, response.text
        assert "cat.png" in response.json()["message"]
        assert "broken.zip" not in [d["name"] for d in client.get("/datasets").json()]
    assert not any((service.artifact_root / "uploads").iterdir())


def test_cancel_running_job_keeps_checkpoint(distributed, flow, tmp_path):
    service, keys, _ = distributed
    with service.client(keys["alice"]) as client:
        dataset = flow["dataset"]["id"]
        body = {**TINY_TRAIN, "steps": 2000, "checkpoint_every": 2}
        job = client.post("/train", json={"kind": "finetune", "dataset_id": dataset, **body}).json()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            current = client.get(f"/jobs/{job['id']}").json()
            if current["status"] == "running" and (current["progress"] or {}).get("step", 0) >= 3:
                break
            assert current["status"] in ("queued", "running"), current
            time.sleep(0.2)
        else:
            raise AssertionError(f"job never got past step 3: {current}\n{service.logs()}")
        response = client.post(f"/jobs/{job['id']}/cancel")
        assert response.status_code == 200 and response.json()["cancel_requested"]
        final = wait_job(client, job["id"], timeout=60)
        assert final["status"] == "cancelled", final
        assert final["progress"]["step"] < 2000
        assert final["checkpoints"], "cancelling must keep the checkpoint"
        assert final["adapter_id"] is None
        folder = service.artifact_root / "jobs" / job["id"] / "checkpoints"
        steps = sorted(int(p.name.split("-")[1]) for p in folder.iterdir() if p.name.startswith("step-"))
        assert steps and steps[-1] == max(c["step"] for c in final["checkpoints"])
        assert (folder / f"step-{steps[-1]:06d}" / "adapter_model.safetensors").is_file()
        # cancelling again is harmless
        assert client.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"


def test_cancel_queued_job_never_runs(distributed, flow):
    service, keys, _ = distributed
    with service.client(keys["alice"]) as client:
        dataset = flow["dataset"]["id"]
        blocker = client.post("/train", json={"kind": "finetune", "dataset_id": dataset,
                                              **{**TINY_TRAIN, "steps": 2000}}).json()
        queued = client.post("/train", json={"kind": "finetune", "dataset_id": dataset, **TINY_TRAIN}).json()
        cancelled = client.post(f"/jobs/{queued['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"
        client.post(f"/jobs/{blocker['id']}/cancel")
        assert wait_job(client, blocker["id"], timeout=60)["status"] == "cancelled"
        time.sleep(1)  # the queued task is delivered after the blocker and must be a no-op
        final = client.get(f"/jobs/{queued['id']}").json()
        assert final["status"] == "cancelled" and final["attempts"] == 0 and not final["checkpoints"]


def test_evaluate_scores_the_adapter(distributed, flow):
    service, keys, _ = distributed
    adapter = flow["adapter"]["id"]
    with service.client(keys["alice"]) as client:
        response = client.post("/evaluate", json={
            "adapter_id": adapter, "prompts": ["a red square", "a blue circle"], "seeds": [0, 1],
            "steps": 2, "width": 64, "height": 64, "scorers": ["clipscore"]})
        assert response.status_code == 202, response.text
        job = response.json()
        assert (job["kind"], job["status"], job["adapter_id"]) == ("evaluate", "queued", adapter)
        final = wait_job(client, job["id"], timeout=120)
        assert final["status"] == "succeeded", (final, service.logs())
        assert final["progress"] == {**final["progress"], "step": 4, "total": 4}
        scores = client.get(f"/adapters/{adapter}").json()["eval_scores"]
        assert [s["metric"] for s in scores] == ["clipscore"] and math.isfinite(scores[0]["value"])
        assert scores[0]["job_id"] == job["id"] and scores[0]["details"]["n_samples"] == 4


def test_delete_adapter_removes_rows_and_files(distributed, flow):
    service, keys, _ = distributed
    adapter = flow["adapter"]
    folder = service.artifact_root / "jobs" / flow["job"]["id"]
    assert folder.is_dir()
    with service.client(keys["alice"]) as client:
        assert client.delete(f"/adapters/{adapter['id']}").status_code == 204
        assert client.get(f"/adapters/{adapter['id']}").status_code == 404
        assert client.post("/generate", json={**TINY_GENERATE, "adapter_id": adapter["id"]}).status_code == 404
        assert client.get(f"/jobs/{flow['job']['id']}").json()["adapter_id"] is None
    assert not folder.exists()


def test_errors_are_json_with_a_message(distributed):
    service, keys, _ = distributed
    with service.client(keys["alice"]) as client:
        response = client.post("/generate", json={**TINY_GENERATE, "width": 65})
        assert response.status_code == 422 and "width" in response.json()["message"]
    with service.client("si_000000000000_nope") as client:
        response = client.get("/jobs")
        assert response.status_code == 401 and response.json()["message"]

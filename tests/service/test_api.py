"""The API in-process (FastAPI TestClient, SQLite, embedded broker file, no worker): auth, error
shapes, upload limits, request bounds, timeouts, OpenAPI, dashboard. No torch is needed here."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.auth import create_api_key, revoke_api_key
from api.core.db.models import Dataset, GenerationRequest, Job, utcnow
from api.core.db.session import session_scope
from api.main import create_app
from api.core.storage import DATASETS, UPLOADS
from tests.service.conftest import REPO, TINY_GENERATE, sqlite_settings


@pytest.fixture
def settings(tmp_path, monkeypatch):
    return sqlite_settings(monkeypatch, tmp_path / "home", bootstrap_key="boot-key-for-tests",
                           max_upload_bytes=64 * 1024, generate_timeout_s=0.5, base_model="/models/x")


def auth(key: str = "boot-key-for-tests") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def small_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.txt", "a caption")
    return buffer.getvalue()


def test_healthz_needs_no_key(client):
    assert client.get("/healthz").json() == {"status": "ok", "database": True, "version": "0.1.0"}


def test_keys_bootstrap_created_and_revoked(client, settings):
    response = client.get("/jobs")
    assert response.status_code == 401 and "API key" in response.json()["message"]
    assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/jobs", headers=auth("si_0123456789ab_wrong")).status_code == 401
    assert client.get("/jobs", headers=auth("not-even-a-key")).status_code == 401
    assert client.get("/jobs", headers=auth()).json() == []

    with session_scope(settings.database_url) as session:
        key, row = create_api_key(session, "alice")
        assert row.key_hash != key and key not in row.key_hash  # only the digest is stored
    assert client.get("/jobs", headers=auth(key)).status_code == 200
    assert client.get("/jobs", headers=auth(key[:-1] + ("A" if key[-1] != "A" else "B"))).status_code == 401
    with session_scope(settings.database_url) as session:
        assert revoke_api_key(session, key[3:15]) is not None
    assert client.get("/jobs", headers=auth(key)).status_code == 401


def test_validation_errors_are_json_with_a_message(client):
    response = client.post("/train", json={"kind": "finetune", "steps": 0}, headers=auth())
    assert response.status_code == 422
    body = response.json()
    assert "dataset_id" in body["message"] and "steps" in body["message"]
    assert isinstance(body["detail"], list)
    response = client.post("/train", json={"dataset_id": "x", "stepz": 3}, headers=auth())
    assert response.status_code == 422 and "stepz" in response.json()["message"]
    response = client.post("/train", json={"dataset_id": "x", "resolution": 30}, headers=auth())
    assert response.status_code == 422 and "resolution" in response.json()["message"]
    # the demo model's native 32 x 32 is a valid training size
    from api.schemas import TrainRequest

    assert TrainRequest(dataset_id="x", resolution=32).resolution == 32


def test_unknown_ids_are_404(client):
    for method, path in [("GET", "/datasets/nope"), ("GET", "/jobs/nope"), ("POST", "/jobs/nope/cancel"),
                         ("GET", "/jobs/nope/events"), ("GET", "/adapters/nope"),
                         ("GET", "/adapters/nope/download"), ("DELETE", "/adapters/nope")]:
        response = client.request(method, path, headers=auth())
        assert response.status_code == 404, (method, path)
        assert response.json()["message"].endswith("nope not found")
    response = client.post("/train", json={"dataset_id": "nope", "steps": 2}, headers=auth())
    assert response.status_code == 404 and "dataset nope" in response.json()["message"]


def test_upload_over_the_cap_is_413_and_leaves_nothing(client, settings):
    for size in (100_000, 1_000_000):  # caught while streaming / by the declared Content-Length
        response = client.post("/datasets", files={"file": ("big.zip", b"\0" * size)}, headers=auth())
        assert response.status_code == 413 and "STYLEINJECT_MAX_UPLOAD_BYTES" in response.json()["message"]
    assert not any((settings.artifact_root / UPLOADS).iterdir()) if (settings.artifact_root / UPLOADS).exists() else True
    with session_scope(settings.database_url) as session:
        assert session.scalars(select(Dataset)).all() == []


def test_upload_type_and_field_checks(client, settings):
    response = client.post("/datasets", files={"file": ("x.exe", b"MZ")}, headers=auth())
    assert response.status_code == 415 and ".zip" in response.json()["message"]
    response = client.post("/datasets", files={"other": ("x.zip", small_zip())}, headers=auth())
    assert response.status_code == 422 and "'file'" in response.json()["message"]
    response = client.post("/datasets", content=b"{}", headers={**auth(), "content-type": "application/json"})
    assert response.status_code == 415
    assert not any((settings.artifact_root / UPLOADS).iterdir())


def test_upload_is_validated_by_the_engine(client, settings, tmp_path):
    from tests.service.conftest import dataset_zip

    data = dataset_zip(tmp_path / "d.zip").read_bytes()
    response = client.post("/datasets", files={"file": ("../../my data.zip", data)}, headers=auth())
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert (dataset["status"], dataset["num_items"], dataset["name"]) == ("ready", 2, "../../my data.zip")
    assert dataset["size_bytes"] == len(data) and len(dataset["sha256"]) == 64
    with session_scope(settings.database_url) as session:
        path = session.get(Dataset, dataset["id"]).path
    assert path == str((settings.artifact_root / DATASETS) / dataset["id"] / "data")
    assert sorted(p.name for p in ((settings.artifact_root / DATASETS) / dataset["id"] / "data").iterdir()) == [
        "img0.png", "img0.txt", "img1.png", "img1.txt"]
    assert not any((settings.artifact_root / UPLOADS).iterdir())
    assert client.get(f"/datasets/{dataset['id']}", headers=auth()).json() == dataset
    assert [d["id"] for d in client.get("/datasets", headers=auth()).json()] == [dataset["id"]]

    # a captions-only archive is not a finetune dataset
    response = client.post("/datasets", files={"file": ("c.zip", small_zip())}, headers=auth())
    assert response.status_code == 422 and response.json()["message"].startswith("invalid dataset: ")
    # a prompts file is a distill dataset only
    prompts = b"a red fox\na blue bird\n"
    response = client.post("/datasets", params={"kind": "distill"}, files={"file": ("p.txt", prompts)},
                           headers=auth())
    assert response.status_code == 201 and response.json()["num_items"] == 2
    response = client.post("/train", json={"dataset_id": response.json()["id"], "steps": 2}, headers=auth())
    assert response.status_code == 422 and "distill" in response.json()["message"]
    assert not any((settings.artifact_root / UPLOADS).iterdir())
    assert len(list((settings.artifact_root / DATASETS).iterdir())) == 2  # the rejected one left nothing


def test_zip_slip_is_rejected_in_process(client, settings, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.txt", "a caption")
        archive.writestr("../../escaped.txt", "x")
        archive.writestr("/abs/escaped2.txt", "x")
    response = client.post("/datasets", files={"file": ("evil.zip", buffer.getvalue())}, headers=auth())
    assert response.status_code == 422, response.text
    assert "traversal" in response.json()["message"] or "outside" in response.json()["message"]
    assert not list(settings.home.parent.rglob("escaped*.txt"))
    assert not any((settings.artifact_root / UPLOADS).iterdir())
    assert not (settings.artifact_root / DATASETS).exists() or not any((settings.artifact_root / DATASETS).iterdir())
    with session_scope(settings.database_url) as session:
        assert session.scalars(select(Dataset)).all() == []


def test_generate_bounds_and_timeout(client, settings):
    for extra, word in [({"width": 1032}, "width"), ({"height": 60}, "height"), ({"width": 100}, "width"),
                        ({"num_images": 5}, "num_images"), ({"steps": 151}, "steps")]:
        response = client.post("/generate", json={**TINY_GENERATE, **extra}, headers=auth())
        assert response.status_code == 422, extra
        assert word in response.json()["message"]
    response = client.post("/generate", json={**TINY_GENERATE, "adapter_id": "nope"}, headers=auth())
    assert response.status_code == 404
    response = client.post("/generate", json=TINY_GENERATE, headers=auth())  # no worker: times out
    assert response.status_code == 504 and "STYLEINJECT_GENERATE_TIMEOUT_S" in response.json()["message"]
    with session_scope(settings.database_url) as session:
        row = session.scalars(select(GenerationRequest)).one()
        assert row.status == "timeout" and row.params["seed"] == TINY_GENERATE["seed"]


SMALL = {"steps": 30, "width": 32, "height": 32}  # cost 30 x 32 x 32 per image


def test_generations_answer_202_with_queue_position_and_caps_answer_429(settings):
    """No worker runs here, so requests stay queued: each later one is further back in the queue,
    and a tenant over its cap gets 429 + Retry-After while another tenant is still served."""
    capped = settings.model_copy(update={"tenant_max_pending_generations": 3,
                                         "tenant_max_generation_cost": 4 * 30 * 32 * 32})
    with TestClient(create_app(capped)) as client:
        positions = []
        for seed in range(3):
            response = client.post("/generations", json={"prompt": "a red circle", "seed": seed, **SMALL}, headers=auth())
            assert response.status_code == 202, response.text
            body = response.json()
            assert body["status"] == "queued" and response.headers["location"] == f"/generations/{body['id']}"
            positions.append(body["queue_position"])
        assert positions == [0, 1, 2]
        response = client.post("/generations", json={"prompt": "one more", **SMALL}, headers=auth())
        assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
        assert "STYLEINJECT_TENANT_MAX_PENDING_GENERATIONS" in response.json()["message"]
        # cost = steps x width x height x images: another tenant's 2 images fit its cap, 3 more do not
        from api.auth import create_api_key

        with session_scope(settings.database_url) as session:
            key, _ = create_api_key(session, "other")
        response = client.post("/generations", json={"prompt": "x", "num_images": 2, **SMALL}, headers=auth(key))
        assert response.status_code == 202
        response = client.post("/generations", json={"prompt": "x", "num_images": 3, **SMALL}, headers=auth(key))
        assert response.status_code == 429 and "STYLEINJECT_TENANT_MAX_GENERATION_COST" in response.text
        response = client.post("/generations", json={"prompt": "x", "steps": 150, "num_images": 4,
                                                     "width": 64, "height": 64}, headers=auth())
        assert response.status_code == 422 and "per-tenant cap" in response.json()["message"]
        first = client.get(f"/generations/{body['id']}", headers=auth()).json()
        assert first["queue_position"] == 2 and first["images"] == [] and first["params"]["seed"] == 2
        assert client.get(f"/generations/{body['id']}", headers=auth(key)).status_code == 404  # not theirs
        assert client.get("/generations/nope", headers=auth()).status_code == 404
        response = client.post("/generations", json={"prompt": "x", "adapter_id": "a", "adapters": [{"id": "a"}]},
                               headers=auth())
        assert response.status_code == 422 and "not both" in response.json()["message"]


def test_cancel_of_a_queued_job(client, settings):
    with session_scope(settings.database_url) as session:
        from api.auth import get_or_create_tenant

        tenant = get_or_create_tenant(session, "admin")
        session.add(Job(id="j1", tenant_id=tenant.id, kind="finetune", params={}))
    response = client.post("/jobs/j1/cancel", headers=auth())
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled" and response.json()["cancel_requested"]
    events = client.get("/jobs/j1/events", headers=auth()).text
    assert "event: end" in events and '"status": "cancelled"' in events


def test_openapi_is_complete(client):
    schema = client.get("/openapi.json").json()
    expected = {
        ("/datasets", "post"), ("/datasets", "get"), ("/datasets/{dataset_id}", "get"), ("/train", "post"),
        ("/jobs", "get"), ("/jobs/{job_id}", "get"), ("/jobs/{job_id}/cancel", "post"),
        ("/jobs/{job_id}/events", "get"), ("/jobs/{job_id}/history", "get"), ("/adapters", "get"),
        ("/adapters/{adapter_id}", "get"),
        ("/adapters/{adapter_id}/download", "get"), ("/adapters/{adapter_id}", "delete"),
        ("/adapters/import", "post"), ("/adapters/{adapter_id}/export", "get"),
        ("/generate", "post"), ("/evaluate", "post"), ("/dashboard", "get"), ("/healthz", "get"),
    }
    found = {(path, method) for path, ops in schema["paths"].items() for method in ops}
    assert expected <= found
    for path, method in expected:
        op = schema["paths"][path][method]
        assert op.get("summary") and op.get("tags"), (path, method)
        ok = [code for code in op["responses"] if code.startswith("2")]
        assert ok and all(op["responses"][code].get("content") or code == "204" for code in ok), (path, method)
        if path not in ("/healthz", "/dashboard"):
            assert op["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorOut")
            assert {"HTTPBearer": []} in op.get("security", []), (path, method)
    upload = schema["paths"]["/datasets"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["properties"]["file"]["format"] == "binary"
    for name in ("TrainRequest", "JobOut", "AdapterDetail", "GenerateRequest", "GenerateOut", "DatasetOut"):
        assert name in schema["components"]["schemas"]


def test_dashboard_login_is_a_form_post_never_a_url(client):
    response = client.get("/dashboard")
    assert response.status_code == 401 and 'method="post" action="/dashboard/login"' in response.text
    assert client.get("/dashboard/login").status_code == 200
    assert client.post("/dashboard/login", data={"key": "wrong"}).status_code == 401
    assert "set-cookie" not in client.post("/dashboard/login", data={"key": "wrong"}).headers
    response = client.post("/dashboard/login", data={"key": "boot-key-for-tests"}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/dashboard"
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie  # plain http
    page = client.get("/dashboard")  # the TestClient keeps the cookie
    assert page.status_code == 200 and "admin" in page.text and "No jobs yet" in page.text
    assert client.get("/jobs").status_code == 200  # the cookie authenticates the API too
    client.get("/dashboard", params={"logout": 1})
    assert client.get("/dashboard").status_code == 401
    # an old link with the key in the URL: sent to the form, the key is not used
    response = client.get("/dashboard", params={"key": "boot-key-for-tests"}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/dashboard/login"
    assert "set-cookie" not in response.headers


def test_cookie_is_secure_over_https(settings):
    with TestClient(create_app(settings), base_url="https://testserver") as client:
        response = client.post("/dashboard/login", data={"key": "boot-key-for-tests"}, follow_redirects=False)
        assert response.status_code == 303 and "secure" in response.headers["set-cookie"].lower()


def test_api_process_needs_no_torch(tmp_path):
    """Import the app, then validate a real upload in-process: torch is never imported."""
    from tests.service.conftest import dataset_zip

    dataset_zip(tmp_path / "d.zip")
    code = f"""
import sys
from pathlib import Path
import api.main, api.cli, worker.celery_app
from api.routes.datasets import validate_upload
api.main.create_app()
path, info = validate_upload(Path({str(tmp_path / 'd.zip')!r}), Path({str(tmp_path / 'out')!r}), "finetune")
assert info.num_items == 2, info
bad = [m for m in ('torch', 'diffusers', 'transformers', 'accelerate') if m in sys.modules]
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_a_corrupt_image_is_a_422_naming_the_file_in_api_terms(client, settings):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("good.txt", "a caption")
        archive.writestr("broken-cat.png", b"\x89PNG\r\n\x1a\n this is not an image")
        archive.writestr("broken-cat.txt", "a cat")
    response = client.post("/datasets", files={"file": ("d.zip", buffer.getvalue())}, headers=auth())
    assert response.status_code == 422, response.text
    message = response.json()["message"]
    assert "broken-cat.png" in message and "--" not in message, message
    assert "skip_bad=true" in message  # what to do, as the API spells it
    assert not any((settings.artifact_root / UPLOADS).iterdir())
    assert not (settings.artifact_root / DATASETS).exists() or not any((settings.artifact_root / DATASETS).iterdir())


def test_finished_job_history(client, settings):
    """Status changes and progress points, owner-checked: what the dashboard draws."""
    from api.auth import get_or_create_tenant
    from api.core.jobs import create_job
    from worker.lease import JobLease

    with session_scope(settings.database_url) as session:
        tenant = get_or_create_tenant(session, "admin")
        job_id = create_job(session, tenant_id=tenant.id, kind="finetune", params={}).id
    lease = JobLease(settings, job_id, "w1")
    assert lease.claim().status == "claimed"
    for step in (1, 2, 3, 4):
        lease.report({"step": step, "total": 4, "loss": 1.0 / step, "lr": 1e-4}, force=True)
    assert lease.finish("succeeded", result={"steps_done": 4})

    response = client.get(f"/jobs/{job_id}/history", headers=auth())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["job_id"] == job_id and body["status"] == "succeeded"
    statuses = [(e["data"]["from"], e["status"]) for e in body["events"] if e["kind"] == "status"]
    assert statuses == [(None, "queued"), ("queued", "running"), ("running", "succeeded")]
    points = [e["data"] for e in body["events"] if e["kind"] == "progress"]
    assert [p["step"] for p in points] == [1, 2, 3, 4] and points[-1]["loss"] == 0.25
    only = client.get(f"/jobs/{job_id}/history", params={"kind": "progress"}, headers=auth()).json()
    assert {e["kind"] for e in only["events"]} == {"progress"}
    assert client.get(f"/jobs/{job_id}/history", params={"kind": "nope"}, headers=auth()).status_code == 422

    with session_scope(settings.database_url) as session:
        key, _ = create_api_key(session, "mallory")
    assert client.get(f"/jobs/{job_id}/history", headers=auth(key)).status_code == 404


def test_requests_left_running_by_a_lost_worker_stop_counting_against_the_caps(settings):
    from datetime import timedelta

    from api.auth import get_or_create_tenant

    capped = settings.model_copy(update={"tenant_max_pending_generations": 1})
    with session_scope(settings.database_url) as session:
        tenant = get_or_create_tenant(session, "admin")
        lost = GenerationRequest(tenant_id=tenant.id, params={}, status="running", cost=1,
                                 started_at=utcnow() - timedelta(seconds=settings.generate_time_limit_s + 120))
        session.add(lost)
        session.flush()
        lost_id = lost.id
    with TestClient(create_app(capped)) as client:
        response = client.post("/generations", json={"prompt": "x", **SMALL}, headers=auth())
        assert response.status_code == 202, response.text
        assert client.post("/generations", json={"prompt": "y", **SMALL}, headers=auth()).status_code == 429
        lost = client.get(f"/generations/{lost_id}", headers=auth()).json()
        assert lost["status"] == "failed" and "lost" in lost["error"]

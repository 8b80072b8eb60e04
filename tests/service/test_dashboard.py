"""Dashboard pages in-process (TestClient, SQLite, no worker, no browser): auth, ownership, what
each page renders, thumbnails, offline /docs. The browser checks are in test_dashboard_browser.py."""

from __future__ import annotations

import io
import json
import re

import pytest
from PIL import Image

from api.auth import create_api_key, get_or_create_tenant
from api.core.db.models import Dataset
from api.core.db.session import session_scope
from api.core.jobs import create_job
from api.routes.dashboard import dataset_items
from tests.service.conftest import sqlite_settings

KEY = "boot-key-for-dashboard-tests"


@pytest.fixture
def settings(tmp_path, monkeypatch):
    return sqlite_settings(monkeypatch, tmp_path / "home", bootstrap_key=KEY, base_model="/models/x")


@pytest.fixture
def logged_in(client):
    assert client.post("/dashboard/login", data={"key": KEY}, follow_redirects=False).status_code == 303
    return client


def _job(settings, tenant_name: str = "admin", **values) -> str:
    from worker.lease import JobLease

    with session_scope(settings.database_url) as session:
        tenant = get_or_create_tenant(session, tenant_name)
        job_id = create_job(session, tenant_id=tenant.id, kind="finetune",
                            params={"steps": 4, "adapter": {"rank": 4}}).id
    lease = JobLease(settings, job_id, "w1")
    assert lease.claim().status == "claimed"
    for step in (1, 2, 3):
        lease.report({"step": step, "total": 4, "loss": 1.0 / step, "lr": 1e-4}, force=True)
    if values.get("error"):
        assert lease.finish("failed", error=values["error"])
    return job_id


def _png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _dataset(settings, tmp_path, tenant_name="admin", metadata=False) -> str:
    root = tmp_path / f"data-{tenant_name}-{metadata}"
    root.mkdir()
    for i, color in enumerate(["red", "green", "blue"] * 4):  # 12 items: img2 sorts before img10
        (root / f"img{i}.png").write_bytes(_png(color))
        if not metadata:
            (root / f"img{i}.txt").write_text(f"a {color} thing {i}")
    if metadata:
        with open(root / "metadata.jsonl", "w") as handle:
            for i in range(12):
                handle.write(json.dumps({"file_name": f"img{i}.png", "text": f"meta caption {i}"}) + "\n")
    with session_scope(settings.database_url) as session:
        tenant = get_or_create_tenant(session, tenant_name)
        row = Dataset(tenant_id=tenant.id, name=f"{tenant_name}.zip", kind="finetune", status="ready",
                      path=str(root), size_bytes=1000, format="zip", num_items=12, sha256="0" * 64)
        session.add(row)
        session.flush()
        return row.id


def test_pages_need_a_key_and_show_the_login_form(client):
    for path in ("/dashboard", "/dashboard/playground", "/dashboard/datasets", "/dashboard/jobs/nope"):
        response = client.get(path)
        assert response.status_code == 401 and "<form" in response.text, path
    assert client.get("/dashboard/datasets/x/thumbs/0").status_code == 401


def test_job_page_renders_params_history_and_escapes(logged_in, settings):
    error = "boom </script><script>alert(1)</script> " + "y" * 3000
    job_id = _job(settings, error=error)
    overview = logged_in.get("/dashboard").text
    assert f'href="/dashboard/jobs/{job_id}"' in overview  # the jobs table links to the job page

    page = logged_in.get(f"/dashboard/jobs/{job_id}")
    assert page.status_code == 200
    html = page.text
    assert "<script>alert(1)</script>" not in html  # neither in the error box nor in the embedded JSON
    assert 'id="loss-chart"' in html and 'id="checkpoints"' in html and "rank" in html
    initial = json.loads(re.search(r'<script type="application/json" id="initial">(.*?)</script>', html, re.S).group(1))
    assert initial["job"]["id"] == job_id and initial["job"]["error"] == error
    points = [e["data"]["step"] for e in initial["events"] if e["kind"] == "progress"]
    assert points == [1, 2, 3]
    assert '<script src="/static/dashboard.js"' in html
    assert logged_in.get("/static/dashboard.js").status_code == 200


def test_job_page_lists_its_webhook_deliveries_only(logged_in, settings):
    from api.core.db.models import WebhookDelivery

    with session_scope(settings.database_url) as session:
        tenant = get_or_create_tenant(session, "admin")
        hooked = create_job(session, tenant_id=tenant.id, kind="finetune", params={},
                            webhook_url="https://hooks.example.com/<b>x</b>", webhook_events=["completed", "start"]).id
        other = create_job(session, tenant_id=tenant.id, kind="finetune", params={},
                           webhook_url="https://hooks.example.com/y").id
        plain = create_job(session, tenant_id=tenant.id, kind="finetune", params={}).id
        session.flush()
        for job_id, event, status in ((hooked, "start", "delivered"), (hooked, "completed", "pending"),
                                      (other, "start", "failed")):
            session.add(WebhookDelivery(job_id=job_id, event=event, url="https://hooks.example.com/x", payload={},
                                        status=status, attempts=1, response_code=200 if status == "delivered" else None,
                                        error=None if status == "delivered" else "connection refused"))

    def page(job_id):
        html = logged_in.get(f"/dashboard/jobs/{job_id}").text
        initial = json.loads(re.search(r'<script type="application/json" id="initial">(.*?)</script>', html, re.S).group(1))
        return html, initial["deliveries"]

    html, sent = page(hooked)
    assert 'id="deliveries"' in html and "start, completed to" in html  # events in their order
    assert "https://hooks.example.com/&lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html
    assert sorted((d["event"], d["status"]) for d in sent) == [("completed", "pending"), ("start", "delivered")]
    assert "start, progress, checkpoint, completed to" in page(other)[0]  # no list given: every event
    html, sent = page(plain)
    assert 'id="deliveries"' not in html and sent == []


def test_job_page_queue_position_and_ownership(logged_in, settings):
    with session_scope(settings.database_url) as session:
        tenant = get_or_create_tenant(session, "admin")
        first = create_job(session, tenant_id=tenant.id, kind="finetune", params={}).id
        session.flush()
        second = create_job(session, tenant_id=tenant.id, kind="finetune", params={}).id
    assert re.search(r'id="queue">\s*0 jobs ahead', logged_in.get(f"/dashboard/jobs/{first}").text)
    assert re.search(r'id="queue">\s*1 job ahead', logged_in.get(f"/dashboard/jobs/{second}").text)

    other = _job(settings, tenant_name="mallory")
    response = logged_in.get(f"/dashboard/jobs/{other}")
    assert response.status_code == 404 and other in response.text


def test_playground_lists_own_adapters_and_limits(logged_in, settings):
    from sqlalchemy import select

    from api.core.db.models import Adapter, EvalScore

    with session_scope(settings.database_url) as session:
        mine = get_or_create_tenant(session, "admin")
        theirs = get_or_create_tenant(session, "mallory")
        session.add(Adapter(tenant_id=mine.id, name="stripes", kind="finetune", base_model="m", path="/x"))
        session.add(Adapter(tenant_id=theirs.id, name="secret", kind="finetune", base_model="m", path="/y"))
    with session_scope(settings.database_url) as session:
        adapter = session.scalar(select(Adapter).where(Adapter.name == "stripes"))
        session.add(EvalScore(adapter_id=adapter.id, metric="clipscore", value=0.25))
        session.flush()
        session.add(EvalScore(adapter_id=adapter.id, metric="clipscore", value=0.3125))
    overview = logged_in.get("/dashboard").text
    assert "clipscore 0.3125" in overview and "secret" not in overview  # newest score per metric
    html = logged_in.get("/dashboard/playground").text
    assert 'data-name="stripes"' in html and "secret" not in html
    assert f'max="{settings.max_inference_steps}"' in html and 'id="compare"' in html


@pytest.mark.parametrize("metadata", [False, True])
def test_datasets_page_thumbnails_and_captions(logged_in, settings, tmp_path, metadata):
    dataset_id = _dataset(settings, tmp_path, metadata=metadata)
    html = logged_in.get("/dashboard/datasets").text
    caption = "meta caption 2" if metadata else "a blue thing 2"
    assert caption in html and f"/dashboard/datasets/{dataset_id}/thumbs/11" in html
    with session_scope(settings.database_url) as session:
        names = [item["name"] for item in dataset_items(session.get(Dataset, dataset_id))]
    assert names[:3] == ["img0.png", "img1.png", "img2.png"] and names[-1] == "img11.png"

    response = logged_in.get(f"/dashboard/datasets/{dataset_id}/thumbs/2")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    thumb = Image.open(io.BytesIO(response.content))
    assert max(thumb.size) <= 128 and thumb.convert("RGB").getpixel((0, 0)) == (0, 0, 255)
    assert logged_in.get(f"/dashboard/datasets/{dataset_id}/thumbs/12").status_code == 404
    assert logged_in.get(f"/dashboard/datasets/{dataset_id}/thumbs/-1").status_code == 404


def test_thumbnails_are_owner_checked(client, settings, tmp_path):
    dataset_id = _dataset(settings, tmp_path, tenant_name="mallory")
    with session_scope(settings.database_url) as session:
        key, _ = create_api_key(session, "carol")
    response = client.get(f"/dashboard/datasets/{dataset_id}/thumbs/0", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 404


def test_docs_are_served_from_the_package(client):
    html = client.get("/docs").text
    assert "/static/swagger-ui/swagger-ui-bundle.js" in html and "/static/swagger-ui/swagger-ui.css" in html
    assert "cdn" not in html.lower() and "http://" not in html and "https://" not in html
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"):
        assert client.get(f"/static/swagger-ui/{name}").status_code == 200
    assert client.get("/redoc").status_code == 404  # ReDoc would need a CDN

"""Prometheus metrics: /metrics auth, request counters by route template, database gauges, the
job-transition hook, the metrics port, multiprocess mode, the worker's engine sampler, and the
Grafana dashboard in docs/ (valid JSON naming only metrics that exist)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.auth import create_api_key
from api.core.db.migrate import upgrade
from api.core.db.session import session_scope
from api.core.jobs import create_job, transition
from api.core.settings import Settings
from api.main import create_app
from tests.service.conftest import REPO, free_port

BOOT = "boot-key-for-tests"


@pytest.fixture
def settings(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("STYLEINJECT_") or name.lower() == "prometheus_multiproc_dir":
            monkeypatch.delenv(name)
    settings = Settings(home=tmp_path / "home", bootstrap_key=BOOT, metrics_token="scrape-token",
                        base_model="/models/x")
    settings.home.mkdir(parents=True)
    upgrade(settings.database_url)
    return settings


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value}"""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_auth_admin_key_or_scrape_token(settings):
    with TestClient(create_app(settings)) as client:
        assert client.get("/metrics").status_code == 401
        with session_scope(settings.database_url) as session:
            alice, _ = create_api_key(session, "alice")
            admin, _ = create_api_key(session, "admin")
        assert client.get("/metrics", headers={"Authorization": f"Bearer {alice}"}).status_code == 403
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 403
        for key in (admin, BOOT, "scrape-token"):
            response = client.get("/metrics", headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 200, response.text
            assert response.headers["content-type"].startswith("text/plain")
        assert "/metrics" not in client.get("/openapi.json").json()["paths"]


def test_request_counters_use_route_templates_and_change(settings):
    headers = {"Authorization": "Bearer scrape-token"}
    with TestClient(create_app(settings)) as client:
        before = client.get("/metrics", headers=headers).text
        client.get("/healthz")
        for _ in range(3):
            assert client.get("/jobs/nope-123", headers={"Authorization": f"Bearer {BOOT}"}).status_code == 404
        client.get("/no/such/path/abc")
        after = client.get("/metrics", headers=headers).text
    count = "styleinject_http_requests_total"
    assert value(after, count, method="GET", route="/jobs/{job_id}", status="404") \
        - value(before, count, method="GET", route="/jobs/{job_id}", status="404") == 3
    assert value(after, count, method="GET", route="/healthz", status="200") > \
        value(before, count, method="GET", route="/healthz", status="200")
    assert value(after, count, method="GET", route="<unmatched>", status="404") >= 1
    assert "nope-123" not in after and "/no/such" not in after  # never ids or raw paths as labels
    assert value(after, "styleinject_http_request_duration_seconds_count", method="GET", route="/jobs/{job_id}") >= 3


def test_job_gauges_queue_depth_and_transition_hook(settings):
    headers = {"Authorization": "Bearer scrape-token"}
    with TestClient(create_app(settings)) as client:
        before = client.get("/metrics", headers=headers).text
        with session_scope(settings.database_url) as session:
            from api.auth import get_or_create_tenant

            tenant = get_or_create_tenant(session, "alice")
            ids = [create_job(session, tenant_id=tenant.id, kind="finetune", params={}).id for _ in range(3)]
        with session_scope(settings.database_url) as session:
            transition(session, ids[0], "running")
            transition(session, ids[1], "cancelled")
        after = client.get("/metrics", headers=headers).text
    assert value(after, "styleinject_jobs", kind="finetune", status="queued") == 1
    assert value(after, "styleinject_jobs", kind="finetune", status="running") == 1
    assert value(after, "styleinject_jobs", kind="finetune", status="cancelled") == 1
    assert value(after, "styleinject_jobs", kind="distill", status="queued") == 0  # every series exists
    assert value(after, "styleinject_queue_depth", queue="train", state="queued") == 1
    assert value(after, "styleinject_queue_depth", queue="train", state="running") == 1
    assert ("styleinject_queue_depth", (("queue", "generate"), ("state", "queued"))) in samples(after)
    for status, n in (("queued", 3), ("running", 1), ("cancelled", 1)):
        name = "styleinject_job_transitions_total"
        assert value(after, name, status=status) - value(before, name, status=status) == n


def test_metrics_port_serves_without_auth(settings):
    port = free_port()
    settings = settings.model_copy(update={"metrics_port": port})
    with TestClient(create_app(settings)) as client:
        client.get("/healthz")
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert value(text, "styleinject_http_requests_total", method="GET", route="/healthz", status="200") >= 1
        assert ("styleinject_jobs", (("kind", "finetune"), ("status", "queued"))) in samples(text)
    with pytest.raises(httpx.HTTPError):  # closed with the app
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_prometheus_multiproc_dir_sums_processes(tmp_path):
    """Two processes write into PROMETHEUS_MULTIPROC_DIR; a third renders the sum."""
    folder = tmp_path / "prom"
    folder.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    write = ("from api.core import metrics as m; m.HTTP_REQUESTS.labels('GET', '/healthz', '200').inc(2); "
             "m.TIER_BYTES.labels('host').set(100)")
    for _ in range(2):
        subprocess.run([sys.executable, "-c", write], cwd=REPO, env=env, check=True, timeout=60)
    read = "from api.core import metrics as m; import sys; sys.stdout.write(m.render().decode())"
    text = subprocess.run([sys.executable, "-c", read], cwd=REPO, env=env, check=True, timeout=60,
                          capture_output=True, text=True).stdout
    assert value(text, "styleinject_http_requests_total", method="GET", route="/healthz", status="200") == 4


def test_engine_sampler_turns_engine_stats_into_counters():
    from worker import metrics as wm

    stats = {"waiting": 2, "active": 1, "steps": 10, "mean_batch_rows": 3.0, "finished": 4, "failed": 1,
             "step_seconds": 0.5, "device_slots": 4, "device_resident": 2, "device_hits": 5, "device_misses": 2,
             "device_evictions": 1, "device_bytes": 1000, "host_entries": 3, "host_bytes": 4000,
             "host_hits": 7, "host_misses": 3, "host_evictions": 0}
    sampler = wm.EngineSampler(lambda: stats)
    from api.core.metrics import render

    before = render().decode()
    sampler.sample()
    stats = {**stats, "steps": 12, "mean_batch_rows": 3.5, "device_hits": 6, "host_evictions": 2}
    sampler.sample()
    after = render().decode()

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("styleinject_engine_steps_total") == 12
    assert delta("styleinject_engine_batch_rows_total") == 42  # 12 x 3.5
    assert delta("styleinject_adapter_tier_hits_total", tier="device") == 6
    assert delta("styleinject_adapter_tier_misses_total", tier="host") == 3
    assert delta("styleinject_adapter_tier_evictions_total", tier="host") == 2
    assert delta("styleinject_engine_requests_total", outcome="finished") == 4
    assert value(after, "styleinject_adapter_tier_bytes", tier="host") == 4000
    assert value(after, "styleinject_engine_inflight_requests", state="waiting") == 2
    assert delta("styleinject_engine_step_seconds_total") == pytest.approx(0.5)
    # an engine replaced by another (new base model: counters restart) never makes a counter go down
    wm.EngineSampler(lambda: {**stats, "steps": 1}).sample()


def test_grafana_dashboard_is_valid_and_names_only_existing_metrics():
    dashboard = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    from api.core import metrics as m
    from prometheus_client import REGISTRY

    known = set(m.DB_METRICS)
    for family in REGISTRY.collect():
        known.add(family.name)
        known.update(s.name for s in family.samples)
    for collector in list(REGISTRY._collector_to_names):  # noqa: SLF001 - the registered names
        known.update(REGISTRY._collector_to_names[collector])
    used = {name for expr in exprs for name in re.findall(r"\bstyleinject_[a-z_]+", expr)}
    assert used and used <= known, used - known
    ops = (REPO / "docs" / "ops.md").read_text()
    assert all(name in ops for name in {re.sub(r"_(bucket|count|sum)$", "", n) for n in used})

"""The model registry: tenants name registered models; paths and hub ids from tenants are a 422
that reveals nothing, before anything is queued; only the admin registers (route and CLI)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from api.auth import create_api_key
from api.core.db.models import Job
from api.core.db.session import session_scope
from api.core.registry import add_model
from tests.service.conftest import dataset_zip, run_cli, service_env, sqlite_settings

ADMIN = {"Authorization": "Bearer admin-key-for-registry"}


@pytest.fixture
def settings(tmp_path, monkeypatch):
    return sqlite_settings(monkeypatch, tmp_path / "home", bootstrap_key="admin-key-for-registry",
                           base_model="/models/x")


@pytest.fixture
def tenant(settings):
    with session_scope(settings.database_url) as session:
        key, _ = create_api_key(session, "alice")
    return {"Authorization": f"Bearer {key}"}


def _jobs(settings) -> int:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(func.count()).select_from(Job))


def test_unregistered_models_are_422_before_anything_is_queued(client, settings, tenant, tmp_path):
    dataset = client.post("/datasets", files={"file": ("d.zip", dataset_zip(tmp_path / "d.zip").read_bytes())},
                          headers=tenant).json()
    body = {"dataset_id": dataset["id"], "steps": 2}
    messages = []
    for field, value in [("base_model", "../../etc"), ("base_model", "/etc"), ("base_model", str(tmp_path)),
                         ("base_model", "runwayml/stable-diffusion-v1-5"), ("teacher_model", "/nonexistent")]:
        kind = "distill" if field == "teacher_model" else "finetune"
        response = client.post("/train", json={**body, "kind": kind, field: value}, headers=tenant)
        assert response.status_code == 422, response.text
        message = response.json()["message"]
        assert "not a registered model" in message and "GET /models" in message
        messages.append(message.replace(repr(value[:100]), "NAME"))
    # an existing folder and a missing one answer alike: nothing about the server's files leaks
    assert len(set(messages) - {messages[-1]}) == 1
    assert _jobs(settings) == 0

    with session_scope(settings.database_url) as session:
        add_model(session, "sd15", "/models/sd15")
        add_model(session, "teacher", "/models/teacher.safetensors")
    response = client.post("/train", json={**body, "base_model": "sd15"}, headers=tenant)
    assert response.status_code == 202, response.text
    # the row keeps the source the worker loads; the tenant sees the names it sent, never a server path
    params = response.json()["params"]
    assert params["base_model"] == "sd15" and "base_model_name" not in params
    assert client.get(f"/jobs/{response.json()['id']}", headers=tenant).json()["params"]["base_model"] == "sd15"
    with session_scope(settings.database_url) as session:
        assert session.get(Job, response.json()["id"]).params["base_model"] == "/models/sd15"
    response = client.post("/train", json={**body, "kind": "distill", "teacher_model": "teacher"}, headers=tenant)
    assert response.status_code == 202 and response.json()["params"]["teacher_model"] == "teacher"
    with session_scope(settings.database_url) as session:
        assert session.get(Job, response.json()["id"]).params["teacher_model"] == "/models/teacher.safetensors"
    response = client.post("/train", json=body, headers=tenant)  # unset: the server's default base model
    assert response.status_code == 202 and response.json()["params"]["base_model"] == "unregistered"
    with session_scope(settings.database_url) as session:
        assert session.get(Job, response.json()["id"]).params["base_model"] == "/models/x"


def test_only_the_admin_registers_models(client, tenant):
    model = {"name": "sd15", "source": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
    assert client.post("/models", json=model, headers=tenant).status_code == 403
    response = client.post("/models", json=model, headers=ADMIN)
    assert response.status_code == 201 and response.json()["source"] == model["source"]
    assert client.post("/models", json=model, headers=ADMIN).status_code == 409
    assert client.post("/models", json={"name": "../x", "source": "/x"}, headers=ADMIN).status_code == 422
    # tenants see the names, not where they live
    assert client.get("/models", headers=tenant).json()[0] == {**client.get("/models", headers=tenant).json()[0],
                                                                "name": "sd15", "source": None}
    assert client.get("/models", headers=ADMIN).json()[0]["source"] == model["source"]
    assert client.delete("/models/sd15", headers=tenant).status_code == 403
    assert client.delete("/models/sd15", headers=ADMIN).status_code == 204
    assert client.delete("/models/sd15", headers=ADMIN).status_code == 404
    assert client.get("/models", headers=tenant).json() == []


def test_model_cli_add_list_remove(settings):
    env = service_env(home=settings.home)
    done = run_cli("model", "add", "sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", env=env)
    assert "registered model 'sd15'" in done.stdout
    assert "sd15\tstable-diffusion-v1-5/stable-diffusion-v1-5" in run_cli("model", "list", env=env).stdout
    run_cli("model", "remove", "sd15", env=env)
    assert run_cli("model", "list", env=env).stdout == ""


def test_adapters_show_the_registered_name_not_the_server_path(settings, client, tenant):
    """GET /adapters and the dashboard show the base model by the name tenants know."""
    from api.core.db.models import Adapter, Tenant

    with session_scope(settings.database_url) as session:
        add_model(session, "sd15", "/models/sd15")
        owner = session.scalar(select(Tenant).where(Tenant.name == "alice"))
        for name, source in [("named", "/models/sd15"), ("hub", "owner/some-model"), ("path", "/srv/secret/model")]:
            session.add(Adapter(tenant_id=owner.id, name=name, kind="finetune", base_model=source, path="/x"))
    response = client.get("/adapters", headers=tenant)
    assert response.status_code == 200, response.text
    shown = {a["name"]: a["base_model"] for a in response.json()}
    assert shown == {"named": "sd15", "hub": "owner/some-model", "path": "unregistered"}
    page = client.get("/dashboard", headers=tenant).text
    assert "sd15" in page and "/srv/secret" not in page and "/models/sd15" not in page

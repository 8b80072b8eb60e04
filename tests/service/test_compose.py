"""docker-compose.yml and the Dockerfiles: structure only (no Docker engine runs here)."""

from __future__ import annotations

import re

import yaml

from tests.service.conftest import REPO


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_services_and_order():
    services = _compose()["services"]
    assert {"api", "worker", "redis", "postgres", "migrations"} <= set(services)
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrations"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
    assert services["migrations"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "db" in services["migrations"]["command"] and "upgrade" in services["migrations"]["command"]
    for name in ("redis", "postgres"):
        assert "test" in services[name]["healthcheck"]
    assert services["api"]["ports"]


def test_compose_environment_is_shared_and_distributed():
    compose = _compose()
    services = compose["services"]
    for name in ("api", "worker", "migrations"):
        env = services[name]["environment"]
        assert env["STYLEINJECT_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["STYLEINJECT_DATABASE_URL"].split("@")[1].startswith("postgres:")
    for name in ("api", "worker", "generator"):
        env = services[name]["environment"]
        assert env["STYLEINJECT_BROKER_URL"].startswith("redis://redis:")
        assert env["STYLEINJECT_ARTIFACT_ROOT"] == "/artifacts"
        assert any(str(v).startswith("artifacts:/artifacts") for v in services[name]["volumes"])
    assert "artifacts" in compose["volumes"]


def test_training_and_generation_run_in_separate_workers():
    """A long job never holds the GPU worker that serves /generate."""
    services = _compose()["services"]
    train, generate = services["worker"]["command"], services["generator"]["command"]
    assert train[train.index("--queues") + 1] == "train"
    assert generate[generate.index("--queues") + 1] == "generate" and generate[generate.index("--pool") + 1] == "threads"


def test_worker_reserves_a_gpu_and_api_has_no_torch():
    services = _compose()["services"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert services["worker"]["build"]["dockerfile"] == "docker/Dockerfile.worker"
    assert services["api"]["build"]["dockerfile"] == "docker/Dockerfile.api"
    api_file = (REPO / "docker" / "Dockerfile.api").read_text()
    commands = [line for line in api_file.splitlines() if not line.lstrip().startswith("#")]
    assert not any(re.search(r"\btorch\b", line) for line in commands), "the API image must not install torch"
    worker_file = (REPO / "docker" / "Dockerfile.worker").read_text()
    assert "torch" in worker_file and "cu1" in worker_file


def test_compose_refuses_to_start_without_a_database_password():
    """No default password: every use of POSTGRES_PASSWORD is `${POSTGRES_PASSWORD:?message}`, which
    makes `docker compose` stop with the message when the variable is unset or empty."""
    text = (REPO / "docker-compose.yml").read_text()
    uses = re.findall(r"\$\{POSTGRES_PASSWORD([^}]*)\}", text)
    assert len(uses) >= 2, uses  # the postgres service and the database URL of every other service
    for rest in uses:
        assert rest.startswith(":?") and "docs/service.md" in rest, rest
    assert _compose()["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert not re.search(r"\$\{[A-Z_]*(PASSWORD|SECRET|KEY)[A-Z_]*:-[^}]", text), "a default for a secret"

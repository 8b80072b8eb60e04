"""docker-compose.yml and the Dockerfiles, without a Docker engine: the file is interpolated as
compose does it and validated against the Compose Specification's JSON schema
(tests/service/compose-spec.json, vendored unchanged from github.com/compose-spec/compose-spec,
schema/compose-spec.json at 170098ba07d9f53c383a41bfd4c5166b0a4529a6, Apache-2.0); with the
`docker compose` plugin installed, `docker compose config` checks it too."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import jsonschema
import pytest
import yaml

from tests.service.conftest import REPO, free_port, service_env

ENV = {"POSTGRES_PASSWORD": "test-password"}  # the one variable compose requires
_VARIABLE = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable syntax: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}."""

    def value(match: re.Match) -> str:
        escaped, name, op, arg, bare = match.groups()
        if escaped:
            return "$"
        name = name or bare
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op in (":-", "-"):
            return arg if unset else current
        if op in (":?", "?") and unset:
            raise ValueError(f"required variable {name} is missing a value: {arg}")
        return current or ""

    return _VARIABLE.sub(value, text)


def _interpolated(node, env: dict[str, str]):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: _interpolated(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolated(value, env) for value in node]
    return node


def _compose(env: dict[str, str] | None = None) -> dict:
    """The file as compose reads it: YAML first (merge keys resolved), then variables in the strings."""
    return _interpolated(yaml.safe_load((REPO / "docker-compose.yml").read_text()), ENV if env is None else env)


def test_compose_file_follows_the_compose_specification():
    schema = json.loads((REPO / "tests" / "service" / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(_compose())
    broken = _compose()
    broken["services"]["api"]["healthcheck"]["interval"] = 10  # a number where compose wants "10s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(broken)


@pytest.mark.skipif(subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0
                    if shutil.which("docker") else True, reason="no docker compose plugin")
def test_docker_compose_config_accepts_the_file():
    env = {**os.environ, **ENV}
    subprocess.run(["docker", "compose", "-f", str(REPO / "docker-compose.yml"), "config", "--quiet"],
                   env=env, check=True, capture_output=True)


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
        assert env["STYLEINJECT_ARTIFACT_ROOT"] == "/artifacts"  # unless STYLEINJECT_ARTIFACT_ROOT=s3://...
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
    raw = yaml.safe_load(text)["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert raw.startswith("${POSTGRES_PASSWORD:?")
    assert not re.search(r"\$\{[A-Z_]*(PASSWORD|SECRET|KEY)[A-Z_]*:-[^}]", text), "a default for a secret"


LONG_RUNNING = ("postgres", "redis", "api", "worker", "generator")


def test_every_long_running_service_has_a_healthcheck_and_waits_for_healthy_dependencies():
    services = _compose()["services"]
    for name, service in services.items():
        if service.get("restart") == "no":  # a one-shot step (migrations): it completes instead
            assert name == "migrations"
            continue
        test = service["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, (name, test)
    assert set(LONG_RUNNING) <= {n for n, s in services.items() if "healthcheck" in s}
    from api.routes.health import router

    assert f"http://127.0.0.1:8000{router.prefix}" in " ".join(services["api"]["healthcheck"]["test"])
    for name in ("worker", "generator"):
        assert "inspect ping -d celery@$HOSTNAME" in services[name]["healthcheck"]["test"][1]  # $$ -> $
    for name in ("api", "worker", "generator", "migrations"):
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        if name != "migrations":
            assert depends["redis"]["condition"] == "service_healthy"
            assert depends["migrations"]["condition"] == "service_completed_successfully"


def test_s3_metrics_and_log_settings_come_from_the_environment():
    """Unset, they are empty (Settings ignores empty values) and the artifacts volume is used; set,
    every service gets them."""
    from api.core.settings import Settings

    defaults = _compose()["services"]["worker"]["environment"]
    settings = Settings(**{k.removeprefix("STYLEINJECT_").lower(): v for k, v in defaults.items()
                           if k.startswith("STYLEINJECT_") and v != ""})
    assert settings.s3_endpoint_url is None and settings.metrics_port is None and settings.log_format == "text"
    chosen = {**ENV, "STYLEINJECT_ARTIFACT_ROOT": "s3://bucket/prefix", "STYLEINJECT_S3_ENDPOINT_URL": "http://minio:9000",
              "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret", "STYLEINJECT_METRICS_PORT": "9108",
              "STYLEINJECT_METRICS_TOKEN": "token", "STYLEINJECT_LOG_FORMAT": "json"}
    services = _compose(chosen)["services"]
    for name in ("api", "worker", "generator"):
        env = services[name]["environment"]
        assert {k: env[k] for k in chosen if k != "POSTGRES_PASSWORD"} == {k: v for k, v in chosen.items()
                                                                           if k != "POSTGRES_PASSWORD"}
    with pytest.raises(ValueError, match="POSTGRES_PASSWORD"):
        _compose({})


def test_worker_healthcheck_command_pings_a_live_worker(tmp_path, redis_url):
    """The compose healthcheck's command, run against a real worker: 0 for its own node, non-zero for
    a node that does not answer."""
    command = _compose()["services"]["generator"]["healthcheck"]["test"][1]
    hostname = f"hc{free_port()}"
    env = service_env(home=str(tmp_path / "home"), broker_url=redis_url, broker_key_prefix=f"{hostname}:")
    celery = [sys.executable, "-m", "celery"]
    worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker", "--queues", "generate",
                               "--concurrency", "1", "--hostname", f"celery@{hostname}"], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        shell = command.replace("celery -A", " ".join(celery) + " -A", 1).replace("--timeout 10", "--timeout 3")

        def check(host: str) -> int:
            return subprocess.run(["sh", "-c", shell], cwd=REPO, env={**env, "HOSTNAME": host},
                                  capture_output=True, timeout=60).returncode

        for _ in range(30):
            if check(hostname) == 0:
                break
        else:
            raise AssertionError("the worker never answered its healthcheck")
        assert check("not-" + hostname) != 0
    finally:
        worker.terminate()
        worker.wait(timeout=30)

"""Property-based fuzzing of the whole HTTP API with schemathesis, in-process (ASGI), authenticated,
against the real app on the machine's PostgreSQL: no request, however malformed, gets a 5xx, and
every response matches the OpenAPI schema (status documented as JSON, body shape, content type).

Bounded (a fixed number of examples per operation, derandomized) so the suite stays fast; it runs
with the rest under ``python -m pytest -q``. Plus hand-written hostile bodies the generator is
unlikely to produce (non-finite numbers, huge and deeply nested bodies, wrong content types, NUL).
"""

from __future__ import annotations

import io
import zipfile

import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from tests.service.conftest import TINY_GENERATE

KEY = "fuzz-bootstrap-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Routes that wait for a worker: with no worker in-process they answer 504 once
# generate_timeout_s (tiny here) has passed. That timeout is the expected answer, not a failure.
WAITS_FOR_WORKER = {("POST", "/generate"), ("POST", "/generations")}
EXAMPLES = 25  # per operation and generation mode: about 20 s for all 25 operations


def _settings(tmp_path, database_url):
    from api.core.settings import Settings

    return Settings(home=tmp_path / "home", database_url=database_url, bootstrap_key=KEY,
                    max_upload_bytes=64 * 1024, max_json_bytes=64 * 1024, generate_timeout_s=0.05,
                    base_model="/models/x")


@pytest.fixture(scope="module")
def app(tmp_path_factory, pg_database_module, monkeypatch_module):
    from api.core.db.migrate import upgrade
    from api.main import create_app

    for name in list(__import__("os").environ):
        if name.startswith("STYLEINJECT_"):
            monkeypatch_module.delenv(name)
    settings = _settings(tmp_path_factory.mktemp("fuzz"), pg_database_module)
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    return create_app(settings)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _real_ids(app) -> dict[str, str]:
    """A dataset, a queued job and a queued generation request, so the fuzzer also reaches rows
    that exist (schemathesis alone only finds 404s behind an id)."""
    from fastapi.testclient import TestClient

    from tests.service.conftest import dataset_zip

    with TestClient(app) as client:
        path = dataset_zip(app.state.settings.home / "d.zip")
        dataset = client.post("/datasets", files={"file": ("d.zip", path.read_bytes())}, headers=AUTH)
        assert dataset.status_code == 201, dataset.text
        job = client.post("/train", json={"dataset_id": dataset.json()["id"], "steps": 2}, headers=AUTH)
        assert job.status_code == 202, job.text
        # cancelled, so its event stream ends at once
        assert client.post(f"/jobs/{job.json()['id']}/cancel", headers=AUTH).status_code == 200
        generation = client.post("/generations", json=TINY_GENERATE, headers=AUTH)
        assert generation.status_code == 202, generation.text
    return {"dataset_id": dataset.json()["id"], "job_id": job.json()["id"],
            "request_id": generation.json()["id"], "name": "0.png"}


def test_api_never_answers_5xx_and_matches_its_schema(app):
    from hypothesis import given

    real = _real_ids(app)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        names = {p.name for p in operation.path_parameters}
        strategies = [operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)]
        # a queued generation's event stream waits for a worker that never comes: fuzz its ids only
        if names and names <= real.keys() and operation.path != "/generations/{request_id}/events":
            strategies.append(operation.as_strategy(path_parameters={n: real[n] for n in names}))

        @given(case=st.one_of(*strategies))
        @hypothesis_settings(max_examples=EXAMPLES * len(strategies), deadline=None, derandomize=True,
                             database=None, phases=[Phase.explicit, Phase.generate],
                             suppress_health_check=list(HealthCheck))
        def fuzz(case):
            response = case.call(headers=AUTH)
            if (case.method.upper(), case.path) in WAITS_FOR_WORKER and response.status_code == 504:
                assert response.json()["message"]
                return
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance,
                                                     content_type_conformance])
            content_type = (response.headers.get("content-type") or [""])[0]  # headers: name -> list
            if response.status_code >= 400 and content_type.startswith("application/json"):
                assert isinstance(response.json().get("message"), str)

        try:
            fuzz()
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure, report all
            failures.append(f"{operation.label}: {type(exc).__name__}: {exc}")
    assert operations >= 20
    assert not failures, "\n\n".join(failures)


# -- hostile bodies the generator rarely builds ---------------------------------------------------

@pytest.fixture(scope="module")
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def _post(client, path, body, content_type="application/json"):
    return client.post(path, content=body, headers={**AUTH, "content-type": content_type})


@pytest.mark.parametrize("path, body", [
    ("/train", '{"dataset_id": "x", "learning_rate": NaN}'),
    ("/train", '{"dataset_id": "x", "adapter": {"alpha": Infinity}}'),
    ("/train", '{"dataset_id": "x", "steps": 1e400}'),
    ("/train", '{"dataset_id": "x", "validation_prompts": [-Infinity]}'),
    ("/generate", '{"prompt": "x", "guidance_scale": NaN}'),
    ("/generations", '{"prompt": "x", "adapters": [{"id": "a", "scale": NaN}]}'),
    ("/evaluate", '{"adapter_id": "x", "guidance_scale": -Infinity}'),
    ("/evaluate", '{"adapter_id": "x", "seeds": [1, 2, 1e999]}'),
])
def test_non_finite_numbers_are_422(client, path, body):
    response = _post(client, path, body)
    assert response.status_code == 422, response.text
    assert "finite" in response.json()["message"]


def test_nesting_size_content_type_and_nul(client):
    deep = '{"dataset_id": "x", "adapter": ' + '[' * 30_000 + ']' * 30_000 + '}'  # under the size cap
    response = _post(client, "/train", deep)
    assert response.status_code == 422 and "deeper" in response.json()["message"], response.text
    response = _post(client, "/train", '{"a": ' * 40 + '1' + '}' * 40)
    assert response.status_code == 422 and "deeper" in response.json()["message"]
    big = '{"dataset_id": "' + "x" * (65 * 1024) + '"}'
    response = _post(client, "/train", big)
    assert response.status_code == 413 and "STYLEINJECT_MAX_JSON_BYTES" in response.json()["message"]

    def chunks():  # no Content-Length: the cap holds while the body arrives
        for _ in range(100):
            yield b"x" * 4096

    response = client.post("/generate", content=chunks(), headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 413
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
        response = _post(client, "/train", '{"dataset_id": "x"}', content_type)
        assert response.status_code == 415 and "application/json" in response.json()["message"], content_type
    response = client.post("/train", files={"file": ("a.txt", b"x")}, headers=AUTH)
    assert response.status_code == 415
    response = _post(client, "/generate", '{"prompt": "a\\u0000b"}')
    assert response.status_code == 422 and "NUL" in response.json()["message"]
    assert client.get("/jobs/a%00b", headers=AUTH).status_code == 422
    assert client.get("/jobs?kind=%00", headers=AUTH).status_code == 422
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.txt", "x")
    response = client.post("/datasets", files={"file": ("a\x00b.zip", buffer.getvalue())}, headers=AUTH)
    assert response.status_code in (201, 422) and response.json()["message" if response.status_code == 422 else "id"]
    # ordinary requests still work through the guard
    response = _post(client, "/generate", '{"prompt": "x", "adapter_id": "nope"}')
    assert response.status_code == 404
    assert client.post("/generate", json={**TINY_GENERATE, "steps": 1}, headers=AUTH).status_code == 504


def test_a_non_finite_number_in_a_response_renders_as_null():
    """The default response class: a NaN that reached a row (SQLite stores one) is null, not a 500."""
    from api.guards import SafeJSONResponse

    response = SafeJSONResponse({"progress": {"loss": float("nan"), "lr": [float("inf"), 1.0]}})
    assert response.body == b'{"progress":{"loss":null,"lr":[null,1.0]}}'


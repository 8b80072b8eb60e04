"""Logs operators can keep (api/core/logs.py, worker/logs.py): STYLEINJECT_LOG_FORMAT=json gives one
JSON object per line, a request id travels from the API into the worker's lines, and no payload
(generated images) or progress bar reaches the worker's log."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import httpx
from fastapi.testclient import TestClient

from api.core.logs import (HEADER, JsonFormatter, PayloadFilter, RequestIdFilter, accept_request_id,
                           request_context, task_request_id, _add_request_id)
from api.core.settings import Settings
from api.main import create_app
from tests.service.conftest import REPO, TINY_GENERATE, free_port, service_env

PNG_BASE64 = "iVBORw0KGgo"  # how every base64-encoded PNG starts
PROGRESS_MARKS = ("it/s]", "s/it]", "%|", "Loading pipeline components", "Fetching")


def _record(msg, args, name="celery.app.trace", **extra) -> logging.LogRecord:
    record = logging.LogRecord(name, logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_level_logger_message_and_request_id():
    formatter, ids = JsonFormatter(), RequestIdFilter()
    with request_context("req-1"):
        record = _record("hello %s", ("world",), name="api.main")
        ids.filter(record)
    line = json.loads(formatter.format(record))
    assert {k: line[k] for k in ("level", "logger", "message", "request_id")} == \
        {"level": "INFO", "logger": "api.main", "message": "hello world", "request_id": "req-1"}
    outside = _record("x", None)
    ids.filter(outside)
    assert json.loads(formatter.format(outside))["request_id"] == "-"


def test_celery_success_line_drops_the_return_value():
    """Celery logs `Task x[id] succeeded in 1.2s: <return value>` at INFO (and the value again in
    `extra={'data': ...}`); the filter keeps the line and drops the value."""
    from celery.app.trace import LOG_SUCCESS

    context = {"id": "t1", "name": "worker.tasks.generate", "return_value": f"{{'images': ['{PNG_BASE64}AAAA']}}",
               "runtime": 1.5, "args": "['r1']", "kwargs": "{}"}
    record = _record(LOG_SUCCESS, (context,), data=context)
    assert PayloadFilter().filter(record)
    assert record.getMessage() == "Task worker.tasks.generate[t1] succeeded in 1.5s"
    assert "return_value" not in record.data and PNG_BASE64 not in json.dumps(record.data)


def test_request_id_is_accepted_or_made_and_returned(tmp_path):
    assert accept_request_id("abc-123") == "abc-123"
    for hostile in ("", "a b", "x" * 129, 'x"}\n{"level": "ERROR"', None):
        made = accept_request_id(hostile)
        assert made != hostile and len(made) == 32
    with TestClient(create_app(Settings(home=tmp_path))) as client:
        assert client.get("/healthz", headers={"X-Request-ID": "from-proxy-7"}).headers["x-request-id"] == "from-proxy-7"
        first, second = (client.get("/healthz").headers["x-request-id"] for _ in range(2))
        assert first != second and len(first) == 32
        # errors answered by the outer middleware carry it too
        assert client.get("/no-such-route").headers["x-request-id"]


def test_tasks_queued_during_a_request_carry_its_id():
    headers: dict = {}
    with request_context("req-9"):
        _add_request_id(headers=headers)
    assert headers == {HEADER: "req-9"}
    empty: dict = {}
    _add_request_id(headers=empty)  # outside a request: nothing added
    assert empty == {}

    class Request:  # Celery makes every message header an attribute of task.request
        styleinject_request_id = "req-9"

    class Task:
        request = Request()

    assert task_request_id(Task()) == "req-9"
    Request.styleinject_request_id = "bad id\n"
    assert task_request_id(Task()) is None


def test_serve_json_logs_generate_without_payload_or_progress_bars(tmp_path):
    """`styleinject serve` with STYLEINJECT_LOG_FORMAT=json: everything it and its worker children log
    (stderr; stdout keeps the human banner) is one JSON object per line; a generate request's id
    shows in the worker's lines for its task; no image payload and no progress bar in the log."""
    home, port = tmp_path / "home", free_port()
    env = service_env(log_format="json", bootstrap_key="admin-key-for-logs")
    out, err = open(tmp_path / "stdout.log", "wb"), open(tmp_path / "stderr.log", "wb")  # noqa: SIM115
    command = [sys.executable, "-m", "api.cli", "serve", "--home", str(home), "--port", str(port)]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "stderr.log").read_text()[-4000:]
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        headers = {"Authorization": "Bearer admin-key-for-logs", "X-Request-ID": "req-logs-1"}
        response = httpx.post(f"{base}/generate", json=TINY_GENERATE, headers=headers, timeout=180)
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == "req-logs-1"
        assert response.json()["images"][0].startswith(PNG_BASE64)
        time.sleep(1.0)  # the worker logs the task's end after the API has its answer
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()
        err.close()

    text = (tmp_path / "stderr.log").read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
    for line in lines:
        assert {"time", "level", "logger", "message", "request_id"} <= line.keys(), line
    ours = [line for line in lines if line["request_id"] == "req-logs-1"]
    loggers = {line["logger"] for line in ours}
    assert "uvicorn.access" in loggers, ours  # the API's access line
    assert any(name.startswith(("celery", "worker")) for name in loggers), ours  # the worker's lines
    assert any("succeeded" in line["message"] for line in ours if line["logger"] == "celery.app.trace"), ours
    assert PNG_BASE64 not in text
    assert not [line for line in lines if any(mark in line["message"] for mark in PROGRESS_MARKS)]
    stdout = (tmp_path / "stdout.log").read_text()
    assert "StyleInject embedded service" in stdout and "[queues]" not in stdout  # no Celery banner (--quiet)

"""Job webhooks against a real receiver: an http.server on 127.0.0.1 (so the module's deployment sets
STYLEINJECT_WEBHOOK_ALLOW_PRIVATE), a real Celery worker process on Redis delivering, the API in
process (TestClient) and the worker's side of the job state machine (JobLease, record_event) driven
here, so each event is produced by the code the worker runs. Checks signatures, the event filter,
progress throttling, retries with backoff, that a slow receiver holds up nothing, the SSRF refusals,
and HTTPS to the checked address with the certificate checked against the host name.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from api.core.db.models import Job, WebhookDelivery
from api.core.db.session import session_scope
from api.core.jobs import record_event
from api.core.settings import Settings
from tests.service.conftest import Proc, dataset_zip, free_port, service_env, upload_dataset

KEY = "boot-key-for-webhook-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}
SLOW_S = 5.0  # a slow receiver's answer time, past the deployment's webhook timeout (1 s)


def verify(secret: str, header: str, body: bytes, tolerance_s: float = 300) -> bool:
    """The receiver's check, as docs/service.md shows it."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    timestamp = int(fields["t"])
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return abs(time.time() - timestamp) <= tolerance_s and hmac.compare_digest(expected, fields["v1"])


class Receiver:
    """Records every POST (path, headers, body, arrival time); answers the codes queued for a path
    first (then 200), after the delay set for the path."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes, float]] = []
        self.codes: dict[str, list[int]] = {}
        self.delays: dict[str, float] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((self.path, dict(self.headers), body, time.monotonic()))
                time.sleep(receiver.delays.get(self.path, 0))
                queued = receiver.codes.get(self.path)
                try:
                    self.send_response(queued.pop(0) if queued else 200)
                    self.end_headers()
                except OSError:  # the sender gave up waiting (timeout)
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def at(self, path: str) -> list[tuple[dict[str, str], bytes, float]]:
        return [(h, b, t) for p, h, b, t in self.requests if p == path]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, redis_url):
    """(settings, API client, receiver): SQLite + Redis, a generate-queue worker delivering."""
    root = tmp_path_factory.mktemp("webhooks")
    prefix = f"si-test-{uuid.uuid4().hex[:8]}:"
    values = {"home": root / "home", "broker_url": redis_url, "broker_key_prefix": prefix,
              "bootstrap_key": KEY, "webhook_allow_private": True, "webhook_timeout_s": 1,
              "webhook_max_attempts": 3, "webhook_backoff_s": 0.3, "webhook_progress_interval_s": 60}
    settings = Settings(**values)
    settings.home.mkdir(parents=True)
    from api.core.db.migrate import upgrade
    from api.main import create_app

    upgrade(settings.database_url)
    receiver = Receiver()
    worker = Proc("worker", [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker",
                             "--pool", "threads", "--concurrency", "4", "--queues", "generate",
                             "--hostname", f"webhooks-{free_port()}@%h", "--loglevel", "INFO"],
                  service_env(**{k: str(v) for k, v in values.items()}), root)
    try:
        with TestClient(create_app(settings), headers=AUTH) as client:
            yield settings, client, receiver, worker
    finally:
        worker.stop()
        receiver.server.shutdown()
        import redis

        connection = redis.Redis.from_url(redis_url)
        for key in connection.scan_iter(match=f"{prefix}*"):
            connection.delete(key)


@pytest.fixture(scope="module")
def dataset_id(deployment, tmp_path_factory):
    _, client, _, _ = deployment
    response = upload_dataset(client, dataset_zip(tmp_path_factory.mktemp("data") / "d.zip"))
    assert response.status_code == 201, response.text
    return response.json()["id"]


def create_job(client, dataset_id: str, url: str, events: list[str] | None = None) -> str:
    body = {"kind": "finetune", "dataset_id": dataset_id, "steps": 4, "webhook_url": url}
    if events is not None:
        body["webhook_events"] = events
    response = client.post("/train", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["webhook_url"] == url and "webhook_url" not in job["params"]
    return job["id"]


def worker_side(settings: Settings, job_id: str):
    """The worker's lease on the job, claimed (queued -> running: the start event)."""
    from worker.lease import JobLease

    lease = JobLease(settings, job_id, "test-worker")
    assert lease.claim().status == "claimed"
    return lease


def deliveries(client, job_id: str, count: int, worker: Proc, timeout: float = 60) -> list[dict]:
    """The job's deliveries once ``count`` exist and none is pending (oldest first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = client.get("/webhooks/deliveries", params={"job_id": job_id}).json()
        if len(rows) >= count and all(r["status"] != "pending" for r in rows):
            return sorted(rows, key=lambda r: r["created_at"])
        time.sleep(0.2)
    raise AssertionError(f"deliveries of {job_id} not done in {timeout} s: {rows}\n{worker.log_tail()}")


def test_signed_events_arrive_for_the_subscribed_kinds_only(deployment, dataset_id):
    settings, client, receiver, worker = deployment
    secret = client.get("/webhooks/secret").json()["secret"]
    assert client.get("/webhooks/secret").json()["secret"] == secret  # stable until rotated

    # job A: start, checkpoint, completed (no progress although the worker reports it)
    job_a = create_job(client, dataset_id, receiver.url("/a"), ["completed", "start", "checkpoint"])
    assert client.get(f"/jobs/{job_a}").json()["webhook_events"] == ["start", "checkpoint", "completed"]
    lease = worker_side(settings, job_a)
    lease.report({"step": 1, "total": 4, "loss": 0.5}, force=True)
    with session_scope(settings.database_url) as session:
        record_event(session, job_a, "checkpoint", {"step": 2, "name": "checkpoint-2"})
    assert lease.finish("succeeded", result={"steps_done": 4, "adapter_id": "adapter-x"})
    rows = deliveries(client, job_a, 3, worker)
    assert [r["event"] for r in rows] == ["start", "checkpoint", "completed"]
    assert all(r["status"] == "delivered" and r["attempts"] == 1 and r["response_code"] == 200 for r in rows)

    received = receiver.at("/a")
    assert len(received) == 3
    bodies = {}
    for headers, body, _ in received:
        assert verify(secret, headers["X-StyleInject-Signature"], body)
        assert not verify(secret, headers["X-StyleInject-Signature"], body + b" ")  # altered body
        assert not verify("whsec_other", headers["X-StyleInject-Signature"], body)
        event = json.loads(body)
        assert headers["X-StyleInject-Event"] == event["event"]
        assert headers["X-StyleInject-Delivery"] == event["id"] and headers["Content-Type"] == "application/json"
        bodies[event["event"]] = event
    assert {r["id"] for r in rows} == {b["id"] for b in bodies.values()}
    assert bodies["start"]["job"] == {**bodies["start"]["job"], "id": job_a, "kind": "finetune", "status": "running"}
    assert bodies["checkpoint"]["data"] == {"step": 2, "name": "checkpoint-2"}
    completed = bodies["completed"]["job"]
    assert completed["status"] == "succeeded" and completed["result"]["adapter_id"] == "adapter-x"

    # job B: every event (the default); progress at most once per interval (60 s here), and
    # "completed" carries a cancellation's status
    job_b = create_job(client, dataset_id, receiver.url("/b"))
    lease = worker_side(settings, job_b)
    for step in (1, 2, 3):
        lease.report({"step": step, "total": 4, "loss": 1.0 / step}, force=True)
    assert lease.finish("cancelled")
    rows = deliveries(client, job_b, 3, worker)
    assert [r["event"] for r in rows] == ["start", "progress", "completed"]
    events = {json.loads(b)["event"]: json.loads(b) for _, b, _ in receiver.at("/b")}
    assert events["progress"]["data"]["step"] == 1
    assert events["completed"]["job"]["status"] == "cancelled"

    # a rotated secret signs what is sent from then on
    new_secret = client.post("/webhooks/secret/rotate").json()["secret"]
    assert new_secret != secret and client.get("/webhooks/secret").json()["secret"] == new_secret
    job_c = create_job(client, dataset_id, receiver.url("/c"), ["start"])
    worker_side(settings, job_c)
    deliveries(client, job_c, 1, worker)
    (headers, body, _), = receiver.at("/c")
    assert verify(new_secret, headers["X-StyleInject-Signature"], body)
    assert not verify(secret, headers["X-StyleInject-Signature"], body)


def test_failed_attempts_are_retried_with_backoff_then_given_up(deployment, dataset_id):
    settings, client, receiver, worker = deployment
    receiver.codes["/flaky"] = [500, 500]
    job = create_job(client, dataset_id, receiver.url("/flaky"), ["start"])
    worker_side(settings, job)
    (row,) = deliveries(client, job, 1, worker)
    assert (row["status"], row["attempts"], row["response_code"], row["error"]) == ("delivered", 3, 200, None)
    received = receiver.at("/flaky")
    assert len(received) == 3
    assert len({json.loads(body)["id"] for _, body, _ in received}) == 1  # one event id on every attempt
    secret = client.get("/webhooks/secret").json()["secret"]
    assert all(verify(secret, headers["X-StyleInject-Signature"], body) for headers, body, _ in received)
    first, second, third = (t for _, _, t in received)
    # backoff 0.3 s then 0.6 s (webhook_backoff_s x 2^(n-1))
    assert second - first >= 0.3 and third - second >= 0.6, (first, second, third)

    # a receiver that is down: given up after webhook_max_attempts (3), the job unaffected
    down = f"http://127.0.0.1:{free_port()}/gone"
    job = create_job(client, dataset_id, down, ["start"])
    worker_side(settings, job)
    (row,) = deliveries(client, job, 1, worker)
    assert (row["status"], row["attempts"], row["response_code"]) == ("failed", 3, None)
    assert "ConnectError" in row["error"]
    assert client.get(f"/jobs/{job}").json()["status"] == "running"


def test_a_slow_receiver_holds_up_nothing(deployment, dataset_id):
    settings, client, receiver, worker = deployment
    receiver.delays["/slow"] = SLOW_S
    job = create_job(client, dataset_id, receiver.url("/slow"))
    started = time.monotonic()
    lease = worker_side(settings, job)
    lease.report({"step": 1, "total": 4}, force=True)
    assert lease.finish("succeeded")
    took = time.monotonic() - started
    assert took < SLOW_S / 2, f"the job's state changes took {took:.2f} s: sent inline?"
    rows = deliveries(client, job, 3, worker, timeout=90)
    assert [r["event"] for r in rows] == ["start", "progress", "completed"]
    # each attempt waited webhook_timeout_s (1 s), not the receiver's 5 s
    assert all(r["status"] == "failed" and r["attempts"] == 3 and "Timeout" in r["error"] for r in rows), rows


def test_send_time_check_refuses_a_private_address(deployment, dataset_id):
    """A host that resolved to a public address when the job was created and to a private one at
    send time (DNS rebinding) is refused when sending: the delivery fails at its first attempt."""
    settings, client, receiver, _ = deployment
    from api.core.webhooks import attempt

    job = create_job(client, dataset_id, receiver.url("/rebound"), ["start"])
    strict = settings.model_copy(update={"webhook_allow_private": False})
    with session_scope(settings.database_url) as session:
        session.add(WebhookDelivery(id="rebound", job_id=job, event="start", url=receiver.url("/rebound"),
                                    payload={"id": "rebound"}))
    assert attempt(strict, "rebound") is None
    with session_scope(settings.database_url) as session:
        row = session.get(WebhookDelivery, "rebound")
        assert (row.status, row.attempts, row.response_code) == ("failed", 1, None)
        assert "127.0.0.1" in row.error and "STYLEINJECT_WEBHOOK_ALLOW_PRIVATE" in row.error
        assert session.get(Job, job).status == "queued"
    assert receiver.at("/rebound") == []


def test_private_addresses_are_refused_without_the_admin_setting(tmp_path):
    from api.core.db.migrate import upgrade
    from api.main import create_app

    settings = Settings(home=tmp_path / "home", bootstrap_key=KEY)
    settings.home.mkdir(parents=True)
    upgrade(settings.database_url)
    with TestClient(create_app(settings), headers=AUTH) as client:
        for url in ["http://127.0.0.1:8080/hook", "http://10.0.0.5/hook", "http://169.254.169.254/latest/meta-data/",
                    "http://[::1]/hook", "http://[::ffff:127.0.0.1]/hook", "http://localhost:9000/hook",
                    "http://0.0.0.0/"]:
            response = client.post("/train", json={"dataset_id": "x", "webhook_url": url})
            assert response.status_code == 422, (url, response.text)
            message = response.json()["message"]
            assert message.startswith("webhook_url host"), message
            assert "STYLEINJECT_WEBHOOK_ALLOW_PRIVATE=1" in message
        for body, expected in [
            ({"webhook_url": "ftp://192.0.2.1/hook"}, "http:// or https://"),
            ({"webhook_url": "http://user:pw@192.0.2.1/"}, "user:password@"),
            ({"webhook_events": ["start"]}, "webhook_events needs webhook_url"),
            ({"webhook_url": "http://192.0.2.1/", "webhook_events": ["finished"]}, "webhook_events"),
            ({"webhook_url": "http://192.0.2.1/", "webhook_events": []}, "webhook_events"),
        ]:
            response = client.post("/train", json={"dataset_id": "x", **body})
            assert response.status_code == 422 and expected in response.json()["message"], (body, response.text)


def _self_signed(folder, name: str) -> tuple[str, str]:
    """A certificate for DNS name ``name`` (its own issuer) and its key, as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_https_goes_to_the_checked_address_and_verifies_the_host_name(tmp_path, monkeypatch):
    """The POST connects to the resolved address but TLS still checks the certificate against the
    URL's host name (sent as SNI): a certificate for another name is refused. Only the trust store
    is swapped (to trust the test's self-signed certificates)."""
    pytest.importorskip("cryptography")
    import ssl

    import httpx

    from api.core.webhooks import post

    settings = Settings(home=tmp_path / "home", webhook_allow_private=True, webhook_timeout_s=5)
    hosts = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            hosts.append(self.headers["Host"])
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    init = httpx.Client.__init__
    outcomes = {}
    for name in ("localhost", "elsewhere.example"):
        cert, key = _self_signed(tmp_path, name)
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        trust = ssl.create_default_context(cafile=cert)
        monkeypatch.setattr(httpx.Client, "__init__", lambda self, *a, **k: init(self, *a, **{**k, "verify": trust}))
        url = f"https://localhost:{server.server_address[1]}/hook"
        try:
            outcomes[name] = post(settings, url, b"{}", "whsec_x", event="start", delivery_id="d")
        except httpx.ConnectError as exc:
            outcomes[name] = str(exc)
        finally:
            server.shutdown()
    assert outcomes["localhost"] == 204 and len(hosts) == 1 and hosts[0].startswith("localhost:")
    assert "Hostname mismatch" in outcomes["elsewhere.example"], outcomes

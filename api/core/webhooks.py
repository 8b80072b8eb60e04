"""Job webhooks: which events to send, the signed POST, and the address check (SSRF).

A job created with ``webhook_url`` (and optionally ``webhook_events``, a subset of WEBHOOK_EVENTS)
gets a POST for each subscribed event:

    start       the job started running (queued -> running; a re-claim after a lost lease is not new)
    progress    a progress point, at most once per STYLEINJECT_WEBHOOK_PROGRESS_INTERVAL_S per job
    checkpoint  a checkpoint was written
    completed   the job finished: ``job.status`` in the body is succeeded, failed or cancelled

Nothing is sent inline. The job state machine's hooks (``api.core.jobs``: on_transition /
on_record, run after the commit in whichever process committed) write a ``webhook_deliveries`` row
and send TASK_WEBHOOK with its id; a worker's ``deliver_webhook`` task calls ``attempt()``, which
POSTs once and says when to retry (exponential backoff, at most STYLEINJECT_WEBHOOK_MAX_ATTEMPTS).
``install(settings, celery)`` registers a deployment: the API and the worker call it at start.

Signature (like Stripe's and Svix's): ``X-StyleInject-Signature: t=<unix time>,v1=<hex>`` where hex is
HMAC-SHA256 with the tenant's secret over ``f"{t}.{body}"``; receivers recompute it, compare in
constant time and reject old timestamps (replays). The body's ``id`` (also ``X-StyleInject-Delivery``)
is the same on every attempt, so receivers can drop duplicates (delivery is at least once).

SSRF: the URL must be http(s) and every address its host resolves to must be public
(``ipaddress``'s is_global, not multicast; IPv4 inside IPv6 is checked as IPv4), unless the admin
set STYLEINJECT_WEBHOOK_ALLOW_PRIVATE. It is checked when the job is created and again at each
attempt, and the POST goes to the address that was checked (no second DNS lookup: DNS rebinding),
with the host name as Host header and TLS server name; redirects are not followed and no proxy
from the environment is used.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import func, select, update
from sqlalchemy.engine import make_url

from api.core.celery import TASK_WEBHOOK, make_celery
from api.core.db.models import FINISHED, WEBHOOK_EVENTS, Job, Tenant, WebhookDelivery, new_id, utcnow
from api.core.db.session import session_scope
from api.core.jobs import Recorded, Transition, on_record, on_transition
from api.core.settings import Settings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-StyleInject-Signature"
EVENT_HEADER = "X-StyleInject-Event"
DELIVERY_HEADER = "X-StyleInject-Delivery"
USER_AGENT = "StyleInject-Webhooks/1"
MAX_URL_LENGTH = 2048
MAX_BACKOFF_S = 3600.0  # the longest wait between two attempts
_ERROR_CHARS = 500  # of a failed attempt's error kept on the row


class WebhookURLError(ValueError):
    """A webhook URL that may not be used (the message says why and what to do)."""


# -- the address check (SSRF) ------------------------------------------------------------------------

def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        # IPv4 carried inside IPv6 (mapped ::ffff:a.b.c.d, 6to4, Teredo) is judged as that IPv4
        embedded = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
        if any(v4 is not None and not _public(v4) for v4 in embedded):
            return False
    return address.is_global and not address.is_multicast


def check_url(url: str, *, allow_private: bool) -> tuple[str, list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """Check a webhook URL and resolve its host: (host, addresses to connect to, in resolver order).
    Raises WebhookURLError for a URL that is not http(s), has credentials or no host, does not
    resolve, or (without ``allow_private``) resolves to any address that is not public."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookURLError(f"is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookURLError(f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookURLError("must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise WebhookURLError("must not contain user:password@; receivers authenticate the request "
                              f"by its {SIGNATURE_HEADER} header")
    host = parts.hostname
    if not host:
        raise WebhookURLError("has no host")
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as exc:  # gaierror; a label too long for IDNA
        raise WebhookURLError(f"host {host[:100]!r} does not resolve ({exc})") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos))
    if not addresses:
        raise WebhookURLError(f"host {host[:100]!r} does not resolve")
    if not allow_private:
        refused = [str(a) for a in addresses if not _public(a)]
        if refused:
            raise WebhookURLError(
                f"host {host[:100]!r} resolves to {', '.join(refused)}: private, loopback, link-local, multicast or "
                "reserved addresses are refused (an admin may allow them with STYLEINJECT_WEBHOOK_ALLOW_PRIVATE=1)")
    return host, addresses


def check_events(events: Iterable[str] | None) -> list[str]:
    """The subscribed events in WEBHOOK_EVENTS order (None: all of them)."""
    chosen = set(WEBHOOK_EVENTS if events is None else events)
    unknown = chosen - set(WEBHOOK_EVENTS)
    if unknown:
        raise ValueError(f"unknown webhook events {sorted(unknown)}; choose from {', '.join(WEBHOOK_EVENTS)}")
    return [e for e in WEBHOOK_EVENTS if e in chosen]


# -- secrets and signatures ---------------------------------------------------------------------------

def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def tenant_secret(session, tenant: Tenant, *, rotate: bool = False) -> str:
    """The tenant's signing secret, created on first use (or replaced with ``rotate``); the caller
    commits. Deliveries are signed when they are sent, so after a rotation retries use the new one."""
    if rotate:
        tenant.webhook_secret = new_secret()
    elif not tenant.webhook_secret:
        # only if still unset: a first request and a first delivery racing agree on one secret
        session.execute(update(Tenant).where(Tenant.id == tenant.id, Tenant.webhook_secret.is_(None))
                        .values(webhook_secret=new_secret()).execution_options(synchronize_session=False))
        session.refresh(tenant, ["webhook_secret"])
    return tenant.webhook_secret


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value: ``t=<timestamp>,v1=<hex HMAC-SHA256 of "<timestamp>.<body>">``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


# -- enqueueing (the job state machine's hooks) ---------------------------------------------------------

class _Deployment:
    """What a hook needs to enqueue for jobs of one database: its settings and a Celery client."""

    def __init__(self, settings: Settings, celery: Any | None) -> None:
        self.settings = settings
        self._celery = celery
        self._lock = threading.Lock()

    @property
    def celery(self):
        with self._lock:
            if self._celery is None:
                self._celery = make_celery(self.settings)
            return self._celery


_DEPLOYMENTS: dict[str, _Deployment] = {}
# (database, job id) -> (url, events) or None: a job's webhook is fixed when it is created, so each
# process reads it once per job (a job without one costs no query after the first event)
_JOB_HOOKS: OrderedDict[tuple[str, str], tuple[str, list[str]] | None] = OrderedDict()
_JOB_HOOKS_MAX = 4096
_cache_lock = threading.Lock()


def _key(database_url: str) -> str:
    return make_url(database_url).render_as_string(hide_password=False)


def install(settings: Settings, celery: Any | None = None) -> None:
    """Send webhooks for the jobs of ``settings.database_url`` committed in this process (the API's
    create_app and the worker's app call this; the latest call for a database wins). ``celery``:
    the client to send with (default: one made from ``settings`` on first use)."""
    _DEPLOYMENTS[_key(settings.database_url)] = _Deployment(settings, celery)
    on_transition(_on_transition)
    on_record(_on_record)


def _on_transition(change: Transition) -> None:
    if change.to_status == "running" and change.from_status == "queued":
        _enqueue(change.database_url, change.job_id, "start", {"attempt": change.data.get("attempt")},
                 status="running")
    elif change.to_status in FINISHED:
        _enqueue(change.database_url, change.job_id, "completed", {"from": change.from_status},
                 status=change.to_status)


def _on_record(recorded: Recorded) -> None:
    if recorded.kind in ("progress", "checkpoint"):
        _enqueue(recorded.database_url, recorded.job_id, recorded.kind, recorded.data)


def _job_hook(database_url: str, job_id: str) -> tuple[str, list[str]] | None:
    key = (_key(database_url), job_id)
    with _cache_lock:
        if key in _JOB_HOOKS:
            _JOB_HOOKS.move_to_end(key)
            return _JOB_HOOKS[key]
    with session_scope(database_url) as session:
        row = session.execute(select(Job.webhook_url, Job.webhook_events).where(Job.id == job_id)).first()
    if row is None:
        return None  # not this database's job (not cached: nothing to remember)
    hook = (row.webhook_url, check_events(row.webhook_events)) if row.webhook_url else None
    with _cache_lock:
        _JOB_HOOKS[key] = hook
        while len(_JOB_HOOKS) > _JOB_HOOKS_MAX:
            _JOB_HOOKS.popitem(last=False)
    return hook


def _enqueue(database_url: str, job_id: str, event: str, data: dict[str, Any], status: str | None = None) -> None:
    deployment = _DEPLOYMENTS.get(_key(database_url))
    if deployment is None:
        return  # a process that did not install webhooks for this database (a CLI, a test)
    settings = deployment.settings
    database_url = settings.database_url  # as configured: the process's engine for it
    hook = _job_hook(database_url, job_id)
    if hook is None or event not in hook[1]:
        return
    delivery_id = new_id()
    with session_scope(database_url) as session:
        job = session.get(Job, job_id)
        if job is None:
            return  # deleted since the change
        now = utcnow()
        if event == "progress":
            last = session.scalar(select(func.max(WebhookDelivery.created_at))
                                  .where(WebhookDelivery.job_id == job_id, WebhookDelivery.event == "progress"))
            if last is not None and (now - last).total_seconds() < settings.webhook_progress_interval_s:
                return
        final = event == "completed"
        payload = {
            "id": delivery_id,
            "event": event,
            "created_at": now.isoformat(),
            "job": {"id": job.id, "kind": job.kind, "status": status or job.status,
                    "progress": job.progress, "error": job.error if final else None,
                    "result": job.result if final else None},
            "data": data,
        }
        session.add(WebhookDelivery(id=delivery_id, job_id=job_id, event=event, url=hook[0], payload=payload,
                                    created_at=now))
    try:
        # bounded: a broker that is down must not hold up the job whose change this is
        deployment.celery.send_task(TASK_WEBHOOK, args=[delivery_id], retry=True,
                                    retry_policy={"max_retries": 2, "interval_start": 0.2,
                                                  "interval_step": 0.5, "interval_max": 1})
    except Exception as exc:  # noqa: BLE001 - the row says why it was never sent
        log.warning("webhook %s for job %s not queued: %s", event, job_id, exc)
        with session_scope(database_url) as session:
            row = session.get(WebhookDelivery, delivery_id)
            row.status, row.error, row.finished_at = "failed", f"could not queue: {exc}"[:_ERROR_CHARS], utcnow()


# -- delivering (the worker's task) ----------------------------------------------------------------------

def backoff_s(settings: Settings, attempts: int) -> float:
    """The wait before the next attempt, after ``attempts`` attempts (1, 2, ...)."""
    return min(settings.webhook_backoff_s * 2 ** (attempts - 1), MAX_BACKOFF_S)


def attempt(settings: Settings, delivery_id: str) -> float | None:
    """Make one attempt to deliver ``delivery_id``. Returns the seconds to wait before the next
    attempt, or None when there is nothing more to do (delivered, given up, refused, or not
    pending: a redelivered task is a no-op)."""
    with session_scope(settings.database_url) as session:
        row = session.get(WebhookDelivery, delivery_id)
        if row is None or row.status != "pending":
            return None
        tenant = session.get(Tenant, session.scalar(select(Job.tenant_id).where(Job.id == row.job_id)))
        secret = tenant_secret(session, tenant)
        row.attempts += 1  # counted before the POST: a worker that dies mid-attempt used one up
        attempts, url, event, job_id = row.attempts, row.url, row.event, row.job_id
        body = json.dumps(row.payload, separators=(",", ":"), sort_keys=True).encode()
    code, error, final = None, None, False
    try:
        code = post(settings, url, body, secret, event=event, delivery_id=delivery_id)
        if not 200 <= code < 300:
            error = f"the receiver answered HTTP {code}"
    except WebhookURLError as exc:
        error, final = f"webhook_url {exc}", True  # the address is refused now: retrying will not help
    except Exception as exc:  # noqa: BLE001 - any failure to reach the receiver is retried
        error = f"{type(exc).__name__}: {exc}"
    delivered = error is None
    give_up = final or (not delivered and attempts >= settings.webhook_max_attempts)
    with session_scope(settings.database_url) as session:
        row = session.get(WebhookDelivery, delivery_id)
        row.response_code, row.error = code, error[:_ERROR_CHARS] if error else None
        if delivered or give_up:
            row.status, row.finished_at = ("delivered" if delivered else "failed"), utcnow()
    if delivered or give_up:
        if give_up:
            log.warning("webhook %s (%s) for job %s failed after %d attempts: %s", delivery_id, event,
                        job_id, attempts, error)
        return None
    return backoff_s(settings, attempts)


def abandon(settings: Settings, delivery_id: str, error: str) -> None:
    """Mark a pending delivery failed (its next attempt could not be queued)."""
    with session_scope(settings.database_url) as session:
        row = session.get(WebhookDelivery, delivery_id)
        if row is not None and row.status == "pending":
            row.status, row.error, row.finished_at = "failed", error[:_ERROR_CHARS], utcnow()


def post(settings: Settings, url: str, body: bytes, secret: str, *, event: str, delivery_id: str) -> int:
    """POST ``body`` to ``url``, signed, to an address the SSRF check approved (the next one when
    one cannot be reached); the HTTP status. Raises WebhookURLError (refused address) or an httpx
    error (unreachable, timeout)."""
    import httpx

    host, addresses = check_url(url, allow_private=settings.webhook_allow_private)
    parts = urlsplit(url)
    headers = {
        "Host": parts.netloc,  # no user info: check_url refuses it
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_HEADER: event,
        DELIVERY_HEADER: delivery_id,
        SIGNATURE_HEADER: signature(secret, int(time.time()), body),
    }
    # TLS: the certificate is checked against the host name (sent as SNI), not the address
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    with httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False) as client:

        def send(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
            netloc = f"[{address}]" if address.version == 6 else str(address)
            if parts.port:
                netloc += f":{parts.port}"
            pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
            with client.stream("POST", pinned, content=body, headers=headers, extensions=extensions) as response:
                return response.status_code  # the body is not read: a receiver cannot make us download

        for address in addresses[:-1]:
            try:
                return send(address)
            except httpx.ConnectError:
                continue
        return send(addresses[-1])

"""A job's DB lease, throttled progress writes and the cancel flag (no torch).

Celery delivers at least once (``acks_late``; a dead worker's message is re-queued), so the job row
decides who runs a job: a worker *claims* it with one conditional UPDATE that only succeeds when the
job is queued, or running under an expired lease. While it runs, a heartbeat thread and every
progress write push ``lease_expires_at`` forward. A redelivered task therefore:

* finds the job finished -> does nothing;
* finds a live lease held by another worker -> retries after the lease would expire;
* finds an expired lease (the holder died) -> claims it and resumes from the latest checkpoint.

A worker that loses its lease (it stalled past the TTL and another took over) stops at its next
step and writes nothing more.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update

from api.core.db.models import FINISHED, Job, utcnow
from api.core.db.session import session_scope
from api.core.jobs import record_progress, transition
from api.core.settings import Settings
from worker.failures import DB_UNREACHABLE, retry_db

log = logging.getLogger("worker.lease")


@dataclass
class Claim:
    """The outcome of trying to claim a job."""

    status: str  # "claimed" | "done" (nothing to do) | "busy" (another worker holds a live lease)
    retry_in_s: float = 0.0
    attempts: int = 0


class JobLease:
    def __init__(self, settings: Settings, job_id: str, worker_id: str) -> None:
        self.settings = settings
        self.job_id = job_id
        self.worker_id = worker_id
        self.lost = False
        self._last_progress = 0.0
        self._last_cancel_check = 0.0
        self._cancel = False
        self._lock = threading.Lock()

    def _session(self):
        return session_scope(self.settings.database_url)

    def _expiry(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.settings.lease_ttl_s)

    def _mine(self):
        return and_(Job.id == self.job_id, Job.worker_id == self.worker_id, Job.status == "running")

    # -- claim -----------------------------------------------------------------------------------

    def claim(self) -> Claim:
        now = utcnow()
        with self._session() as session:
            job = session.get(Job, self.job_id)
            if job is None:
                log.warning("job %s does not exist (deleted?); nothing to do", self.job_id)
                return Claim("done")
            if job.status in FINISHED:
                log.info("job %s is already %s; redelivered task is a no-op", job.id, job.status)
                return Claim("done")
            expired = job.lease_expires_at is None or job.lease_expires_at < now
            if job.status == "running" and not expired and job.worker_id != self.worker_id:
                return Claim("busy", retry_in_s=(job.lease_expires_at - now).total_seconds() + 1)
            if job.cancel_requested:
                transition(session, self.job_id, "cancelled", expect=(job.status,),
                           data={"reason": "cancel requested before the worker started it"})
                return Claim("done")
            if job.status == "running" and job.attempts >= self.settings.max_attempts:
                error = (f"the worker running this job was lost {job.attempts} times "
                         "(STYLEINJECT_MAX_ATTEMPTS); see the worker logs")
                transition(session, self.job_id, "failed", expect=("running",), values={"error": error},
                           data={"error": error})
                return Claim("done")
            claimable = or_(
                Job.status == "queued",
                and_(Job.status == "running",
                     or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now,
                         Job.worker_id == self.worker_id)),
            )
            claimed = transition(
                session, self.job_id, "running", expect=("queued", "running"),
                where=and_(Job.cancel_requested.is_(False), claimable),
                values={"worker_id": self.worker_id, "lease_expires_at": self._expiry(now),
                        "attempts": Job.attempts + 1, "error": None},
                data={"worker_id": self.worker_id, "attempt": job.attempts + 1},
            )
            if claimed is None:  # lost a race with another worker or a cancel
                return Claim("busy", retry_in_s=self.settings.lease_ttl_s)
            attempts = session.scalar(select(Job.attempts).where(Job.id == self.job_id))
        log.info("job %s claimed by %s (attempt %d)", self.job_id, self.worker_id, attempts)
        return Claim("claimed", attempts=attempts)

    # -- while running ---------------------------------------------------------------------------

    def renew(self) -> bool:
        """Extend the lease; False if it is no longer ours. (Status changes go through
        ``api.core.jobs.transition``, progress through ``report``.)"""
        now = utcnow()
        with self._lock, self._session() as session:
            result = session.execute(
                update(Job).where(self._mine())
                .values(lease_expires_at=self._expiry(now), updated_at=now)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:
                if not self.lost:
                    log.warning("job %s: lease lost by %s; stopping", self.job_id, self.worker_id)
                self.lost = True
                return False
        return True

    @contextmanager
    def heartbeat(self) -> Iterator[None]:
        """Renew the lease every TTL/3 in a thread (model loading, checkpointing report nothing)."""
        stop = threading.Event()
        interval = max(self.settings.lease_ttl_s / 3, 0.5)

        def beat() -> None:
            while not stop.wait(interval):
                try:
                    if not self.renew():
                        return
                except Exception:  # noqa: BLE001 - a DB hiccup must not kill the job
                    log.exception("job %s: lease renewal failed", self.job_id)

        thread = threading.Thread(target=beat, name=f"lease-{self.job_id[:8]}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=10)

    def report(self, progress: dict[str, Any], force: bool = False) -> None:
        """Write progress to the row, at most once per STYLEINJECT_PROGRESS_INTERVAL_S."""
        now = time.monotonic()
        last = progress.get("step") is not None and progress.get("step") == progress.get("total")
        if not (force or last or now - self._last_progress >= self.settings.progress_interval_s):
            return
        self._last_progress = now
        try:
            with self._lock, self._session() as session:
                mine = record_progress(session, self.job_id, progress, where=self._mine(),
                                       values={"lease_expires_at": self._expiry(utcnow())})
        except DB_UNREACHABLE as exc:  # a database outage skips progress points, the job goes on
            log.warning("job %s: progress not written (database unreachable: %s)", self.job_id,
                        str(exc).splitlines()[0][:200])
            return
        if not mine:
            if not self.lost:
                log.warning("job %s: lease lost by %s; stopping", self.job_id, self.worker_id)
            self.lost = True

    def should_cancel(self) -> bool:
        """The cancel flag (polled at most every 0.25 s); also True once the lease is lost."""
        if self._cancel or self.lost:
            return True
        now = time.monotonic()
        if now - self._last_cancel_check < 0.25:
            return False
        self._last_cancel_check = now
        try:
            with self._session() as session:
                row = session.execute(
                    select(Job.cancel_requested, Job.worker_id).where(Job.id == self.job_id)
                ).one_or_none()
        except DB_UNREACHABLE:  # asked again at the next poll; the job goes on meanwhile
            return self._cancel
        if row is None or row.worker_id != self.worker_id:
            self.lost = True
        elif row.cancel_requested:
            self._cancel = True
        return self._cancel or self.lost

    def finish(self, status: str, error: str | None = None, result: dict[str, Any] | None = None) -> bool:
        """Set the final status (only while the lease is ours); retried through a short database
        outage (up to the lease TTL, at least 30 s), so a finished job does not stay running."""

        def write() -> bool:
            with self._lock, self._session() as session:
                done = transition(session, self.job_id, status, expect=("running",),
                                  where=Job.worker_id == self.worker_id,
                                  values={"error": error, "result": result},
                                  data={"error": error} if error else None)
                return done is not None

        return retry_db(write, timeout_s=max(30.0, self.settings.lease_ttl_s), what=f"job {self.job_id}: {status}")

"""The job state machine: every status change of a Job, its history, and hooks.

    queued  -> running | cancelled | failed        (claimed; cancelled before start; not queued)
    running -> running                             (re-claimed after the holder's lease expired)
    running -> succeeded | failed | cancelled
    succeeded, failed, cancelled: final

``transition()`` is the only code that writes ``jobs.status``. It is a compare-and-set (one
conditional UPDATE on the status it read, plus the caller's extra conditions, e.g. "the lease is
mine"), so the API and any number of workers may race: exactly one wins, the others get None.
It stamps the times (started_at on the first start, finished_at and a cleared lease on a final
status, updated_at always), appends a ``status`` row to ``job_events`` and, once the session
commits, calls every hook registered with ``on_transition`` (webhooks and metrics hang here).

History (``job_events``): ``record_progress`` keeps the latest point on ``jobs.progress`` (what
GET /jobs/{id} shows) and appends it to the history, bounded per job:
  * a point is kept when its step is at least the current spacing (the step gap between the last
    two kept points) past the last kept one, and always for the final step (step == total);
  * when a job has more than MAX_PROGRESS_EVENTS points, every second one is deleted (the first
    and the newest stay), which doubles the spacing. So a job of any length keeps at most
    MAX_PROGRESS_EVENTS roughly evenly spaced points, from its first step to its newest.
``record_event`` adds checkpoint and score events (never thinned). Hooks registered with
``on_record`` see each progress point written (thinned or not) and each checkpoint or score event,
once committed, as a ``Recorded`` (webhooks hang here too).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, delete, event, func, select, update
from sqlalchemy.orm import Session

from api.core.db.models import FINISHED, JOB_EVENT_KINDS, JOB_STATUSES, Job, JobEvent, utcnow

log = logging.getLogger(__name__)

ALLOWED: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled", "failed"}),
    "running": frozenset({"running", "succeeded", "failed", "cancelled"}),
    **{status: frozenset() for status in FINISHED},
}
assert set(ALLOWED) == set(JOB_STATUSES)

MAX_PROGRESS_EVENTS = 200


class IllegalTransition(ValueError):
    """A status change the state machine does not allow (a bug in the caller, not a race)."""


@dataclass(frozen=True)
class Transition:
    """What a hook receives, after the change is committed."""

    job_id: str
    from_status: str | None  # None: the job was just created (queued)
    to_status: str
    at: datetime
    data: dict[str, Any] = field(default_factory=dict)
    # the committing session's database (with its password: never shown), so a hook can tell which
    # deployment the job belongs to in a process that serves several (tests)
    database_url: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True)
class Recorded:
    """What an ``on_record`` hook receives, after the commit: a progress point or a checkpoint or
    score event (``kind``) with its data."""

    job_id: str
    kind: str
    at: datetime
    data: dict[str, Any] = field(default_factory=dict)
    database_url: str = field(default="", compare=False, repr=False)


TransitionHook = Callable[[Transition], None]
RecordHook = Callable[[Recorded], None]
_HOOKS: list[TransitionHook] = []
_RECORD_HOOKS: list[RecordHook] = []
_PENDING = "styleinject_job_transitions"


def on_transition(callback: TransitionHook) -> TransitionHook:
    """Register ``callback(transition)``; called after the commit of each status change, in the
    committing process, in registration order. A hook that raises is logged and skipped. Usable as
    a decorator; returns the callback (pass it to ``remove_hook`` to unregister)."""
    if callback not in _HOOKS:
        _HOOKS.append(callback)
    return callback


def on_record(callback: RecordHook) -> RecordHook:
    """Register ``callback(recorded)``: like ``on_transition``, for progress points and checkpoint
    and score events."""
    if callback not in _RECORD_HOOKS:
        _RECORD_HOOKS.append(callback)
    return callback


def remove_hook(callback: TransitionHook | RecordHook) -> None:
    for hooks in (_HOOKS, _RECORD_HOOKS):
        if callback in hooks:
            hooks.remove(callback)


@event.listens_for(Session, "after_commit")
def _run_hooks(session: Session) -> None:
    changes = session.info.pop(_PENDING, ())
    if not changes:
        return
    url = session.get_bind().engine.url.render_as_string(hide_password=False)  # engine- or connection-bound
    for change in changes:
        change = dataclasses.replace(change, database_url=url)
        for hook in list(_HOOKS if isinstance(change, Transition) else _RECORD_HOOKS):
            try:
                hook(change)
            except Exception:  # noqa: BLE001 - a hook must never undo or block a status change
                log.exception("job hook %r failed for %s", hook, change)


@event.listens_for(Session, "after_rollback")
def _drop_pending(session: Session) -> None:
    session.info.pop(_PENDING, None)


def _expire(session: Session, job_id: str) -> None:
    """The UPDATEs here bypass the ORM; a Job the session holds must re-read its row."""
    job = session.identity_map.get(session.identity_key(Job, job_id))
    if job is not None:
        session.expire(job)


def transition(
    session: Session,
    job_id: str,
    to: str,
    *,
    expect: Iterable[str] | None = None,
    where: ColumnElement[bool] | None = None,
    values: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
) -> Transition | None:
    """Move job ``job_id`` to status ``to``; the caller commits.

    expect: the statuses the caller expects the job in; any other status returns None (nothing
        written). Without it, every status that may legally go to ``to``.
    where: extra SQL conditions for the UPDATE (e.g. ``Job.worker_id == me``).
    values: other columns to write with the change (error, result, worker_id...).
    data: details for the history event (and hooks), e.g. {"error": ...}.
    Returns the Transition, or None when the job does not exist, is not in an expected status, is
    already finished, or another writer changed it first. Raises IllegalTransition for a change the
    table forbids from an unfinished status (e.g. queued -> succeeded).
    """
    if to not in ALLOWED:
        raise IllegalTransition(f"unknown job status {to!r}; one of {', '.join(JOB_STATUSES)}")
    current = session.scalar(select(Job.status).where(Job.id == job_id))
    if current is None or (expect is not None and current not in set(expect)):
        return None
    if to not in ALLOWED[current]:
        if expect is None and current in FINISHED:
            return None  # finished while the caller was deciding: nothing to do
        raise IllegalTransition(f"job {job_id}: {current} -> {to} is not allowed")
    now = utcnow()
    stamps: dict[str, Any] = {"status": to, "updated_at": now}
    if to == "running":
        stamps["started_at"] = func.coalesce(Job.started_at, now)
    if to in FINISHED:
        stamps.update(finished_at=now, lease_expires_at=None)
    conditions = [Job.id == job_id, Job.status == current]
    if where is not None:
        conditions.append(where)
    result = session.execute(
        update(Job).where(*conditions).values(**{**dict(values or {}), **stamps})
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    _expire(session, job_id)
    details = {"from": current, **dict(data or {})}
    session.add(JobEvent(job_id=job_id, at=now, kind="status", status=to, data=details))
    change = Transition(job_id, current, to, now, details)
    session.info.setdefault(_PENDING, []).append(change)
    return change


def create_job(session: Session, **values: Any) -> Job:
    """Add a new queued job (``values``: Job columns) with its first history event; hooks see a
    None -> queued transition after the commit. The caller commits."""
    values.pop("status", None)
    job = Job(status="queued", **values)
    session.add(job)
    session.flush()  # the id
    now = utcnow()
    session.add(JobEvent(job_id=job.id, at=now, kind="status", status="queued", data={"from": None}))
    session.info.setdefault(_PENDING, []).append(Transition(job.id, None, "queued", now, {"from": None}))
    return job


def record_event(session: Session, job_id: str, kind: str, data: Mapping[str, Any],
                 status: str | None = None) -> JobEvent:
    """Append a checkpoint or score event (not thinned). Use transition() for status changes and
    record_progress() for progress."""
    if kind not in JOB_EVENT_KINDS or kind in ("status", "progress"):
        raise ValueError(f"record_event kind must be checkpoint or score, not {kind!r}")
    row = JobEvent(job_id=job_id, at=utcnow(), kind=kind, status=status, data=_json_safe(dict(data)))
    session.add(row)
    session.info.setdefault(_PENDING, []).append(Recorded(job_id, kind, row.at, dict(row.data)))
    return row


def record_progress(
    session: Session,
    job_id: str,
    progress: Mapping[str, Any],
    *,
    where: ColumnElement[bool] | None = None,
    values: Mapping[str, Any] | None = None,
) -> bool:
    """Write the running job's latest progress (and ``values``, e.g. the lease) and keep the point
    in its history (thinned: see the module docstring). False, and nothing written, when the job is
    not running or ``where`` does not hold."""
    progress = _json_safe(dict(progress))
    now = utcnow()
    conditions = [Job.id == job_id, Job.status == "running"]
    if where is not None:
        conditions.append(where)
    result = session.execute(
        update(Job).where(*conditions)
        .values(**dict(values or {}), progress=progress, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False
    _expire(session, job_id)
    last_two = session.execute(
        select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.kind == "progress")
        .order_by(JobEvent.id.desc()).limit(2)
    ).scalars().all()
    if _keep(progress, last_two):
        session.add(JobEvent(job_id=job_id, at=now, kind="progress", status="running", data=progress))
        session.flush()
        _thin(session, job_id)
    session.info.setdefault(_PENDING, []).append(Recorded(job_id, "progress", now, progress))
    return True


def _keep(point: dict[str, Any], last_two: list[dict[str, Any] | None]) -> bool:
    step = point.get("step")
    if step is None or len(last_two) < 2 or step == point.get("total"):
        return True
    last, prev = (d.get("step") if d else None for d in last_two)
    if last is None or prev is None or step < last:  # a resumed job may report an earlier step
        return True
    return step - last >= max(last - prev, 1)


def _thin(session: Session, job_id: str) -> None:
    count = session.scalar(select(func.count()).select_from(JobEvent)
                           .where(JobEvent.job_id == job_id, JobEvent.kind == "progress"))
    if count <= MAX_PROGRESS_EVENTS:
        return
    ids = session.scalars(select(JobEvent.id).where(JobEvent.job_id == job_id, JobEvent.kind == "progress")
                          .order_by(JobEvent.id)).all()
    drop = ids[1:-1:2]
    session.execute(delete(JobEvent).where(JobEvent.id.in_(drop)).execution_options(synchronize_session=False))


def history(session: Session, job_id: str, kinds: Iterable[str] | None = None) -> list[JobEvent]:
    """The job's events, oldest first (optionally only some kinds)."""
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if kinds is not None:
        query = query.where(JobEvent.kind.in_(list(kinds)))
    return list(session.scalars(query.order_by(JobEvent.id)))


def _json_safe(value: Any) -> Any:
    """JSON-storable: non-finite floats become None (eta of inf, a NaN loss)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value

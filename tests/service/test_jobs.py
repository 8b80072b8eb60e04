"""The job state machine (api/core/jobs.py): legal transitions only, compare-and-set, history
events, hooks after commit, bounded progress history."""

from __future__ import annotations

import pytest

from api.auth import get_or_create_tenant
from api.core import jobs
from api.core.db.migrate import upgrade
from api.core.db.models import Job, JobEvent
from api.core.db.session import session_scope


@pytest.fixture
def url(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    return url


def _new(url: str) -> str:
    with session_scope(url) as session:
        tenant = get_or_create_tenant(session, "t")
        return jobs.create_job(session, tenant_id=tenant.id, kind="finetune", params={}).id


def _statuses(url: str, job_id: str) -> list[tuple[str | None, str]]:
    with session_scope(url) as session:
        return [(e.data["from"], e.status) for e in jobs.history(session, job_id, kinds=["status"])]


def test_lifecycle_stamps_times_and_records_history(url):
    job_id = _new(url)
    with session_scope(url) as session:
        assert jobs.transition(session, job_id, "running", values={"worker_id": "w"}) is not None
    with session_scope(url) as session:
        started = session.get(Job, job_id).started_at
        assert started is not None and session.get(Job, job_id).finished_at is None
        assert jobs.transition(session, job_id, "succeeded", where=Job.worker_id == "w",
                               values={"result": {"ok": 1}})
    with session_scope(url) as session:
        row = session.get(Job, job_id)
        assert (row.status, row.result, row.started_at) == ("succeeded", {"ok": 1}, started)
        assert row.finished_at >= started and row.lease_expires_at is None
    assert _statuses(url, job_id) == [(None, "queued"), ("queued", "running"), ("running", "succeeded")]


def test_illegal_and_lost_races(url):
    job_id = _new(url)
    with session_scope(url) as session, pytest.raises(jobs.IllegalTransition):
        jobs.transition(session, job_id, "succeeded")  # queued -> succeeded skips running
    with session_scope(url) as session:
        # a condition that does not hold (someone else's lease) writes nothing
        assert jobs.transition(session, job_id, "running", where=Job.worker_id == "nobody") is None
        # the caller expected another status
        assert jobs.transition(session, job_id, "cancelled", expect=("running",)) is None
        assert jobs.transition(session, job_id, "cancelled", expect=("queued",)) is not None
    with session_scope(url) as session:
        assert jobs.transition(session, job_id, "running") is None  # finished: nothing to do
        assert jobs.transition(session, "no-such-job", "running") is None
        with pytest.raises(jobs.IllegalTransition):
            jobs.transition(session, job_id, "paused")
    assert _statuses(url, job_id) == [(None, "queued"), ("queued", "cancelled")]


def test_hooks_run_after_commit_only(url):
    seen: list[jobs.Transition] = []
    hook = jobs.on_transition(seen.append)
    try:
        job_id = _new(url)
        assert [(t.from_status, t.to_status) for t in seen] == [(None, "queued")]
        with pytest.raises(RuntimeError), session_scope(url) as session:
            jobs.transition(session, job_id, "running")
            raise RuntimeError("rolled back")
        assert len(seen) == 1  # the rolled-back change was never announced
        with session_scope(url) as session:
            jobs.transition(session, job_id, "running", data={"worker_id": "w"})
            assert len(seen) == 1  # not before the commit
        assert (seen[-1].job_id, seen[-1].from_status, seen[-1].to_status) == (job_id, "queued", "running")
        assert seen[-1].data["worker_id"] == "w"

        def broken(change):
            raise ValueError("a broken hook")

        jobs.on_transition(broken)
        with session_scope(url) as session:  # a failing hook neither raises nor stops the others
            jobs.transition(session, job_id, "failed", values={"error": "x"})
        assert seen[-1].to_status == "failed"
    finally:
        jobs.remove_hook(hook)
        jobs.remove_hook(broken)


def test_progress_history_is_kept_and_bounded(url, monkeypatch):
    monkeypatch.setattr(jobs, "MAX_PROGRESS_EVENTS", 10)
    job_id = _new(url)
    with session_scope(url) as session:
        # not running yet: nothing written
        assert not jobs.record_progress(session, job_id, {"step": 1, "total": 100})
        jobs.transition(session, job_id, "running")
    for step in range(1, 101):
        with session_scope(url) as session:
            assert jobs.record_progress(session, job_id, {"step": step, "total": 100, "loss": 1 / step,
                                                          "eta_s": float("inf")})
    with session_scope(url) as session:
        row = session.get(Job, job_id)
        assert row.progress["step"] == 100 and row.progress["eta_s"] is None  # latest, JSON-safe
        steps = [e.data["step"] for e in jobs.history(session, job_id, kinds=["progress"])]
        assert len(steps) <= 10 and steps[0] == 1 and steps[-1] == 100
        gaps = [b - a for a, b in zip(steps, steps[1:-1])]
        assert max(gaps) <= 2 * min(gaps), steps  # roughly even over the whole run
        jobs.record_event(session, job_id, "checkpoint", {"step": 50, "name": "checkpoint-50"})
    with session_scope(url) as session:
        kinds = [e.kind for e in jobs.history(session, job_id)]
        assert kinds.count("checkpoint") == 1 and kinds[0] == "status"
        session.delete(session.get(Job, job_id))
    with session_scope(url) as session:  # events go with their job
        assert session.query(JobEvent).count() == 0

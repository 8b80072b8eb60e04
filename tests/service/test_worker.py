"""The worker's job lease (redelivery safety) and the train task run in-process on a real SQLite
database: a redelivered task resumes from the latest checkpoint, a finished job is a no-op."""

from __future__ import annotations

import logging
import time
import zipfile
from datetime import timedelta

import pytest
from sqlalchemy import update

from api.auth import get_or_create_tenant
from api.core.db.models import Adapter, Dataset, Job, utcnow
from api.core.db.session import session_scope
from api.core.settings import Settings, get_settings
from api.core.storage import GENERATIONS, JOBS, make_store
from tests.service.conftest import TINY_TRAIN, dataset_zip, env_settings
from worker.lease import JobLease


@pytest.fixture
def settings(tmp_path, monkeypatch):
    yield env_settings(monkeypatch, tmp_path / "home", lease_ttl_s="30", progress_interval_s="60")
    get_settings.cache_clear()


def make_job(settings: Settings, job_id: str = "job1", **values) -> str:
    with session_scope(settings.database_url) as session:
        tenant = get_or_create_tenant(session, "t")
        session.add(Job(id=job_id, tenant_id=tenant.id, kind="finetune", params={}, **values))
    return job_id


def job(settings: Settings, job_id: str = "job1") -> Job:
    with session_scope(settings.database_url) as session:
        return session.get(Job, job_id)


def expire(settings: Settings, job_id: str = "job1") -> None:
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id)
                        .values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def test_one_claim_wins_and_an_expired_lease_moves(settings):
    make_job(settings)
    first, second = JobLease(settings, "job1", "w1"), JobLease(settings, "job1", "w2")
    assert first.claim().status == "claimed"
    row = job(settings)
    assert (row.status, row.worker_id, row.attempts) == ("running", "w1", 1)
    assert row.lease_expires_at > utcnow() + timedelta(seconds=20)

    busy = second.claim()  # a duplicate delivery while w1 is alive
    assert busy.status == "busy" and 0 < busy.retry_in_s <= 31
    assert first.renew() and not first.should_cancel()

    expire(settings)  # w1 died: its lease ran out
    assert second.claim().status == "claimed"
    assert (job(settings).worker_id, job(settings).attempts) == ("w2", 2)
    assert not first.renew() and first.lost and first.should_cancel()
    assert not first.finish("succeeded")  # a worker without the lease writes nothing
    assert second.finish("succeeded", result={"ok": 1})
    assert JobLease(settings, "job1", "w3").claim().status == "done"  # finished: no-op
    assert job(settings).status == "succeeded"


def test_cancel_flag_and_throttled_progress(settings):
    make_job(settings)
    lease = JobLease(settings, "job1", "w1")
    lease.claim()
    lease.report({"step": 1, "total": 10})
    lease.report({"step": 2, "total": 10})  # within the 60 s interval: not written
    assert job(settings).progress == {"step": 1, "total": 10}
    lease.report({"step": 10, "total": 10})  # the last step is always written
    assert job(settings).progress == {"step": 10, "total": 10}

    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == "job1").values(cancel_requested=True))
    time.sleep(0.3)
    assert lease.should_cancel()


def test_queued_cancelled_and_worn_out_jobs_are_not_run(settings):
    make_job(settings, "queued-cancel", cancel_requested=True)
    assert JobLease(settings, "queued-cancel", "w").claim().status == "done"
    assert job(settings, "queued-cancel").status == "cancelled"

    make_job(settings, "worn", status="running", attempts=settings.max_attempts, worker_id="dead",
             lease_expires_at=utcnow() - timedelta(seconds=5))
    assert JobLease(settings, "worn", "w").claim().status == "done"
    assert job(settings, "worn").status == "failed"
    assert "lost" in job(settings, "worn").error


def test_heartbeat_renews_the_lease(settings, monkeypatch):
    make_job(settings)
    monkeypatch.setattr(settings, "lease_ttl_s", 3)
    lease = JobLease(settings, "job1", "w1")
    lease.claim()
    first = job(settings).lease_expires_at
    with lease.heartbeat():
        time.sleep(2.5)
    assert job(settings).lease_expires_at > first


def test_redelivered_train_task_resumes_from_the_latest_checkpoint(settings, tiny_model, tmp_path, caplog):
    """Worker A trained to step 2 and died; the redelivered task (worker B) resumes at step 2."""
    from styleinject import StyleInjectConfig
    from styleinject.train import TrainConfig, run_training

    from worker import tasks

    data = tmp_path / "data"
    zipfile.ZipFile(dataset_zip(tmp_path / "d.zip")).extractall(data)
    params = {"kind": "finetune", "dataset_id": "ds", **TINY_TRAIN, "base_model": str(tiny_model)}
    with session_scope(settings.database_url) as session:
        tenant = get_or_create_tenant(session, "t")
        session.add(Dataset(id="ds", tenant_id=tenant.id, name="d.zip", status="ready", path=str(data)))
        session.add(Job(id="job1", tenant_id=tenant.id, kind="finetune", dataset_id="ds", params=params,
                        status="running", worker_id="dead:1", attempts=1,
                        lease_expires_at=utcnow() - timedelta(seconds=1)))
    # what worker A left behind: the same run, stopped after its step-2 checkpoint
    partial = TrainConfig(kind="finetune", base_model=str(tiny_model), data=str(data),
                          output_dir=str((settings.artifact_root / JOBS) / "job1"), steps=2, resolution=64,
                          checkpoint_every=2, learning_rate=1e-2,
                          adapter=StyleInjectConfig(rank=4, num_styles=2))
    run_training(partial)

    with caplog.at_level(logging.INFO, logger="styleinject.train"):
        outcome = tasks.train("job1")
    assert outcome["status"] == "succeeded", job(settings).error
    assert any("resumed from" in r.getMessage() and "step-000002" in r.getMessage() for r in caplog.records)
    row = job(settings)
    assert (row.status, row.attempts, row.progress["step"]) == ("succeeded", 2, 4)
    assert row.result["steps_done"] == 4
    with session_scope(settings.database_url) as session:
        assert [c.step for c in session.get(Job, "job1").checkpoints] == [2, 4]
        adapter = session.get(Adapter, row.result["adapter_id"])
        assert adapter.job_id == "job1" and adapter.meta["steps"] == "4"

    finished_at = row.finished_at
    assert tasks.train("job1") == {"job_id": "job1", "skipped": True}  # finished: a no-op
    assert job(settings).finished_at == finished_at and job(settings).attempts == 2


def test_train_task_keeps_the_per_term_losses_in_the_job_history(settings, tiny_model, tmp_path):
    """A distill job's progress points carry L_OutKD and L_FeatKD (Progress.terms) into job_events."""
    from sqlalchemy import select

    from api.core.db.models import JobEvent
    from worker import tasks

    data = tmp_path / "data"
    zipfile.ZipFile(dataset_zip(tmp_path / "d.zip")).extractall(data)
    params = {"kind": "distill", "dataset_id": "ds", **TINY_TRAIN, "steps": 2, "checkpoint_every": 2,
              "base_model": str(tiny_model), "teacher_model": str(tiny_model)}
    with session_scope(settings.database_url) as session:
        tenant = get_or_create_tenant(session, "t")
        session.add(Dataset(id="ds", tenant_id=tenant.id, name="d.zip", status="ready", path=str(data)))
        session.add(Job(id="job1", tenant_id=tenant.id, kind="distill", dataset_id="ds", params=params))

    assert tasks.train("job1")["status"] == "succeeded", job(settings).error
    with session_scope(settings.database_url) as session:
        points = session.scalars(select(JobEvent.data).where(JobEvent.job_id == "job1", JobEvent.kind == "progress")
                                 .order_by(JobEvent.id)).all()
    assert points and points[-1]["step"] == 2
    assert all(sorted(p["terms"]) == ["loss_feat_kd", "loss_out_kd"] for p in points)
    assert sorted(job(settings).progress["terms"]) == ["loss_feat_kd", "loss_out_kd"]


def test_concurrent_generations_for_different_adapters_never_mix(settings, tiny_model, tmp_path, monkeypatch):
    """Threads call the generate task at once for adapter A, adapter B and the base model; every
    image equals the one the same request gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from PIL import Image
    import torch
    from diffusers import UNet2DConditionModel

    from api.core.db.models import GenerationRequest
    from styleinject import StyleInjectConfig, adapter_parameters, inject, save_adapter
    from tests.service.conftest import TINY_GENERATE
    from worker import tasks

    monkeypatch.setenv("STYLEINJECT_BASE_MODEL", str(tiny_model))
    get_settings.cache_clear()
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    with session_scope(settings.database_url) as session:
        tenant = get_or_create_tenant(session, "t")
        for seed, name in enumerate(("A", "B"), start=1):
            inject(unet, StyleInjectConfig(rank=4, num_styles=2), name)
            torch.manual_seed(seed)
            for p in adapter_parameters(unet, name):
                p.data.normal_(0, 0.3)
            save_adapter(unet, tmp_path / name, name)
            session.add(Adapter(id=name, tenant_id=tenant.id, name=name, kind="finetune",
                                base_model=str(tiny_model), path=str(tmp_path / name)))
        tenant_id = tenant.id

    def run(adapter_id):
        params = {**TINY_GENERATE, "negative_prompt": None, "num_images": 1, "adapter_scale": 1.0,
                  "adapter_id": adapter_id}
        with session_scope(settings.database_url) as session:
            row = GenerationRequest(tenant_id=tenant_id, adapter_id=adapter_id, params=params)
            session.add(row)
            session.flush()
            request_id = row.id
        outcome = tasks.generate(request_id)
        assert outcome["ok"], outcome
        with make_store(settings).open_read(GENERATIONS, request_id, "0.png") as handle:
            return np.asarray(Image.open(handle).convert("RGB"), dtype=np.int16)

    alone = {name: run(name) for name in ("A", "B", None)}
    assert np.abs(alone["A"] - alone["B"]).max() > 20
    assert np.abs(alone["A"] - alone[None]).max() > 20 and np.abs(alone["B"] - alone[None]).max() > 20
    order = ["A", "B", None, "B", "A", None, "A", "B"]
    with ThreadPoolExecutor(max_workers=len(order)) as pool:  # one engine batches them all
        together = list(pool.map(run, order))
    # batched vs alone: float summation order only (at most 2 of 255, tests/serving/test_engine.py)
    for name, image in zip(order, together):
        assert np.abs(image - alone[name]).max() <= 2, f"request for {name} saw another adapter's weights"


def test_soft_time_limit_is_enforced_outside_prefork(settings, monkeypatch):
    """A solo-pool worker (the embedded train worker) runs tasks in its main thread, where Celery
    itself ignores time limits: the task_prerun timer raises SoftTimeLimitExceeded in a task that
    overruns, as the prefork pool would, and a task within its limit leaves no timer behind."""
    import signal

    from celery.exceptions import SoftTimeLimitExceeded
    from celery.signals import task_postrun, task_prerun

    from worker import time_limits
    from worker.celery_app import celery_app

    @celery_app.task(name="tests.sleepy", soft_time_limit=0.5)
    def sleepy(seconds: float) -> str:
        try:
            time.sleep(seconds)
        except SoftTimeLimitExceeded:
            return "stopped"
        return "done"

    def run_as_worker(seconds: float) -> str:
        # the signals a worker sends around every task (Task.apply would also need a result backend)
        task_prerun.send(sender=sleepy, task_id="t", task=sleepy, args=[seconds])
        try:
            return sleepy(seconds)
        finally:
            task_postrun.send(sender=sleepy, task_id="t", task=sleepy, args=[seconds])

    assert time_limits.applies()
    started = time.monotonic()
    assert run_as_worker(30) == "stopped" and time.monotonic() - started < 10
    assert run_as_worker(0.01) == "done"
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # disarmed after the task

    monkeypatch.setitem(time_limits._state, "prefork_child", True)  # billiard's own timers apply there
    assert not time_limits.applies()


def test_generation_past_its_time_limit_fails_with_504_and_leaves_the_engine(settings, tiny_model, monkeypatch):
    """The engine wait has its own deadline (STYLEINJECT_GENERATE_TIME_LIMIT_S, any pool): the
    request fails with 504 and is dropped from the engine's batch."""
    from api.core.db.models import GenerationRequest
    from tests.service.conftest import TINY_GENERATE
    from worker import tasks
    from worker.generation import ENGINES

    monkeypatch.setenv("STYLEINJECT_BASE_MODEL", str(tiny_model))
    monkeypatch.setenv("STYLEINJECT_GENERATE_TIME_LIMIT_S", "1")
    get_settings.cache_clear()
    with session_scope(settings.database_url) as session:
        tenant_id = get_or_create_tenant(session, "t").id
        row = GenerationRequest(tenant_id=tenant_id, params={
            **TINY_GENERATE, "negative_prompt": None, "num_images": 1, "steps": 150, "width": 256, "height": 256})
        session.add(row)
        session.flush()
        request_id = row.id
    tasks.get_pipeline(str(tiny_model))  # loaded before the clock starts
    started = time.monotonic()
    slow = tasks.generate(request_id)
    assert time.monotonic() - started < 30
    assert slow["ok"] is False and slow["status_code"] == 504, slow
    with session_scope(settings.database_url) as session:
        row = session.get(GenerationRequest, request_id)
        assert row.status == "failed" and "exceeded" in row.error and row.error_code == 504
    engine = ENGINES.get(str(tiny_model), get_settings())
    deadline = time.monotonic() + 10
    while engine.scheduler.num_active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.scheduler.num_active == 0

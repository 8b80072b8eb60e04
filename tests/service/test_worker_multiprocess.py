"""The train task with STYLEINJECT_TRAIN_PROCESSES=2: the loop runs under `accelerate launch` (2 CPU
processes, gloo); progress, checkpoints, cancel and the adapter row work through rank 0."""

from __future__ import annotations

import threading
import time
import zipfile

import pytest
from sqlalchemy import update

from api.auth import get_or_create_tenant
from api.core.db.models import Adapter, Dataset, Job
from api.core.db.session import session_scope
from api.core.settings import get_settings
from tests.service.conftest import TINY_TRAIN, dataset_zip, env_settings


@pytest.fixture
def settings(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield env_settings(monkeypatch, tmp_path / "home", train_processes="2", progress_interval_s="0")
    get_settings.cache_clear()


def add_job(settings, tiny_model, tmp_path, **train) -> None:
    data = tmp_path / "data"
    zipfile.ZipFile(dataset_zip(tmp_path / "d.zip")).extractall(data)
    params = {"kind": "finetune", "dataset_id": "ds", **TINY_TRAIN, "base_model": str(tiny_model), **train}
    with session_scope(settings.database_url) as session:
        tenant = get_or_create_tenant(session, "t")
        session.add(Dataset(id="ds", tenant_id=tenant.id, name="d.zip", status="ready", path=str(data)))
        session.add(Job(id="job1", tenant_id=tenant.id, kind="finetune", dataset_id="ds", params=params))


def row(settings) -> Job:
    with session_scope(settings.database_url) as session:
        return session.get(Job, "job1")


@pytest.mark.slow
def test_multiprocess_train_task_reports_progress_checkpoints_and_the_adapter(settings, tiny_model, tmp_path,
                                                                              monkeypatch):
    from worker import distributed, tasks

    launched = []
    original = distributed.launch_command
    monkeypatch.setattr(distributed, "launch_command", lambda n, channel: launched.append(n) or original(n, channel))
    add_job(settings, tiny_model, tmp_path)
    outcome = tasks.train("job1")
    assert launched == [2]
    job = row(settings)
    assert outcome["status"] == "succeeded", job.error
    assert job.progress["step"] == 4 and job.result["steps_done"] == 4
    with session_scope(settings.database_url) as session:
        assert [c.step for c in session.get(Job, "job1").checkpoints] == [2, 4]
        assert session.get(Adapter, job.result["adapter_id"]).meta["steps"] == "4"


@pytest.mark.slow
def test_multiprocess_train_task_cancel_stops_every_rank_and_keeps_the_checkpoint(settings, tiny_model, tmp_path):
    from worker import tasks

    add_job(settings, tiny_model, tmp_path, steps=2000, checkpoint_every=2)

    def cancel_after_step_3() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            job = row(settings)
            if job.status == "running" and (job.progress or {}).get("step", 0) >= 3:
                with session_scope(settings.database_url) as session:
                    session.execute(update(Job).where(Job.id == "job1").values(cancel_requested=True))
                return
            time.sleep(0.2)

    thread = threading.Thread(target=cancel_after_step_3, daemon=True)
    thread.start()
    outcome = tasks.train("job1")
    thread.join(5)
    job = row(settings)
    assert outcome["status"] == "cancelled", job.error
    assert 3 <= job.result["steps_done"] < 2000
    with session_scope(settings.database_url) as session:
        steps = [c.step for c in session.get(Job, "job1").checkpoints]
    assert steps and steps[-1] == job.result["steps_done"]  # the cancelled step was checkpointed

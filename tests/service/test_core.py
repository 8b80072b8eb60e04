"""The service core's small parts: artifact store, worker supervisor, task names, settings."""

from __future__ import annotations

import os
import sys
import time

import pytest

from api.core.storage import DATASETS, JOBS, LocalArtifactStore


def test_local_artifact_store(tmp_path):
    store = LocalArtifactStore(tmp_path / "artifacts")
    assert store.path_for(JOBS, "j1") == (tmp_path / "artifacts" / "jobs" / "j1").resolve()
    assert not store.exists(JOBS, "j1") and store.files(JOBS, "j1") == [] and store.size(JOBS, "j1") == 0
    with pytest.raises(FileNotFoundError):
        store.get_dir(JOBS, "j1")
    store.write_bytes(JOBS, "j1", "a.bin", b"abc")
    store.write_bytes(JOBS, "j1", "b.bin", b"de")
    assert store.exists(JOBS, "j1") and store.exists(JOBS, "j1", "a.bin") and not store.exists(JOBS, "j1", "c")
    assert store.files(JOBS, "j1") == ["a.bin", "b.bin"] and store.size(JOBS, "j1") == 5
    with store.open_read(JOBS, "j1", "a.bin") as handle:
        assert handle.read() == b"abc"
    assert store.locate(store.path_for(JOBS, "j1") / "checkpoint-2") == (JOBS, "j1")
    assert store.locate(tmp_path / "elsewhere") is None and store.locate(tmp_path / "artifacts") is None

    src = tmp_path / "local"
    src.mkdir()
    (src / "x.txt").write_text("x")
    store.put_dir(DATASETS, "d1", src)
    assert store.get_dir(DATASETS, "d1").joinpath("x.txt").read_text() == "x"
    store.put_dir(DATASETS, "d1", store.path_for(DATASETS, "d1"))  # already there: a no-op
    store.delete(DATASETS, "d1")
    store.delete(DATASETS, "d1")  # twice is fine
    assert not store.exists(DATASETS, "d1")
    for kind, id_ in [("secrets", "x"), (JOBS, ".."), (JOBS, "a/b"), (JOBS, "")]:
        with pytest.raises(ValueError):
            store.path_for(kind, id_)
    with pytest.raises(ValueError):
        store.write_bytes(JOBS, "j1", "../escape", b"")


def test_supervisor_restarts_then_gives_up(tmp_path):
    from api.core.supervisor import WorkerSupervisor

    restarted: list[int] = []
    crash = [sys.executable, "-c", "import sys; sys.exit(3)"]
    supervisor = WorkerSupervisor(crash, max_restarts=2, backoff_s=0.05, on_restart=restarted.append)
    supervisor.start()
    deadline = time.monotonic() + 30
    while not supervisor.gave_up and time.monotonic() < deadline:
        time.sleep(0.05)
    assert supervisor.gave_up and restarted == [1, 2] and supervisor.proc.returncode == 3
    assert supervisor.stop() == 3


def test_supervisor_stops_its_child_and_passes_the_environment(tmp_path):
    from api.core.supervisor import WorkerSupervisor

    marker = tmp_path / "env.txt"
    child = [sys.executable, "-c", "import os, pathlib, time; "
             f"pathlib.Path({str(marker)!r}).write_text(os.environ['STYLEINJECT_HOME']); time.sleep(60)"]
    supervisor = WorkerSupervisor(child, env={**os.environ, "STYLEINJECT_HOME": "/some/home"},
                                  stop_timeout_s=5)
    supervisor.start()
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.read_text() == "/some/home" and supervisor.running
    assert "STYLEINJECT_HOME" not in os.environ or os.environ["STYLEINJECT_HOME"] != "/some/home"
    code = supervisor.stop()
    assert code is not None and not supervisor.running and supervisor.restarts == 0


def test_task_names_and_settings_without_environment_mutation(tmp_path, monkeypatch):
    from api.core.celery import (GENERATE_QUEUE, TASK_EVALUATE, TASK_GENERATE, TASK_ROUTES, TASK_TRAIN, TASK_WEBHOOK,
                                 make_celery, task_for_job)
    from api.core.settings import Settings, configure_settings, get_settings

    assert set(TASK_ROUTES) == {TASK_TRAIN, TASK_EVALUATE, TASK_GENERATE, TASK_WEBHOOK}
    # webhooks never wait behind a training job (a train worker runs one task at a time)
    assert TASK_ROUTES[TASK_WEBHOOK]["queue"] == GENERATE_QUEUE
    assert task_for_job("evaluate") == TASK_EVALUATE and task_for_job("distill") == TASK_TRAIN
    monkeypatch.setenv("STYLEINJECT_HOME", str(tmp_path / "env-home"))
    before = dict(os.environ)
    try:
        configure_settings(Settings(home=tmp_path / "explicit"))
        assert get_settings().home == (tmp_path / "explicit").resolve()
        app = make_celery(get_settings())
        assert str(tmp_path / "explicit") in app.conf.broker_url
    finally:
        configure_settings(None)
    assert get_settings().home == (tmp_path / "env-home").resolve()
    assert dict(os.environ) == before


def test_the_worker_registers_every_task_name_the_api_sends():
    from api.core.celery import TASK_NAMES
    from worker import tasks
    from worker.celery_app import celery_app

    assert tasks.train.name in TASK_NAMES
    assert set(TASK_NAMES) <= set(celery_app.tasks)

"""Failure injection: real faults, not mocks. A disk that fills up while a checkpoint is written
(a small tmpfs), a database that goes away during a job (a TCP proxy in front of PostgreSQL that
the test cuts), and processes killed with SIGKILL in the middle of an upload's validation and of an
adapter delete. Each must end in a clean state: a clear error, nothing left `running`, no
half-written rows or files."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import make_url, select

from api.auth import get_or_create_tenant
from api.core.db.migrate import upgrade
from api.core.db.models import Checkpoint, Dataset, Job
from api.core.db.session import session_scope
from api.core.settings import get_settings
from api.core.storage import JOBS
from tests.service.conftest import REPO, TINY_TRAIN, dataset_zip, env_settings, free_port, service_env

MiB = 1 << 20


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 24 MiB tmpfs (root can mount one; elsewhere the test is skipped), unmounted at the end."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not root'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> None:
    """Write zeros until the disk is full."""
    with open(disk / "filler", "wb") as handle:
        try:
            while True:
                handle.write(bytes(MiB // 4))
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


def _settings(tmp_path, monkeypatch, **env: str):
    return env_settings(monkeypatch, tmp_path / "home", **env)


def _train_job(settings, tiny_model, tmp_path, **train) -> None:
    data = tmp_path / "data"
    zipfile.ZipFile(dataset_zip(tmp_path / "d.zip")).extractall(data)
    params = {"kind": "finetune", "dataset_id": "ds", **TINY_TRAIN, "base_model": str(tiny_model), **train}
    with session_scope(settings.database_url) as session:
        tenant = get_or_create_tenant(session, "t")
        session.add(Dataset(id="ds", tenant_id=tenant.id, name="d.zip", status="ready", path=str(data)))
        session.add(Job(id="job1", tenant_id=tenant.id, kind="finetune", dataset_id="ds", params=params))


def test_full_disk_while_a_checkpoint_is_written(small_disk, tmp_path, monkeypatch, tiny_model, caplog):
    """The artifact store on a small tmpfs that fills up after the step-2 checkpoint: the step-4
    checkpoint cannot be written. The job fails saying the disk is full (the worker log names the
    folder), the partial checkpoint is gone, and the step-2 checkpoint still loads and resumes."""
    from styleinject.train import run_training
    from styleinject.train.checkpoint import list_checkpoints
    from worker import tasks

    settings = _settings(tmp_path, monkeypatch, artifact_root=str(small_disk), progress_interval_s="0")
    get_settings.cache_clear()
    _train_job(settings, tiny_model, tmp_path)
    output = small_disk / JOBS / "job1"
    real = tasks.observe_training

    def fill_after_first_checkpoint(*args, **kwargs):  # called after each progress point
        real(*args, **kwargs)
        if list_checkpoints(output) and not (small_disk / "filler").exists():
            _fill(small_disk)

    monkeypatch.setattr(tasks, "observe_training", fill_after_first_checkpoint)
    outcome = tasks.train("job1")

    assert outcome["status"] == "failed"
    with session_scope(settings.database_url) as session:
        job = session.get(Job, "job1")
        steps = [c.step for c in session.scalars(select(Checkpoint).where(Checkpoint.job_id == "job1"))]
    assert job.status == "failed" and "disk" in job.error and "full" in job.error, job.error
    assert "step-000002" in job.error and str(small_disk) not in job.error  # no server path for the tenant
    assert any(str(output) in r.getMessage() and "full" in r.getMessage() for r in caplog.records)
    assert [p.name for p in list_checkpoints(output)] == ["step-000002"] and steps == [2]
    assert not list((output / "checkpoints").glob(".tmp-*")), "the partial checkpoint was left behind"

    (small_disk / "filler").unlink()  # space again: the kept checkpoint resumes the run
    cfg = tasks._train_config({"kind": "finetune", "params": job.params}, str(tmp_path / "data"), output)
    result = run_training(cfg)
    assert result.steps_done == 4 and [p.name for p in list_checkpoints(output)] == ["step-000002", "step-000004"]


class TcpProxy:
    """127.0.0.1:<port> -> target, in threads. ``cut()`` drops every connection and refuses new ones
    (the database is unreachable), ``restore()`` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _wait(predicate, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout} s" + (f"\n{log.read_text()[-6000:]}" if log else ""))


def test_database_unreachable_during_a_job(make_pg_database, redis_url, tiny_model, tmp_path):
    """A real worker process reaches PostgreSQL through a proxy that the test cuts for 4 s while
    the job trains: the job still ends (here: succeeds, with its adapter and checkpoint rows) and
    nothing stays running."""
    from api.core.celery import TASK_TRAIN, make_celery
    from api.core.db.models import Adapter
    from api.core.settings import Settings

    direct = make_pg_database()
    upgrade(direct)
    url = make_url(direct)
    proxy = TcpProxy((url.host, url.port))
    through_proxy = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    prefix = f"fi-{uuid.uuid4().hex[:8]}:"
    worker_settings = dict(home=str(tmp_path / "home"), database_url=through_proxy, broker_url=redis_url,
                           broker_key_prefix=prefix, artifact_root=str(tmp_path / "artifacts"),
                           lease_ttl_s="6", progress_interval_s="0.1")
    data = tmp_path / "data"
    zipfile.ZipFile(dataset_zip(tmp_path / "d.zip")).extractall(data)
    params = {"kind": "finetune", "dataset_id": "ds", **TINY_TRAIN, "steps": 60, "checkpoint_every": 20,
              "base_model": str(tiny_model)}
    with session_scope(direct) as session:
        tenant = get_or_create_tenant(session, "t")
        session.add(Dataset(id="ds", tenant_id=tenant.id, name="d.zip", status="ready", path=str(data)))
        session.add(Job(id="job1", tenant_id=tenant.id, kind="finetune", dataset_id="ds", params=params))

    def row() -> Job:
        with session_scope(direct) as session:
            return session.get(Job, "job1")

    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker", "--queues", "train", "--pool",
                                   "solo"], cwd=REPO, env=service_env(**worker_settings), stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        make_celery(Settings(broker_url=redis_url, broker_key_prefix=prefix,
                             home=tmp_path / "client")).send_task(TASK_TRAIN, args=["job1"])
        _wait(lambda: (row().progress or {}).get("step", 0) >= 3, 120, "the job did not start training", log)
        proxy.cut()
        time.sleep(4)
        proxy.restore()
        final = _wait(lambda: row().status not in ("queued", "running") and row(), 180, "the job did not end", log)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        proxy.cut()
    text = log.read_text()
    assert "database unreachable" in text, text[-4000:]  # the outage did hit the job
    assert final.status == "succeeded", (final.error, text[-4000:])
    with session_scope(direct) as session:
        adapter = session.scalar(select(Adapter).where(Adapter.job_id == "job1"))
        steps = sorted(c.step for c in session.scalars(select(Checkpoint).where(Checkpoint.job_id == "job1")))
    assert adapter is not None and steps == [20, 40, 60]


def _images_zip(path: Path, n: int) -> Path:
    """n noisy 64 x 64 PNGs with captions: long enough to validate that a kill lands mid-way."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(n):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png, format="PNG")
            archive.writestr(f"img{i:05d}.png", png.getvalue())
            archive.writestr(f"img{i:05d}.txt", "noise")
    return path


class Serve:
    """`styleinject serve --no-worker` (embedded: SQLite, local artifacts) that the test SIGKILLs."""

    KEY = "admin-key-for-failure-injection"

    def __init__(self, home: Path, log: Path) -> None:
        self.home, self.log, self.port = home, log, free_port()
        self.env = service_env(bootstrap_key=self.KEY)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "api.cli", "serve", "--no-worker", "--home",
                                          str(self.home), "--port", str(self.port)], cwd=REPO, env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT)
        import httpx

        def up() -> bool:
            assert self.proc.poll() is None, self.log.read_text()[-4000:]
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(up, 120, "serve did not come up", self.log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no cleanup of any kind runs
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def request(self, method: str, path: str, **kwargs) -> threading.Thread:
        """Send a request in a thread (its connection dies with the server)."""
        import httpx

        def send() -> None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.request(method, f"{self.url}{path}", headers={"Authorization": f"Bearer {self.KEY}"},
                              timeout=120, **kwargs)

        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        return thread


def test_api_killed_during_upload_validation_and_adapter_delete(tmp_path):
    """SIGKILL in the middle of a dataset's validation, then in the middle of an adapter delete
    (after its row went, while its files go): no half-written rows, and the next start removes the
    files left without a row."""
    from api.core.db.models import Adapter, Tenant
    from api.core.settings import Settings

    home = tmp_path / "home"
    serve = Serve(home, tmp_path / "serve.log")
    settings = Settings(home=home)
    artifacts = settings.artifact_root
    upload = _images_zip(tmp_path / "many.zip", 1500)
    try:
        # 1. killed while validating an upload (its files are extracted; no row yet)
        serve.start()
        serve.request("POST", "/datasets", files={"file": ("many.zip", upload.read_bytes())})
        extracted = _wait(lambda: [p for p in (artifacts / "datasets").glob("*/data/*")], 60,
                          "the upload was never extracted", serve.log)
        serve.kill()
        with session_scope(settings.database_url) as session:
            assert session.scalars(select(Dataset)).all() == []  # no row for a half-validated dataset
        assert extracted[0].parent.exists(), "the kill came too late to test anything"
        serve.start()  # the next start removes what the killed process left
        assert not any((artifacts / "datasets").iterdir()) and not any((artifacts / "uploads").iterdir())
        assert "removed datasets/" in serve.log.read_text()

        # 2. killed while deleting an adapter: the row is gone, its files are being removed
        with session_scope(settings.database_url) as session:
            tenant = session.scalar(select(Tenant).where(Tenant.name == "admin"))
            session.add(Job(id="job1", tenant_id=tenant.id, kind="finetune", params={}, status="succeeded"))
            folder = artifacts / "jobs" / "job1"
            session.add(Adapter(id="ad1", tenant_id=tenant.id, job_id="job1", name="a", kind="finetune",
                                base_model="demo", path=str(folder)))
            session.flush()
            session.add(Checkpoint(job_id="job1", adapter_id="ad1", step=2, path=str(folder / "checkpoints/step-2")))
        for i in range(200):  # many files: removing them takes long enough to kill the process mid-way
            part = folder / "checkpoints" / f"step-{i}"
            part.mkdir(parents=True)
            for j in range(100):
                (part / f"f{j}").write_bytes(b"x")
        serve.request("DELETE", "/adapters/ad1")

        def row_gone() -> bool:
            with session_scope(settings.database_url) as session:
                return session.get(Adapter, "ad1") is None

        _wait(row_gone, 60, "the adapter row was never deleted", serve.log)
        serve.kill()
        assert folder.exists(), "the kill came too late to test anything"
        with session_scope(settings.database_url) as session:
            assert session.scalars(select(Checkpoint)).all() == []  # went with the adapter, in its transaction
            assert session.get(Job, "job1").status == "succeeded"
        serve.start()
        assert not folder.exists(), "the half-deleted adapter's files were not removed at the next start"
        assert "removed jobs/job1" in serve.log.read_text()
    finally:
        serve.stop()


def test_sweep_keeps_what_may_be_in_progress_and_what_rows_point_to(tmp_path, monkeypatch):
    from api.core.sweep import sweep_orphans

    settings = _settings(tmp_path, monkeypatch)
    root = settings.artifact_root
    with session_scope(settings.database_url) as session:
        tenant = get_or_create_tenant(session, "t")
        session.add(Dataset(id="kept", tenant_id=tenant.id, name="d.zip", status="ready", path=str(root)))
        session.add(Job(id="failed", tenant_id=tenant.id, kind="finetune", params={}, status="failed"))
        session.add(Job(id="done", tenant_id=tenant.id, kind="finetune", params={}, status="succeeded"))
    folders = [root / "datasets" / "kept", root / "datasets" / "orphan", root / "jobs" / "failed",
               root / "jobs" / "done", root / "jobs" / "no-row", root / "uploads" / "scratch"]
    for folder in folders:
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "file").write_bytes(b"x")
    assert sweep_orphans(settings, older_than_s=3600) == []  # fresh: another process may be writing them
    hour_ago = time.time() - 3700
    for folder in folders:
        for path in (folder, folder / "sub", folder / "sub" / "file"):
            os.utime(path, (hour_ago, hour_ago))
    removed = sweep_orphans(settings, older_than_s=3600)
    assert sorted(removed) == ["datasets/orphan", "jobs/done", "jobs/no-row", "uploads/scratch"]
    assert (root / "datasets" / "kept").exists() and (root / "jobs" / "failed").exists()  # rows point to them

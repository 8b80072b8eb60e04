"""The artifact store interface, local folder and S3 (against moto's S3 server on loopback: real
HTTP, real boto3), and the S3 store's cache: cross-machine paths, size bound, concurrent fetches."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from api.core.settings import Settings
from api.core.storage import DATASETS, GENERATIONS, JOBS, LocalArtifactStore, S3ArtifactStore, make_store
from tests.service.conftest import make_bucket, sqlite_settings

@pytest.fixture
def bucket(s3_server) -> str:
    return make_bucket(s3_server)


def s3_store(s3_server, bucket, cache: Path, **options) -> S3ArtifactStore:
    return S3ArtifactStore(f"s3://{bucket}/deploy/a", cache, endpoint_url=s3_server, region="us-east-1", **options)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalArtifactStore(tmp_path / "artifacts")
    s3 = request.getfixturevalue("s3_server")
    return s3_store(s3, request.getfixturevalue("bucket"), tmp_path / "cache")


def make_folder(path: Path) -> Path:
    (path / "checkpoint-2").mkdir(parents=True)
    (path / "adapter_config.json").write_text('{"rank": 4}')
    (path / "adapter_model.safetensors").write_bytes(b"\0" * 100)
    (path / "checkpoint-2" / "state.bin").write_bytes(b"x" * 10)
    return path


def test_store_interface_s3_and_local(store, tmp_path):
    """The whole ArtifactStore contract, the same for both implementations."""
    assert not store.exists(JOBS, "j1") and store.files(JOBS, "j1") == [] and store.size(JOBS, "j1") == 0
    assert store.ids(JOBS) == [] and store.modified(JOBS, "j1") is None
    with pytest.raises(FileNotFoundError):
        store.get_dir(JOBS, "j1")
    out = make_folder(store.path_for(JOBS, "j1"))
    store.put_dir(JOBS, "j1", out)
    assert store.exists(JOBS, "j1") and store.exists(JOBS, "j1", "adapter_config.json")
    assert not store.exists(JOBS, "j1", "nope.txt")
    assert store.files(JOBS, "j1") == ["adapter_config.json", "adapter_model.safetensors"]  # top level only
    assert store.size(JOBS, "j1") == 111
    assert store.ids(JOBS) == ["j1"] and store.ids(DATASETS) == []
    assert abs(store.modified(JOBS, "j1") - time.time()) < 60
    with store.open_read(JOBS, "j1", "adapter_config.json") as handle:
        assert handle.read() == b'{"rank": 4}'
    with pytest.raises(FileNotFoundError):
        store.open_read(JOBS, "j1", "nope.txt")
    folder = store.get_dir(JOBS, "j1")
    assert (folder / "checkpoint-2" / "state.bin").read_bytes() == b"x" * 10
    assert store.locate(folder / "checkpoint-2") == (JOBS, "j1") and store.locate(tmp_path / "elsewhere") is None
    assert Path(store.localise(folder / "adapter_config.json")).read_text() == '{"rank": 4}'
    assert store.localise("hub/model-id") == "hub/model-id"

    # a folder published from elsewhere replaces the artifact (removed files go too)
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("A")
    store.put_dir(DATASETS, "d1", other)
    store.put_dir(JOBS, "j1", other)
    assert store.files(JOBS, "j1") == ["a.txt"] and store.size(JOBS, "j1") == 1
    assert sorted(p.name for p in store.get_dir(JOBS, "j1").rglob("*") if not p.name.startswith(".")) == ["a.txt"]

    store.write_bytes(GENERATIONS, "g1", "0.png", b"png")
    assert store.files(GENERATIONS, "g1") == ["0.png"]
    with store.open_read(GENERATIONS, "g1", "0.png") as handle:
        assert handle.read() == b"png"
    store.delete(JOBS, "j1")
    store.delete(JOBS, "never-there")
    assert not store.exists(JOBS, "j1") and store.files(JOBS, "j1") == []
    assert store.ids(JOBS) == [] and store.modified(JOBS, "j1") is None and store.ids(DATASETS) == ["d1"]
    assert store.exists(DATASETS, "d1")
    for bad in ((JOBS, "../x"), ("nope", "x"), (JOBS, "")):
        with pytest.raises(ValueError):
            store.path_for(*bad)


def test_s3_two_machines_share_nothing_but_the_bucket(s3_server, bucket, tmp_path):
    """A path written on one machine (its cache folder) resolves and downloads on another."""
    api = s3_store(s3_server, bucket, tmp_path / "api-home" / "cache")
    worker = s3_store(s3_server, bucket, tmp_path / "worker-home" / "cache")
    data = make_folder(api.path_for(DATASETS, "d1"))
    api.put_dir(DATASETS, "d1", data)
    row_path = str(data / "adapter_config.json")  # what a row keeps: the writer's local path
    local = Path(worker.localise(row_path))
    assert local.read_text() == '{"rank": 4}' and str(local).startswith(str(tmp_path / "worker-home"))
    assert worker.locate(row_path) == (DATASETS, "d1")
    assert worker.localise(f"s3://{bucket}/deploy/a/datasets/d1/checkpoint-2") == str(local.parent / "checkpoint-2")
    assert worker.locate(f"s3://{bucket}/other/datasets/d1") is None

    # the writer changes a file: the reader's next get_dir downloads only what changed
    time.sleep(0.01)
    (data / "adapter_config.json").write_text('{"rank": 8}')
    api.put_dir(DATASETS, "d1", data)
    calls = []
    original = worker.client.download_file
    worker.client.download_file = lambda *a, **k: (calls.append(a[1]), original(*a, **k))
    assert (worker.get_dir(DATASETS, "d1") / "adapter_config.json").read_text() == '{"rank": 8}'
    assert calls == ["deploy/a/datasets/d1/adapter_config.json"]
    worker.get_dir(DATASETS, "d1")
    assert len(calls) == 1  # unchanged: nothing downloaded


def test_s3_cache_is_bounded_and_keeps_what_this_machine_wrote(s3_server, bucket, tmp_path):
    writer = s3_store(s3_server, bucket, tmp_path / "w")
    for i in range(4):
        folder = writer.path_for(JOBS, f"j{i}")
        folder.mkdir(parents=True)
        (folder / "w.bin").write_bytes(b"\1" * 1000)
        writer.put_dir(JOBS, f"j{i}", folder)
    reader = s3_store(s3_server, bucket, tmp_path / "r", cache_bytes=2500, min_age_s=0)
    for i in range(4):
        reader.get_dir(JOBS, f"j{i}")
        time.sleep(0.02)  # distinct use times
    cached = sorted(p.name for p in (reader.root / JOBS).iterdir())
    assert cached == ["j2", "j3"]  # least recently used went first
    reader.get_dir(JOBS, "j0")  # evicted copies come back on demand
    assert (reader.root / JOBS / "j0" / "w.bin").stat().st_size == 1000

    # the writer's own outputs are never evicted, whatever the bound
    own = s3_store(s3_server, bucket, tmp_path / "w", cache_bytes=0, min_age_s=0)
    own.get_dir(DATASETS, "d9") if own.exists(DATASETS, "d9") else None
    writer_files = sorted(p.name for p in (own.root / JOBS).iterdir())
    assert writer_files == ["j0", "j1", "j2", "j3"]


def test_s3_concurrent_fetches_of_one_artifact(s3_server, bucket, tmp_path):
    writer = s3_store(s3_server, bucket, tmp_path / "w")
    folder = make_folder(writer.path_for(JOBS, "j"))
    writer.put_dir(JOBS, "j", folder)
    reader = s3_store(s3_server, bucket, tmp_path / "r")
    errors = []

    def fetch():
        try:
            assert (reader.get_dir(JOBS, "j") / "adapter_model.safetensors").stat().st_size == 100
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_make_store_picks_s3_from_the_artifact_root(s3_server, bucket, tmp_path, monkeypatch):
    settings = Settings(home=tmp_path, artifact_root=f"s3://{bucket}/p", s3_endpoint_url=s3_server,
                        s3_region="us-east-1", artifact_cache_bytes=123)
    store = make_store(settings)
    assert isinstance(store, S3ArtifactStore) and store.cache_bytes == 123
    assert store.root == tmp_path / "artifact-cache" / "s3-cache" / bucket / "p"
    for name, value in settings.to_env().items():  # what a child process (the worker) sees
        monkeypatch.setenv(name, value)
    assert Settings().artifact_root == f"s3://{bucket}/p" and Settings().object_storage
    monkeypatch.setenv("STYLEINJECT_ARTIFACT_ROOT", str(tmp_path / "x" / ".." / "y"))
    assert Settings().artifact_root == tmp_path / "y"
    assert isinstance(make_store(Settings(home=tmp_path)), LocalArtifactStore)
    with pytest.raises(ValueError):
        S3ArtifactStore("s3://", tmp_path)


def test_sweep_removes_orphans_that_only_the_bucket_holds(s3_server, bucket, tmp_path, monkeypatch):
    """A worker host that died between publishing a job's folder and its row leaves the orphan in
    the bucket only: the API host's sweep (its cache has no copy) finds and removes it."""
    from api.auth import get_or_create_tenant
    from api.core.db.models import Dataset
    from api.core.db.session import session_scope
    from api.core.sweep import sweep_orphans

    settings = sqlite_settings(monkeypatch, tmp_path / "api-home", artifact_root=f"s3://{bucket}/deploy/a",
                               s3_endpoint_url=s3_server, s3_region="us-east-1")
    with session_scope(settings.database_url) as session:
        tenant = get_or_create_tenant(session, "t")
        session.add(Dataset(id="kept", tenant_id=tenant.id, name="d.zip", status="ready", path="x"))
    worker = s3_store(s3_server, bucket, tmp_path / "worker-home" / "cache")
    for kind, id_ in ((DATASETS, "kept"), (DATASETS, "orphan"), (JOBS, "no-row")):
        worker.put_dir(kind, id_, make_folder(tmp_path / "src" / kind / id_))
    api = make_store(settings)
    assert api.ids(DATASETS) == ["kept", "orphan"] and not api.path_for(DATASETS, "orphan").exists()

    assert sweep_orphans(settings, older_than_s=3600) == []  # just written: may be in progress
    assert sorted(sweep_orphans(settings, older_than_s=0)) == ["datasets/orphan", "jobs/no-row"]
    assert api.ids(DATASETS) == ["kept"] and api.ids(JOBS) == []
    assert worker.exists(DATASETS, "kept")

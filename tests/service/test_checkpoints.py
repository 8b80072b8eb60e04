"""Checkpoint selection in the service: the train task scores each checkpoint's validation grid
(toy base: the packaged toy CLIP and attribute checker, offline), the API marks the best one by
the job's select_metric, serves the grids (owner-checked) and promotes a checkpoint to an adapter."""

from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.auth import BOOTSTRAP_TENANT, create_api_key, get_or_create_tenant
from api.core.db.migrate import upgrade
from api.core.db.models import Adapter, Checkpoint, Dataset, EvalScore, Job, JobEvent
from api.core.db.session import session_scope
from api.core.settings import Settings, get_settings
from api.main import create_app
from worker.checkpoints import scorer_config

STEPS = {"steps": 4, "checkpoint_every": 2, "keep_checkpoints": 5, "learning_rate": 1e-2, "sample_steps": 2,
         "checkpoint_samples": True, "validation_seeds": [0, 1], "adapter": {"rank": 2, "num_styles": 2}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One toy-base job trained by the train task in-process (embedded settings, default scorers)."""
    import os

    from styleinject.assets import TOY_BASE
    from styleinject.eval.toyworld.dataset import write_dataset
    from worker import tasks

    tmp = tmp_path_factory.mktemp("ckpt")
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("STYLEINJECT_")}
    os.environ.update({"STYLEINJECT_HOME": str(tmp / "home"), "STYLEINJECT_BOOTSTRAP_KEY": "boot-key-for-tests",
                       "STYLEINJECT_PROGRESS_INTERVAL_S": "60"})
    get_settings.cache_clear()
    settings = get_settings()
    settings.home.mkdir(parents=True)
    upgrade(settings.database_url)
    data = write_dataset(tmp / "data", 3, style="stripes")
    with session_scope(settings.database_url) as session:
        tenant = get_or_create_tenant(session, BOOTSTRAP_TENANT)
        session.add(Dataset(id="ds", tenant_id=tenant.id, name="d", status="ready", path=str(data)))
        session.add(Job(id="job1", tenant_id=tenant.id, kind="finetune", dataset_id="ds",
                        params={**STEPS, "name": "stripy", "base_model": str(TOY_BASE), "select_metric": "toystyle"}))
    try:
        assert tasks.train("job1")["status"] == "succeeded"
        yield settings
    finally:
        for name in [k for k in os.environ if k.startswith("STYLEINJECT_")]:
            del os.environ[name]
        os.environ.update(saved)
        get_settings.cache_clear()


def test_default_scorers_are_offline_for_the_toy_base(tmp_path):
    from styleinject.assets import TOY_BASE, TOY_CLIP

    settings = Settings(home=tmp_path)
    assert scorer_config(settings, str(TOY_BASE)) == (["clipscore", "toystyle"], {"clipscore": str(TOY_CLIP)})
    assert scorer_config(settings, "/models/sd15") == ([], {})  # no weights here: no hub download mid-job
    configured = Settings(home=tmp_path, scorer_paths={"clipscore": "/m/clip"})
    assert scorer_config(configured, "/models/sd15") == (["clipscore"], {"clipscore": "/m/clip"})
    chosen = Settings(home=tmp_path, checkpoint_scorers=["clipscore", "pickscore"])
    assert scorer_config(chosen, "/models/sd15") == (["clipscore", "pickscore"], {})
    off = Settings(home=tmp_path, checkpoint_scorers=[], scorer_paths={"clipscore": "/m/clip"})
    assert scorer_config(off, str(TOY_BASE)) == ([], {"clipscore": "/m/clip"})


def test_every_checkpoint_is_scored_as_it_is_written(trained):
    with session_scope(trained.database_url) as session:
        checkpoints = session.scalars(select(Checkpoint).where(Checkpoint.job_id == "job1")
                                      .order_by(Checkpoint.step)).all()
        assert [c.step for c in checkpoints] == [2, 4]
        for c in checkpoints:
            assert c.samples["seeds"] == [0, 1] and len(c.samples["prompts"]) == 3
            scores = {s.metric: s.value for s in c.scores}
            assert sorted(scores) == ["clipscore", "toystyle"]
            assert 0 <= scores["toystyle"] <= 1 and 0 <= scores["clipscore"] <= 250
        events = [e.data for e in session.scalars(select(JobEvent).where(JobEvent.job_id == "job1",
                                                                           JobEvent.kind == "score"))]
        assert sorted((e["step"], e["metric"]) for e in events) == [
            (2, "clipscore"), (2, "toystyle"), (4, "clipscore"), (4, "toystyle")]
        assert all(isinstance(e["value"], float) for e in events)
        # the final checkpoint holds the adapter's weights: its scores are the adapter's
        adapter = session.scalar(select(Adapter).where(Adapter.job_id == "job1"))
        final = {(s.metric, s.value) for s in checkpoints[1].scores}
        assert {(s.metric, s.value) for s in adapter.eval_scores} == final


def test_the_best_checkpoint_so_far_is_pinned_against_pruning(trained):
    from pathlib import Path

    from styleinject.train.checkpoint import PIN_NAME
    from worker.checkpoints import CheckpointScorer

    def pinned():
        with session_scope(trained.database_url) as session:
            rows = session.scalars(select(Checkpoint).where(Checkpoint.job_id == "job1")).all()
            return {c.step for c in rows if (Path(c.path) / PIN_NAME).exists()}

    def best(metric):
        with session_scope(trained.database_url) as session:
            rows = session.scalars(select(EvalScore).where(EvalScore.job_id == "job1", EvalScore.metric == metric,
                                                           EvalScore.checkpoint_id.is_not(None))).all()
            top = max(rows, key=lambda s: (s.value, s.checkpoint.step))
            return top.checkpoint.step

    assert pinned() == {best("toystyle")}  # the job's select_metric
    with session_scope(trained.database_url) as session:
        session.get(Job, "job1").params = {**session.get(Job, "job1").params, "select_metric": "clipscore"}
    with session_scope(trained.database_url) as session:
        CheckpointScorer.pin_best(session, "job1")
    assert pinned() == {best("clipscore")}  # the pin moves with the best; the old one is unpinned
    with session_scope(trained.database_url) as session:
        session.get(Job, "job1").params = {**session.get(Job, "job1").params, "select_metric": "toystyle"}
        CheckpointScorer.pin_best(session, "job1")


@pytest.fixture
def client(trained):
    with TestClient(create_app(trained)) as client:
        yield client


AUTH = {"Authorization": "Bearer boot-key-for-tests"}


def test_job_lists_checkpoints_with_samples_scores_and_the_best(client, trained):
    job = client.get("/jobs/job1", headers=AUTH).json()
    checkpoints = job["checkpoints"]
    assert [c["step"] for c in checkpoints] == [2, 4]
    best = max(checkpoints, key=lambda c: (c["scores"]["toystyle"], c["step"]))  # select_metric: toystyle
    assert [c["best"] for c in checkpoints] == [c is best for c in checkpoints]
    for c in checkpoints:
        assert c["samples_url"] == f"/jobs/job1/checkpoints/{c['step']}/samples.png"
        png = client.get(c["samples_url"], headers=AUTH)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
    # by clipscore the best may be another checkpoint: the flag follows the job's select_metric
    def choose(metric):
        with session_scope(trained.database_url) as session:
            row = session.get(Job, "job1")
            row.params = {**row.params, "select_metric": metric}

    choose("clipscore")
    by_clip = client.get("/jobs/job1", headers=AUTH).json()["checkpoints"]
    top = max(by_clip, key=lambda c: (c["scores"]["clipscore"], c["step"]))
    assert [c["best"] for c in by_clip] == [c is top for c in by_clip]
    choose("toystyle")
    assert client.get("/jobs/job1/checkpoints/3/samples.png", headers=AUTH).status_code == 404
    # another tenant sees nothing
    with session_scope(trained.database_url) as session:
        other, _ = create_api_key(session, "mallory")
    for url in ("/jobs/job1/checkpoints/2/samples.png",):
        assert client.get(url, headers={"Authorization": f"Bearer {other}"}).status_code == 404
    assert client.post("/jobs/job1/checkpoints/2/promote", headers={"Authorization": f"Bearer {other}"}
                       ).status_code == 404


def test_promote_a_checkpoint_to_an_adapter(client, trained):
    from styleinject.adapters.io import read_adapter_metadata

    response = client.post("/jobs/job1/checkpoints/2/promote", json={"name": "early stripes"}, headers=AUTH)
    assert response.status_code == 201, response.text
    adapter = response.json()
    assert adapter["name"] == "early stripes" and adapter["kind"] == "finetune"
    assert (adapter["source_job_id"], adapter["source_step"], adapter["job_id"]) == ("job1", 2, None)
    assert adapter["metadata"]["steps"] == "2" and adapter["metadata"]["checkpoint"] == "true"
    assert sorted(s["metric"] for s in adapter["eval_scores"]) == ["clipscore", "toystyle"]
    assert all(s["details"]["step"] == 2 and s["details"]["n_samples"] == 6 for s in adapter["eval_scores"])
    detail = client.get(f"/adapters/{adapter['id']}", headers=AUTH).json()
    assert (detail["source_job_id"], detail["source_step"]) == ("job1", 2)
    # its own copy of the checkpoint's weights: the same bytes, the engine's content hash
    with session_scope(trained.database_url) as session:
        row = session.get(Adapter, adapter["id"])
        checkpoint = session.scalar(select(Checkpoint).where(Checkpoint.job_id == "job1", Checkpoint.step == 2))
        copied, original = (__import__("pathlib").Path(p) / "adapter_model.safetensors"
                            for p in (row.path, checkpoint.path))
        assert copied.read_bytes() == original.read_bytes() and copied.parent != original.parent
        assert row.meta["sha256"] == hashlib.sha256(original.read_bytes()).hexdigest()
        assert read_adapter_metadata(copied.parent)["steps"] == "2"
        assert session.scalars(select(EvalScore).where(EvalScore.adapter_id == adapter["id"])).all()
    assert client.post("/jobs/job1/checkpoints/2/promote", headers=AUTH).status_code == 409
    missing = client.post("/jobs/job1/checkpoints/7/promote", headers=AUTH)
    assert missing.status_code == 404 and "kept: 2, 4" in missing.json()["message"]
    # default name; deleting a promoted adapter leaves the job's files alone
    second = client.post("/jobs/job1/checkpoints/4/promote", headers=AUTH).json()
    assert second["name"] == "stripy-step4"
    listed = client.get("/jobs/job1", headers=AUTH).json()["checkpoints"][1]
    assert (listed["promoted_adapter_id"], listed["promoted_adapter_name"]) == (second["id"], "stripy-step4")
    overview = client.get("/dashboard", headers=AUTH).text  # the overview links it to its job and step
    assert '<a href="/dashboard/jobs/job1" title="promoted from this job\'s checkpoint at step 4">' in overview
    page = client.get("/dashboard/jobs/job1", headers=AUTH).text
    assert 'id="checkpoints" class="ckpts" data-metric="toystyle"' in page
    assert client.delete(f"/adapters/{adapter['id']}", headers=AUTH).status_code == 204
    assert original.is_file() and client.get("/jobs/job1/checkpoints/2/samples.png", headers=AUTH).status_code == 200


def test_a_scorer_that_cannot_load_is_reported_once_and_training_goes_on(trained, tmp_path):
    from worker.checkpoints import CheckpointScorer

    with session_scope(trained.database_url) as session:
        job = session.get(Job, "job1")
        session.add(Job(id="job2", tenant_id=job.tenant_id, kind="finetune", params={}))
        for c in job.checkpoints:  # job1's folders, which hold grids
            session.add(Checkpoint(job_id="job2", step=c.step, path=c.path, samples=c.samples))
    scorer = CheckpointScorer(Settings(home=tmp_path, checkpoint_scorers=["clipscore"],
                                       scorer_paths={"clipscore": str(tmp_path)}), "/models/x")  # no weights there
    for _ in range(2):
        with session_scope(trained.database_url) as session:
            scorer.score_new(session, "job2")
    with session_scope(trained.database_url) as session:
        events = [e.data for e in session.scalars(select(JobEvent).where(JobEvent.job_id == "job2"))]
        assert len(events) == 1 and events[0]["value"] is None and events[0]["step"] == 2
        assert "could not load the CLIP model" in events[0]["error"]
        assert not session.scalars(select(EvalScore).where(EvalScore.job_id == "job2")).all()

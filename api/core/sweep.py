"""Remove artifacts that a killed process left without their rows (docs/security.md, failure injection).

Rows are written after their files and deleted before them, so a process killed in between leaves
files that no row points to, never a row whose files are half-written:

- ``uploads/<id>``: an upload's scratch folder (the streamed file), always temporary;
- ``datasets/<id>``, ``adapters/<id>``: an upload or import killed during validation, before its row;
- ``jobs/<id>`` of a training job that succeeded but has no adapter any more: an adapter delete
  killed after its row went (the files go after the commit), possibly half-removed.

``older_than_s`` keeps what may still be in progress elsewhere (another API replica validating an
upload writes into its folder until its row exists): ``styleinject serve`` (embedded: nothing else
writes its store) sweeps with 0 at start; other API processes sweep at start with an hour.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import select

from api.core.db.models import Adapter, Dataset, Job
from api.core.db.session import session_scope
from api.core.settings import Settings
from api.core.storage import ADAPTERS, DATASETS, JOBS, UPLOADS, make_store

log = logging.getLogger(__name__)

TRAINING_KINDS = ("finetune", "distill", "dreambooth")


def sweep_orphans(settings: Settings, older_than_s: float) -> list[str]:
    """Delete the orphans described above whose newest file is older than ``older_than_s``;
    returns ``kind/id`` of each one removed. The rows are read first, so a large store costs one
    listing per kind and a walk of the orphans only. With an object store, artifacts in the bucket
    count as well as this machine's cached copies (a worker host that died mid-way leaves its
    orphans in the bucket only), and their age is that of their newest object."""
    store = make_store(settings)
    ids = {kind: store.ids(kind) for kind in (UPLOADS, DATASETS, ADAPTERS, JOBS)}
    if not any(ids.values()):
        return []
    with session_scope(settings.database_url) as session:
        datasets = set(session.scalars(select(Dataset.id).where(Dataset.id.in_(ids[DATASETS]))))
        adapters = set(session.scalars(select(Adapter.id).where(Adapter.id.in_(ids[ADAPTERS]))))
        jobs = {row.id: row for row in session.execute(
            select(Job.id, Job.kind, Job.status).where(Job.id.in_(ids[JOBS])))}
        with_adapter = set(session.scalars(select(Adapter.job_id).where(Adapter.job_id.in_(ids[JOBS]))))
    orphans = [(UPLOADS, i) for i in ids[UPLOADS]]
    orphans += [(DATASETS, i) for i in ids[DATASETS] if i not in datasets]
    orphans += [(ADAPTERS, i) for i in ids[ADAPTERS] if i not in adapters]
    for job_id in ids[JOBS]:
        job = jobs.get(job_id)
        if job is None or (job.kind in TRAINING_KINDS and job.status == "succeeded" and job_id not in with_adapter):
            orphans.append((JOBS, job_id))
    now, removed = time.time(), []
    for kind, id_ in orphans:
        changed = store.modified(kind, id_)
        if changed is None or now - changed < older_than_s:
            continue  # removed meanwhile, or may still be in progress in another process
        store.delete(kind, id_)
        log.warning("removed %s/%s: left without its row by a process that stopped mid-way", kind, id_)
        removed.append(f"{kind}/{id_}")
    return removed

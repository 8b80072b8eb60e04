"""A train job's checkpoints as clients see them (samples, scores, the best one) and promotion of
a checkpoint to an adapter of its own. No torch: the API image reads the safetensors header itself.

The worker scores each checkpoint's validation samples as training writes it (worker/checkpoints.py:
``EvalScore`` rows with ``checkpoint_id``); the best checkpoint is the one with the highest score
in the job's ``select_metric`` (every scorer is higher-is-better), among the checkpoints kept.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, object_session

from api.core.db.models import Adapter, Checkpoint, EvalScore, Job
from api.core.storage import ADAPTERS, ArtifactStore
from api.schemas import CheckpointOut
from styleinject.names import DEFAULT_SELECT_METRIC

GRID_NAME = "samples.png"  # styleinject.train.validation.GRID_NAME (that module imports torch)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_HEADER_BYTES = 100 * 1024**2


def select_metric(job: Job) -> str:
    return (job.params or {}).get("select_metric") or DEFAULT_SELECT_METRIC


def best_checkpoint(job: Job) -> Checkpoint | None:
    """The kept checkpoint with the highest ``select_metric`` score (the later one on a tie)."""
    metric, best, best_value = select_metric(job), None, None
    for checkpoint in job.checkpoints:
        for score in checkpoint.scores:
            if score.metric == metric and (best_value is None or score.value >= best_value):
                best, best_value = checkpoint, score.value
    return best


def checkpoint_outs(job: Job) -> list[CheckpointOut]:
    best = best_checkpoint(job)
    session = object_session(job)
    promoted: dict[int, tuple[str, str]] = {}  # step -> (adapter id, name)
    if session is not None and job.checkpoints:
        query = select(Adapter.source_step, Adapter.id, Adapter.name).where(Adapter.source_job_id == job.id)
        promoted = {step: (id_, name) for step, id_, name in session.execute(query)}
    return [CheckpointOut(
        id=c.id, job_id=c.job_id, adapter_id=c.adapter_id, step=c.step, created_at=c.created_at,
        samples_url=f"/jobs/{job.id}/checkpoints/{c.step}/{GRID_NAME}" if c.samples else None,
        samples=c.samples, scores={s.metric: s.value for s in c.scores}, best=c is best,
        promoted_adapter_id=promoted.get(c.step, (None, None))[0],
        promoted_adapter_name=promoted.get(c.step, (None, None))[1],
    ) for c in job.checkpoints]


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file: 8 bytes little-endian header length, then JSON."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path.name}: safetensors header of {length} bytes")
        header = json.loads(handle.read(length))
    return {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}


def promote(session: Session, store: ArtifactStore, job: Job, checkpoint: Checkpoint, name: str | None) -> Adapter:
    """A new adapter with a copy of the checkpoint's weights (its own artifact, so pruning the
    checkpoint or deleting the job's adapter never touches it) and the checkpoint's scores.
    FileNotFoundError when the checkpoint's files are gone."""
    source = Path(store.localise(checkpoint.path))
    missing = [n for n in ADAPTER_FILES if not (source / n).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint at step {checkpoint.step} has no {', '.join(missing)}")
    params = job.params or {}
    adapter = Adapter(tenant_id=job.tenant_id, kind=job.kind, base_model=params.get("base_model", ""),
                      name=name or f"{params.get('name') or f'{job.kind}-{job.id[:8]}'}-step{checkpoint.step}",
                      source_job_id=job.id, source_step=checkpoint.step, path="")
    session.add(adapter)
    session.flush()  # the id names the artifact
    digest, size = hashlib.sha256(), 0
    for file_name in ADAPTER_FILES:
        data = (source / file_name).read_bytes()
        store.write_bytes(ADAPTERS, adapter.id, file_name, data)
        size += len(data)
        if file_name == "adapter_model.safetensors":
            digest.update(data)  # the engine's caches key adapters by id and content (worker.generation)
    adapter.path = str(store.path_for(ADAPTERS, adapter.id))
    adapter.config = json.loads((source / "adapter_config.json").read_text())
    adapter.meta = safetensors_metadata(source / "adapter_model.safetensors") | {"sha256": digest.hexdigest()}
    adapter.size_bytes = size
    for score in checkpoint.scores:  # details carry the checkpoint's "step", as the job's own adapter's do
        session.add(EvalScore(adapter_id=adapter.id, job_id=job.id, metric=score.metric, value=score.value,
                              details=score.details))
    return adapter


def promoted_from(session: Session, job: Job, step: int) -> Adapter | None:
    return session.scalar(select(Adapter).where(Adapter.source_job_id == job.id, Adapter.source_step == step))

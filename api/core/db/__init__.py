"""Database models, sessions and migrations shared by ``api`` and ``worker`` (no torch)."""

from api.core.db.models import (
    FINISHED,
    TRAIN_KINDS,
    Adapter,
    ApiKey,
    Base,
    Checkpoint,
    Dataset,
    EvalScore,
    GenerationRequest,
    Job,
    JobEvent,
    Tenant,
    new_id,
    utcnow,
)
from api.core.db.session import make_engine, session_factory, session_scope

__all__ = [
    "FINISHED",
    "TRAIN_KINDS",
    "Adapter",
    "ApiKey",
    "Base",
    "Checkpoint",
    "Dataset",
    "EvalScore",
    "GenerationRequest",
    "Job",
    "JobEvent",
    "Tenant",
    "make_engine",
    "new_id",
    "session_factory",
    "session_scope",
    "utcnow",
]

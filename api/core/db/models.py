"""Database tables shared by the API, the worker, the CLI and the Alembic migrations.

Ids are random 32-character hex strings (uuid4), timestamps are stored as naive UTC and returned as
aware UTC. Every tenant-owned row (dataset, job, adapter, generation request) has ``tenant_id``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from styleinject.names import TRAIN_KINDS  # the library owns the training kinds

JOB_KINDS = (*TRAIN_KINDS, "evaluate")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
# What a job_events row records (api/core/jobs.py writes them; GET /jobs/{id}/history reads them).
JOB_EVENT_KINDS = ("status", "progress", "checkpoint", "score")
DATASET_STATUSES = ("validating", "ready", "invalid")
GENERATION_STATUSES = ("queued", "running", "succeeded", "failed", "timeout")
# Webhook events a job can subscribe to ("completed" covers succeeded, failed and cancelled).
WEBHOOK_EVENTS = ("start", "progress", "checkpoint", "completed")
WEBHOOK_DELIVERY_STATUSES = ("pending", "delivered", "failed")


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Naive UTC in the database (SQLite has no time zones), aware UTC in Python."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # HMAC-SHA256 key for webhook signatures; kept in clear (signing needs it), created on first use
    webhook_secret: Mapped[str | None] = mapped_column(String(64))

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant")


class ApiKey(Base):
    """A bearer key: only its public prefix (for lookup) and its SHA-256 are stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    tenant: Mapped[Tenant] = relationship(back_populates="api_keys")


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (CheckConstraint(_in("status", DATASET_STATUSES), name="status"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    # The training kind it was validated for (prompts-only files are valid for distill only).
    kind: Mapped[str] = mapped_column(String(16), default="finetune")
    status: Mapped[str] = mapped_column(String(16), default="validating")
    # Where the validated data lives (extracted folder or prompts file), under the artifact root.
    path: Mapped[str | None] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    format: Mapped[str | None] = mapped_column(String(32))
    num_items: Mapped[int | None] = mapped_column(Integer)
    has_teacher_text: Mapped[bool | None] = mapped_column(Boolean)
    sha256: Mapped[str | None] = mapped_column(String(64))
    # uploaded with skip_bad: unreadable items were left out, and training leaves them out too
    skip_bad: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("kind", JOB_KINDS), name="kind"),
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    # evaluate jobs keep the adapter they score in params["adapter_id"]; a train job's adapter
    # points back at it (adapters.job_id).
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Lease: the worker running the job and until when its claim holds (renewed while it runs).
    worker_id: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # where to POST job events (checked against SSRF at creation and at send time) and which ones
    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON)

    checkpoints: Mapped[list[Checkpoint]] = relationship(
        back_populates="job", order_by="Checkpoint.step", passive_deletes=True
    )
    adapter: Mapped[Adapter | None] = relationship(
        back_populates="job", foreign_keys="Adapter.job_id", uselist=False
    )


class JobEvent(Base):
    """One entry of a job's history: a status change, a progress point, a checkpoint or a score.

    Written only by ``api.core.jobs`` (transition / record_progress / record_event). ``data`` holds
    the details: for ``status`` {"from", ...}; for ``progress`` {"step", "total", "loss", "lr",
    "samples_per_s", "eta_s", ...}; for ``checkpoint`` {"step", "path"}; for ``score`` {"metric",
    "value"}. The integer id orders events of one job.
    """

    __tablename__ = "job_events"
    __table_args__ = (CheckConstraint(_in("kind", JOB_EVENT_KINDS), name="kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str | None] = mapped_column(String(16))
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class WebhookDelivery(Base):
    """One webhook event for a job: the JSON body (without signature, signed at each attempt), how
    many attempts were made and how the last one ended. Written by ``api.core.webhooks``."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint(_in("event", WEBHOOK_EVENTS), name="event"),
        CheckConstraint(_in("status", WEBHOOK_DELIVERY_STATUSES), name="status"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)  # the event id
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(16))
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    response_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Adapter(Base):
    __tablename__ = "adapters"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), unique=True
    )
    name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))
    base_model: Mapped[str] = mapped_column(Text)
    path: Mapped[str] = mapped_column(Text)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    # promoted from a checkpoint (POST /jobs/{id}/checkpoints/{step}/promote): the job and step it
    # came from; null for a train job's own (final) adapter, which job_id links instead
    source_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    source_step: Mapped[int | None] = mapped_column(Integer)

    job: Mapped[Job | None] = relationship(back_populates="adapter", foreign_keys=[job_id])
    checkpoints: Mapped[list[Checkpoint]] = relationship(
        back_populates="adapter", order_by="Checkpoint.step", cascade="all, delete-orphan"
    )
    eval_scores: Mapped[list[EvalScore]] = relationship(
        back_populates="adapter", order_by="EvalScore.created_at", cascade="all, delete-orphan"
    )


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    adapter_id: Mapped[str | None] = mapped_column(
        ForeignKey("adapters.id", ondelete="CASCADE"), index=True
    )
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    # the checkpoint's validation grid (samples.png in its folder): {"prompts", "seeds", ...} as
    # written by styleinject.train.validation; null when it has none
    samples: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="checkpoints")
    adapter: Mapped[Adapter | None] = relationship(back_populates="checkpoints")
    scores: Mapped[list[EvalScore]] = relationship(  # selectin: every job read lists them
        back_populates="checkpoint", order_by="EvalScore.metric", passive_deletes=True, lazy="selectin"
    )


class EvalScore(Base):
    """A score of an adapter (an evaluate job) or of a checkpoint (scored as training writes it:
    ``checkpoint_id`` set, ``adapter_id`` null until the job's adapter exists)."""

    __tablename__ = "eval_scores"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    adapter_id: Mapped[str | None] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    checkpoint_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id", ondelete="CASCADE"), index=True)
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    adapter: Mapped[Adapter | None] = relationship(back_populates="eval_scores")
    checkpoint: Mapped[Checkpoint | None] = relationship(back_populates="scores")


class GenerationRequest(Base):
    __tablename__ = "generation_requests"
    __table_args__ = (CheckConstraint(_in("status", GENERATION_STATUSES), name="status"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    adapter_id: Mapped[str | None] = mapped_column(ForeignKey("adapters.id", ondelete="SET NULL"))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    error: Mapped[str | None] = mapped_column(Text)
    output_dir: Mapped[str | None] = mapped_column(Text)
    duration_s: Mapped[float | None] = mapped_column(Float)
    # steps x width x height x images, for the per-tenant caps; progress {"step", "total"} while running
    cost: Mapped[int] = mapped_column(BigInteger, default=0)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error_code: Mapped[int | None] = mapped_column(Integer)  # the HTTP status a failure answers with
    worker_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class RegisteredModel(Base):
    """A base or teacher model an admin registered (``styleinject model add NAME SOURCE``); tenants
    name it in ``POST /train`` and never pass a path or hub id themselves."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # a hub id, a local diffusers folder or a single-file .safetensors checkpoint (as the worker sees it)
    source: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

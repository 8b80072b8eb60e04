"""Request and response models (they are the OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.core.db.models import (
    DATASET_STATUSES,
    GENERATION_STATUSES,
    JOB_EVENT_KINDS,
    JOB_KINDS,
    JOB_STATUSES,
    WEBHOOK_DELIVERY_STATUSES,
    WEBHOOK_EVENTS,
)
from styleinject.adapters.config import PRESET_FIELDS, StyleInjectConfig
from styleinject.names import (
    A_INITS,
    ADAPTER_PRESETS,
    DEFAULT_SELECT_METRIC,
    MIXED_PRECISIONS,
    SCORER_NAMES,
    TRAIN_KINDS,
)
from styleinject.train.config import TrainConfig, field_default

# Each list of names has one home (the library's styleinject.names, the core's db models); the
# schemas only turn them into Literal types.
TrainKind = Literal[TRAIN_KINDS]
JobStatus = Literal[JOB_STATUSES]
JobKind = Literal[JOB_KINDS]
DatasetStatus = Literal[DATASET_STATUSES]
JobEventKind = Literal[JOB_EVENT_KINDS]
MixedPrecision = Literal[MIXED_PRECISIONS]
ScorerName = Literal[SCORER_NAMES]
AdapterPreset = Literal[ADAPTER_PRESETS]
AInit = Literal[A_INITS]
GenerationStatus = Literal[GENERATION_STATUSES]
WebhookEvent = Literal[WEBHOOK_EVENTS]
WebhookDeliveryStatus = Literal[WEBHOOK_DELIVERY_STATUSES]


def _train_default(name: str):
    return field_default(TrainConfig, name)


def _adapter_default(name: str):
    return field_default(StyleInjectConfig, name)


class ErrorOut(BaseModel):
    message: str = Field(description="What went wrong, in words")
    detail: Any = Field(None, description="Structured details (validation errors) if any")


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# -- datasets -------------------------------------------------------------------------------------

class DatasetOut(_Out):
    id: str
    name: str
    status: DatasetStatus
    format: str | None = None
    num_items: int | None = None
    has_teacher_text: bool | None = None
    sha256: str | None = None
    skip_bad: bool = False
    size_bytes: int
    error: str | None = None
    created_at: datetime


# -- training and jobs ----------------------------------------------------------------------------

class JobWebhook(BaseModel):
    """Webhook fields every job-creating request takes (docs/service.md "Webhooks")."""

    webhook_url: str | None = Field(
        None, max_length=2048, description="POST the job's events here (http or https; signed with the "
        "tenant's secret, GET /webhooks/secret). Private and loopback addresses are refused unless the "
        "admin set STYLEINJECT_WEBHOOK_ALLOW_PRIVATE")
    webhook_events: list[WebhookEvent] | None = Field(
        None, min_length=1, description="Which events to send (default: all). start; progress (at most once per "
        "STYLEINJECT_WEBHOOK_PROGRESS_INTERVAL_S); checkpoint; completed (succeeded, failed or cancelled)")


class AdapterSpec(BaseModel):
    """StyleInjectConfig fields; the defaults are the library's (the paper's r 32, n 16, DMA + STA on
    to_q, plain low rank on to_v; alpha and conv_rank null: equal to rank)."""

    model_config = ConfigDict(extra="forbid")

    rank: int | None = Field(_adapter_default("rank"), ge=1, le=1024)
    num_styles: int | None = Field(_adapter_default("num_styles"), ge=1, le=256)
    alpha: float | None = Field(_adapter_default("alpha"), gt=0)
    target_modules: list[str] | None = Field(default_factory=lambda: _adapter_default("target_modules"))
    style_modules: list[str] | None = Field(default_factory=lambda: _adapter_default("style_modules"))
    conv_target_modules: list[str] | None = Field(default_factory=lambda: _adapter_default("conv_target_modules"))
    conv_rank: int | None = Field(_adapter_default("conv_rank"), ge=1, le=1024)
    dma: bool | None = _adapter_default("dma")
    sta: bool | None = _adapter_default("sta")
    dropout: float | None = Field(_adapter_default("dropout"), ge=0, lt=1)
    keep_router: bool | None = _adapter_default("keep_router")
    sta_bias: bool | None = _adapter_default("sta_bias")
    a_init: AInit | None = Field(_adapter_default("a_init"), description="Initial scale of each A_i: lora "
                                 "(each like a LoRA A) or mixture (x sqrt(n): a uniform router's mixture "
                                 "has a LoRA A's scale)")
    preset: AdapterPreset | None = Field(
        None, exclude=True, description="paper-text (the defaults: the paper's text) or paper-counts (DMA + "
        "STA on to_q and to_v, router kept at n = 1, bias on G: the paper's parameter counts); sets "
        "target_modules, style_modules, keep_router and sta_bias")

    @model_validator(mode="after")
    def _apply_preset(self):
        if self.preset is None:
            return self
        fixed = PRESET_FIELDS[self.preset]
        clash = sorted(n for n in fixed if n in self.model_fields_set and getattr(self, n) != fixed[n])
        if clash:
            raise ValueError(f"preset {self.preset} sets {' and '.join(clash)}; leave "
                             f"{'it' if len(clash) == 1 else 'them'} out")
        for name, value in fixed.items():
            setattr(self, name, value)
        return self


class TrainRequest(JobWebhook):
    """A training job. Defaults are the training engine's (TrainConfig); null takes them too."""

    model_config = ConfigDict(extra="forbid")

    kind: TrainKind = "finetune"
    dataset_id: str
    name: str | None = Field(None, max_length=255, description="Adapter name (default: job id)")
    base_model: str | None = Field(None, max_length=100, description="A registered model's name (GET /models); "
                                   "default: the server's base model")
    teacher_model: str | None = Field(None, max_length=100, description="distill only: a registered model's name "
                                      "(GET /models)")
    steps: int = Field(_train_default("steps"), ge=1)
    resolution: int | None = Field(_train_default("resolution"), ge=8, le=2048, multiple_of=8,
                                   description="Training image side; default: the base model's native size")
    batch_size: int | None = Field(_train_default("batch_size"), ge=1, le=256)
    gradient_accumulation_steps: int | None = Field(_train_default("gradient_accumulation_steps"), ge=1, le=1024)
    learning_rate: float | None = Field(_train_default("learning_rate"), gt=0, le=1)
    seed: int | None = Field(_train_default("seed"), ge=0)
    mixed_precision: MixedPrecision | None = _train_default("mixed_precision")
    gradient_checkpointing: bool | None = _train_default("gradient_checkpointing")
    checkpoint_every: int | None = Field(_train_default("checkpoint_every"), ge=1)
    keep_checkpoints: int | None = Field(_train_default("keep_checkpoints"), ge=1, le=100)
    validation_every: int | None = Field(_train_default("validation_every"), ge=0)
    validation_prompts: list[str] | None = Field(default_factory=lambda: _train_default("validation_prompts"),
                                                 description="Prompts of the validation grid; default: the "
                                                 "first captions of the dataset (dreambooth: instance_prompt)")
    validation_seeds: list[int] | None = Field(default_factory=lambda: _train_default("validation_seeds"),
                                               min_length=1, max_length=8,
                                               description="Sampling seeds of the validation grid (one column each)")
    sample_steps: int | None = Field(_train_default("sample_steps"), ge=1, le=200,
                                     description="Denoising steps of the validation grids (and of a distillation "
                                     "teacher's samples and DreamBooth's class images)")
    checkpoint_samples: bool = Field(True, description="Render the validation grid into every checkpoint "
                                     "(GET /jobs/{id}/checkpoints/{step}/samples.png) and score it with the "
                                     "server's checkpoint scorers; the library's default is off")
    select_metric: ScorerName = Field(DEFAULT_SELECT_METRIC, description="The score that marks a job's best checkpoint "
                                      "(highest wins) among those the server's checkpoint scorers give")
    instance_prompt: str | None = Field(_train_default("instance_prompt"),
                                        description="dreambooth: the identifier prompt")
    class_prompt: str | None = Field(_train_default("class_prompt"),
                                     description="dreambooth: prior-preservation prompt")
    adapter: AdapterSpec | None = Field(None, description="Default: the library's StyleInjectConfig")


class ProgressOut(BaseModel):
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    lr: float | None = None
    samples_per_s: float | None = None
    eta_s: float | None = None
    terms: dict[str, float | None] = Field({}, description="Per-term losses of a multi-term loss (distill: "
                                           "loss_out_kd, loss_feat_kd; dreambooth with a class prompt: "
                                           "loss_instance, loss_prior); empty for a single-term loss")


class CheckpointOut(_Out):
    id: str
    job_id: str
    adapter_id: str | None = None
    step: int
    created_at: datetime
    samples_url: str | None = Field(None, description="The validation grid (PNG: a row per prompt, a column "
                                    "per seed), if the job renders one")
    samples: dict[str, Any] | None = Field(None, description="The grid's prompts, seeds and sampling settings")
    scores: dict[str, float] = Field({}, description="Metric -> mean score of the grid's images")
    best: bool = Field(False, description="Highest score in the job's select_metric among the kept checkpoints")
    promoted_adapter_id: str | None = Field(None, description="The adapter promoted from this checkpoint, if any")
    promoted_adapter_name: str | None = None


class JobOut(BaseModel):
    id: str
    kind: JobKind
    status: JobStatus
    dataset_id: str | None = None
    adapter_id: str | None = Field(
        None, description="train jobs: the adapter produced (once succeeded); evaluate: the one scored"
    )
    params: dict[str, Any]
    progress: ProgressOut | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    cancel_requested: bool
    attempts: int
    worker_id: str | None = None
    checkpoints: list[CheckpointOut] = []
    webhook_url: str | None = None
    webhook_events: list[WebhookEvent] | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime


class JobEventOut(_Out):
    id: int
    at: datetime
    kind: JobEventKind
    status: str | None = Field(None, description="status events: the new status; progress: running")
    data: dict[str, Any] | None = Field(
        None, description="status: {from (null when created), error?, worker_id?, attempt?}; progress: {step, total, loss, lr, "
        "samples_per_s, eta_s, terms}; checkpoint: {step, name}; score: {metric, value, step?} (step: a "
        "checkpoint's score while training; error instead of value when its scorer failed)")


class JobHistoryOut(BaseModel):
    job_id: str
    status: JobStatus
    events: list[JobEventOut]


# -- adapters -------------------------------------------------------------------------------------

class EvalScoreOut(_Out):
    id: str
    job_id: str | None = None
    metric: str
    value: float
    details: dict[str, Any] | None = None
    created_at: datetime


class AdapterOut(BaseModel):
    id: str
    name: str
    kind: str
    base_model: str
    job_id: str | None = None
    source_job_id: str | None = Field(None, description="Promoted from a checkpoint: the job it came from")
    source_step: int | None = Field(None, description="Promoted from a checkpoint: its step")
    config: dict[str, Any]
    metadata: dict[str, Any]
    size_bytes: int
    created_at: datetime


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=255, description="Default: the job's adapter name + -stepN")


class AdapterDetail(AdapterOut):
    checkpoints: list[CheckpointOut]
    eval_scores: list[EvalScoreOut]


# -- generation and evaluation --------------------------------------------------------------------

class AdapterChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64)
    scale: float = Field(1.0, ge=-4, le=4, allow_inf_nan=False)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=4000)
    negative_prompt: str | None = Field(None, max_length=4000)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Random if unset (returned)")
    steps: int | None = Field(None, ge=1, description="Default: the model's (30 unless its folder says "
                              "otherwise). Bounded by STYLEINJECT_MAX_INFERENCE_STEPS")
    guidance_scale: float | None = Field(None, ge=0, le=50, description="Default: the model's (7.5 unless its "
                                         "folder says otherwise)")
    width: int | None = Field(None, ge=8, multiple_of=8, description="Default: the model's native size (512 for "
                              "SD 1.5, 32 for the demo model). Bounded by STYLEINJECT_MAX_IMAGE_SIZE")
    height: int | None = Field(None, ge=8, multiple_of=8, description="Default: as width")
    num_images: int = Field(1, ge=1, description="Bounded by STYLEINJECT_MAX_NUM_IMAGES")
    adapter_id: str | None = Field(None, description="One adapter (or use `adapters` for several)")
    adapter_scale: float = Field(1.0, ge=-4, le=4)
    adapters: list[AdapterChoice] | None = Field(
        None, description="Several adapters, each with its weight; their effects add up (like diffusers "
        "`set_adapters`). Not together with `adapter_id`. At most STYLEINJECT_MAX_ADAPTERS_PER_REQUEST")

    @model_validator(mode="after")
    def _one_way_to_choose(self):
        if self.adapters is not None and self.adapter_id is not None:
            raise ValueError("give adapter_id (+ adapter_scale) or adapters, not both")
        return self

    def choices(self) -> list[AdapterChoice]:
        if self.adapters is not None:
            return list(self.adapters)
        return [] if self.adapter_id is None else [AdapterChoice(id=self.adapter_id, scale=self.adapter_scale)]


class GenerationOut(BaseModel):
    """A generation request: queued, running (with progress) or finished."""

    id: str
    status: GenerationStatus
    queue_position: int | None = Field(None, description="Requests queued ahead of this one (0 = next); "
                                       "null once it runs")
    progress: dict[str, Any] | None = Field(None, description='{"step": ..., "total": ...} while running')
    error: str | None = None
    images: list[str] = Field([], description="URLs of the PNGs (GET with your key), once succeeded")
    params: dict[str, Any]
    adapters: list[AdapterChoice]
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None


class GenerateOut(BaseModel):
    id: str
    images: list[str] = Field(description="PNG files, base64-encoded")
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    adapter_id: str | None = None
    adapter_scale: float
    adapters: list[AdapterChoice] = []
    duration_s: float | None = None


class EvaluateRequest(JobWebhook):
    model_config = ConfigDict(extra="forbid")

    adapter_id: str
    prompts: list[str] | None = Field(None, description="Default: the evaluator's prompt suite")
    scorers: list[ScorerName] | None = Field(
        None, description="Default: clipscore. Weights come from STYLEINJECT_SCORER_PATHS"
    )
    seeds: list[int] | None = Field(None, description="Default: the evaluator's seeds")
    steps: int | None = Field(None, ge=1, le=150)
    guidance_scale: float | None = Field(None, ge=0, le=50)
    width: int | None = Field(None, ge=8, le=2048, multiple_of=8)
    height: int | None = Field(None, ge=8, le=2048, multiple_of=8)
    negative_prompt: str | None = None
    adapter_scale: float | None = Field(None, ge=-4, le=4)


class ModelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", description="What tenants call it")
    source: str = Field(min_length=1, max_length=1000, description="Hub id, diffusers folder or single-file "
                        ".safetensors checkpoint, as the workers see it")


class ModelOut(BaseModel):
    name: str
    source: str | None = Field(None, description="Shown to the admin only")
    created_at: datetime


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    database: bool
    version: str


# -- webhooks -------------------------------------------------------------------------------------

class WebhookSecretOut(BaseModel):
    secret: str = Field(description="HMAC-SHA256 key of this tenant's webhook signatures; keep it secret")
    header: str = Field(description="The header that carries the signature: t=<unix time>,v1=<hex HMAC-SHA256 "
                        "of '<t>.<body>'>")


class WebhookDeliveryOut(_Out):
    id: str = Field(description="The event id (the body's id and X-StyleInject-Delivery; the same on retries)")
    job_id: str
    event: WebhookEvent
    url: str
    status: WebhookDeliveryStatus
    attempts: int
    response_code: int | None = Field(None, description="The HTTP status of the last attempt")
    error: str | None = Field(None, description="Why the last attempt failed")
    created_at: datetime
    finished_at: datetime | None = None

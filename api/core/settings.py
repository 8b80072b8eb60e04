"""One Settings object for the API, the worker, the CLI and migrations/env.py.

Every field reads the environment variable ``STYLEINJECT_<FIELD>`` (e.g. ``STYLEINJECT_DATABASE_URL``).
Unset locations derive from ``home`` so the embedded default needs no configuration at all:

    home/styleinject.db   database        home/broker.db   Celery broker (kombu SQLAlchemy transport)
    home/results.db       Celery results  home/artifacts/  datasets, adapters, checkpoints, images

Code that has a Settings passes it on (``create_app(settings)``, ``make_celery(settings)``); a child
process gets it as environment variables (``settings.to_env()``), never via this process's os.environ.
"""

from __future__ import annotations

import functools
import json
import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "STYLEINJECT_"


class Settings(BaseSettings):
    # An empty variable counts as unset (compose passes `${VAR:-}` through as "").
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", env_ignore_empty=True)

    home: Path = Path("~/.styleinject")
    database_url: str | None = None
    broker_url: str | None = None
    result_backend: str | None = None
    # Prefix for every Redis key the broker writes (kombu ``global_keyprefix``), so several
    # deployments (or test runs) can share one Redis.
    broker_key_prefix: str = ""
    # A local folder, or object storage: s3://bucket/prefix (AWS S3, MinIO, R2; docs/ops.md). Then
    # each process keeps what it fetches in artifact_cache_dir (default home/artifact-cache), at most
    # artifact_cache_bytes (least recently used first); s3_endpoint_url for MinIO / R2, credentials
    # from the usual AWS_* variables or ~/.aws.
    artifact_root: Path | str | None = None
    artifact_cache_dir: Path | None = None
    artifact_cache_bytes: int = 20 * 1024**3
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    base_model: str | None = None
    bootstrap_key: SecretStr | None = None
    # Evaluation scorer weights (hub ids or local folders), JSON: {"clipscore": "/models/clip", ...}
    scorer_paths: dict[str, str] = {}
    # Scorers of every checkpoint's validation grid while a job trains (JSON list of scorer names;
    # [] = off). Unset: only weights on this machine (never a hub download mid-job): clipscore if
    # scorer_paths names CLIP weights; on the toy base model clipscore (the packaged toy CLIP unless
    # scorer_paths names another) and toystyle.
    checkpoint_scorers: list[str] | None = None

    # Limits.
    max_upload_bytes: int = 2 * 1024**3
    # POST /adapters/import: a LoRA file is read into memory to convert it (SDXL LoRAs are up to ~900 MB)
    max_lora_upload_bytes: int = 1024**3
    max_image_size: int = 1024
    max_num_images: int = 4
    max_inference_steps: int = 150
    max_train_steps: int = 100_000
    max_json_bytes: int = 1024**2  # any request body but the streamed dataset upload (413 above)
    max_json_depth: int = 32  # nesting of a JSON body (422 deeper)
    # An uploaded archive of N bytes may expand to at most max(ratio x N, 1 MiB) (counted while extracting).
    max_extract_ratio: float = 20.0
    # An uploaded image's width x height, read from its header before any pixel is decoded. Lowering it
    # is fine; the default is PIL's own decompression-bomb bound, which stays on above it.
    max_image_pixels: int = Field(89_478_485, gt=0, le=89_478_485)

    # Serving (the generate worker's engine; docs/service.md "The serving engine").
    engine_max_batch: int = 32  # UNet rows per forward (a request with guidance counts 2 per image)
    engine_slots: int = 16  # device tier: adapters resident in the engine's slot table (+ the base model)
    engine_host_bytes: int = 2 * 1024**3  # host tier: adapter tensors kept in memory (LRU)
    generate_concurrency: int = 64  # generate tasks one worker holds at once (all batched by its engine)
    engine_compile: str = ""  # a torch.compile backend for the engine's UNet ("inductor" on a GPU); "" = eager
    max_adapters_per_request: int = 4
    # Per tenant: requests queued or running, and their summed cost (steps x width x height x images).
    # The default cost cap admits two of the largest requests the limits above allow.
    tenant_max_pending_generations: int = 256
    tenant_max_generation_cost: int = 2 * 150 * 1024 * 1024 * 4

    # Data-parallel processes per training job (one per GPU the worker owns): above 1 the train task
    # runs the loop under `accelerate launch` (worker/distributed.py); gloo on the CPU without CUDA.
    train_processes: int = 1

    # Metrics (docs/ops.md): GET /metrics takes an admin key or this token; with a port set the API
    # and each worker also serve the page, without auth, on that port (keep it on a private network).
    metrics_token: SecretStr | None = None
    metrics_port: int | None = None

    # Webhooks (docs/service.md "Webhooks"). Jobs may POST to private, loopback, link-local or
    # reserved addresses only with webhook_allow_private (SSRF; an admin's choice for an internal
    # receiver). A delivery is tried at most webhook_max_attempts times, the n-th retry after
    # webhook_backoff_s x 2^(n-1) seconds (at most an hour); progress events at most once per
    # webhook_progress_interval_s per job.
    webhook_allow_private: bool = False
    webhook_timeout_s: float = Field(10.0, gt=0, le=60)
    webhook_max_attempts: int = Field(6, ge=1, le=20)
    webhook_backoff_s: float = Field(10.0, ge=0)
    webhook_progress_interval_s: float = Field(30.0, ge=0)

    # Logs (docs/ops.md "Logs"): "text" or "json" (one object per line) for the API, the workers and
    # `styleinject serve`'s children; every line carries the request id.
    log_format: Literal["text", "json"] = "text"

    # Timeouts (seconds).
    generate_timeout_s: float = 300.0
    job_soft_time_limit_s: int = 48 * 3600
    job_time_limit_s: int = 48 * 3600 + 600
    generate_time_limit_s: int = 900
    lease_ttl_s: int = 120
    progress_interval_s: float = 1.0
    max_attempts: int = 3

    def model_post_init(self, __context: object) -> None:
        self.home = Path(self.home).expanduser().resolve()
        if self.artifact_root is None:
            self.artifact_root = self.home / "artifacts"
        if not self.object_storage:
            self.artifact_root = Path(self.artifact_root).expanduser().resolve()
        if self.artifact_cache_dir is None:
            self.artifact_cache_dir = self.home / "artifact-cache"
        self.artifact_cache_dir = Path(self.artifact_cache_dir).expanduser().resolve()
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.home / 'styleinject.db'}"
        if self.broker_url is None:
            self.broker_url = f"sqla+sqlite:///{self.home / 'broker.db'}"
        if self.result_backend is None:
            if self.broker_url.startswith(("redis://", "rediss://")):
                self.result_backend = self.broker_url
            else:
                self.result_backend = f"db+sqlite:///{self.home / 'results.db'}"

    # Longer than the longest job, so Redis never re-delivers a task that is still running.
    @property
    def visibility_timeout_s(self) -> int:
        return self.job_time_limit_s + 3600

    @property
    def object_storage(self) -> bool:
        """STYLEINJECT_ARTIFACT_ROOT is an s3:// URL (not a local folder)."""
        return isinstance(self.artifact_root, str) and self.artifact_root.startswith("s3://")

    @property
    def embedded(self) -> bool:
        return not self.broker_url.startswith(("redis://", "rediss://", "amqp://", "amqps://"))

    def resolved_base_model(self) -> str:
        """STYLEINJECT_BASE_MODEL, else the demo model shipped with the package (the toy base)."""
        if self.base_model:
            return self.base_model
        from styleinject.assets import TOY_BASE

        return str(TOY_BASE)

    def to_env(self) -> dict[str, str]:
        """The environment that makes a child process (worker, alembic) see these settings."""
        env: dict[str, str] = {}
        for name in Settings.model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, (dict, list)):
                value = json.dumps(value)
            env[ENV_PREFIX + name.upper()] = str(value)
        return env


_configured: Settings | None = None


@functools.lru_cache(maxsize=1)
def _from_environment() -> Settings:
    return Settings()


def get_settings() -> Settings:
    """The process settings: what ``configure_settings`` set, else read once from the environment.

    The API gets its settings passed explicitly (``create_app(settings)``); this is for processes
    that run one configuration (a worker, ``alembic`` run from the command line)."""
    return _configured if _configured is not None else _from_environment()


def configure_settings(settings: Settings | None) -> None:
    """Make ``settings`` this process's settings (``styleinject worker --home ...``); None: back to
    the environment. Never writes ``os.environ``."""
    global _configured
    _configured = settings
    _from_environment.cache_clear()


def _clear() -> None:
    configure_settings(None)


get_settings.cache_clear = _clear  # type: ignore[attr-defined]  # tests re-read the environment


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"

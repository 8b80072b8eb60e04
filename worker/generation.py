"""The generate task's work: hand each request to this process's serving engine and wait for it.

One engine per generate worker process owns the resident base model; the worker's thread pool
(``--pool threads --concurrency STYLEINJECT_GENERATE_CONCURRENCY``) lets many tasks wait at once,
and the engine batches all of them (styleinject.serving: continuous batching across requests and
adapters). A task thread never touches the model: it submits, then waits on the future while it
writes the request's progress to its row, so the engine loop never waits on the database.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import logging
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import update

from api.core.db.models import Adapter, GenerationRequest, utcnow
from api.core.db.session import session_scope
from api.core.settings import Settings
from api.core.storage import GENERATIONS, ArtifactStore, make_store

log = logging.getLogger("worker.generation")

PROGRESS_INTERVAL_S = 0.5


class Engines:
    """The resident base model and its engine (one per process). A request for another base model
    waits until the current engine has drained, then the model is replaced."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._base: str | None = None
        self._engine = None

    def get(self, base_model: str, settings: Settings):
        from styleinject.pipeline import load_pipeline
        from styleinject.serving import engine_for

        while True:
            with self._lock:
                if self._base == base_model:
                    return self._engine
                old = self._engine
                if old is None or not (old.scheduler.waiting or old.scheduler.num_active):
                    if old is not None:
                        old.stop()
                    self._engine = self._base = None  # free the old model before loading the next
                    pipe = load_pipeline(base_model)
                    pipe.set_progress_bar_config(disable=True)
                    self._engine = engine_for(pipe, max_batch=settings.engine_max_batch, slots=settings.engine_slots + 1,
                                              host_bytes=settings.engine_host_bytes,
                                              compile_backend=settings.engine_compile or None)
                    self._base = base_model
                    return self._engine
            time.sleep(0.2)

    def stats(self) -> dict[str, Any] | None:
        engine = self._engine
        return None if engine is None else engine.stats()


ENGINES = Engines()
_HASHES: dict[tuple[str, int, int], str] = {}


def content_hash(folder: str | Path) -> str:
    """sha256 of the adapter's weights file (memoised per path, size and mtime)."""
    from styleinject.adapters.io import WEIGHTS_NAME

    path = Path(folder) / WEIGHTS_NAME
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


class GenerationFailed(Exception):
    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


def run_generation(settings: Settings, request_id: str, worker_id: str, localise) -> dict[str, Any]:
    """Claim the request, run it on the engine, store its PNGs; the row says how it ended."""
    with session_scope(settings.database_url) as session:
        claimed = session.execute(
            update(GenerationRequest)
            .where(GenerationRequest.id == request_id, GenerationRequest.status == "queued")
            .values(status="running", worker_id=worker_id, started_at=utcnow())
        ).rowcount
        if not claimed:  # the API gave up waiting, or this is a redelivery
            return {"ok": False, "skipped": True}
        row = session.get(GenerationRequest, request_id)
        params = dict(row.params)
        choices = params.get("adapters")
        if choices is None:  # rows written before several adapters per request
            choices = [] if row.adapter_id is None else [{"id": row.adapter_id, "scale": params.get("adapter_scale", 1.0)}]
        adapters = []
        for choice in choices:
            adapter = session.get(Adapter, choice["id"])
            adapters.append(None if adapter is None else
                            (adapter.id, adapter.path, adapter.base_model, (adapter.meta or {}).get("sha256"),
                             float(choice["scale"])))
    store = make_store(settings)
    started = time.perf_counter()
    try:
        images, resolved, stats = _run(settings, store, request_id, params, adapters, localise)
    except GenerationFailed as exc:
        _finish(settings, request_id, status="failed", error=str(exc), error_code=exc.status_code)
        return {"ok": False, "error": str(exc), "status_code": exc.status_code}
    for index, image in enumerate(images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        store.write_bytes(GENERATIONS, request_id, f"{index}.png", buffer.getvalue())
    _finish(settings, request_id, status="succeeded", params={**params, **resolved},
            output_dir=str(store.path_for(GENERATIONS, request_id)), duration_s=round(time.perf_counter() - started, 3))
    return {"ok": True, "engine": stats}


def _run(settings: Settings, store: ArtifactStore, request_id: str, params: dict, adapters: list, localise):
    from styleinject.adapters import AdapterLoadError
    from styleinject.errors import api_message
    from styleinject.serving import AdapterRef, Request
    from styleinject.serving.defaults import generation_defaults

    refs, bases = [], set()
    for entry in adapters:
        if entry is None:
            raise GenerationFailed("the adapter was deleted", 404)
        adapter_id, path, base_model, sha, scale = entry
        local = localise(store, path)
        if not local or not Path(local).is_dir():
            raise GenerationFailed("the adapter was deleted", 404)
        refs.append(AdapterRef(local, scale, key=f"{adapter_id}@{sha or content_hash(local)}"))
        bases.add(base_model)
    base_model = bases.pop() if len(bases) == 1 else settings.resolved_base_model()
    try:
        engine = ENGINES.get(base_model, settings)
    except Exception as exc:  # noqa: BLE001 - a base model that does not load fails this request, not the worker
        log.exception("loading base model %s failed", base_model)
        raise GenerationFailed(f"the base model {base_model} could not be loaded: {exc}", 500) from None
    # unset sampling options take the model's defaults; the resolved values go back to the client
    resolved = {key: value if params.get(key) is None else params[key]
                for key, value in generation_defaults(engine.pipe).items()}
    if max(resolved["width"], resolved["height"]) > settings.max_image_size:
        raise GenerationFailed(f"the model's default size {resolved['width']}x{resolved['height']} exceeds "
                               f"STYLEINJECT_MAX_IMAGE_SIZE={settings.max_image_size}; pass width and height", 422)
    progress: dict[str, int] = {}
    request = Request(params["prompt"], negative_prompt=params.get("negative_prompt"), seed=params["seed"],
                      num_images=params["num_images"], adapters=refs, id=request_id,
                      progress=lambda step, total: progress.update(step=step, total=total), **resolved)
    try:
        future = engine.submit(request)
    except (ValueError, FileNotFoundError, AdapterLoadError) as exc:
        raise GenerationFailed(api_message(exc), 422) from None
    deadline = time.monotonic() + settings.generate_time_limit_s
    written = None
    while True:
        try:
            images = future.result(timeout=PROGRESS_INTERVAL_S)
            break
        except concurrent.futures.TimeoutError:
            if time.monotonic() > deadline:
                engine.cancel(request_id)
                raise GenerationFailed(f"generation exceeded {settings.generate_time_limit_s} s "
                                       "(STYLEINJECT_GENERATE_TIME_LIMIT_S)", 504) from None
            if progress and progress != written:
                written = dict(progress)
                _progress(settings, request_id, written)
        except (ValueError, AdapterLoadError) as exc:
            raise GenerationFailed(api_message(exc), 422) from None
        except Exception as exc:  # noqa: BLE001
            log.exception("generation %s failed", request_id)
            raise GenerationFailed(f"{type(exc).__name__}: {exc}", 500) from None
    return images, resolved, engine.stats()


def _progress(settings: Settings, request_id: str, progress: dict) -> None:
    with session_scope(settings.database_url) as session:
        session.execute(update(GenerationRequest).where(GenerationRequest.id == request_id,
                                                        GenerationRequest.status == "running")
                        .values(progress=progress))


def _finish(settings: Settings, request_id: str, **values: Any) -> None:
    with session_scope(settings.database_url) as session:
        session.execute(update(GenerationRequest).where(GenerationRequest.id == request_id)
                        .values(finished_at=utcnow(), **values))

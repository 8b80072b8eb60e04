"""The serving engine: one loop that owns the pipeline and batches every request it is given.

    engine = Engine(pipe, max_batch=32, slots=16)
    future = engine.submit(Request("a red circle", seed=0, adapters=[AdapterRef("out/stripes")]))
    images = future.result()

Each turn of the loop (vLLM's engine/scheduler/runner split):
  1. admit waiting requests (scheduler): pin their adapters in device slots, encode prompts, draw
     initial latents;
  2. run one denoising step for every active request of one latent size (runner): a single
     UNet forward whose samples each carry their own timestep, guidance, generator and adapters;
  3. retire finished requests: decode, release their slots, resolve their futures.
The loop runs on a background thread started by the first ``submit``; ``step()`` runs one turn
by hand (tests, benchmarks). Torch only: no web, database or queue code here.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace

import torch
from PIL import Image

from styleinject.serving.defaults import check_size, generation_defaults
from styleinject.serving.request import Active, Request
from styleinject.serving.runner import Runner
from styleinject.serving.scheduler import Scheduler
from styleinject.serving.slots import SlotsBusy, SlotTable
from styleinject.serving.tiers import AdapterRef, HostCache

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    steps: int = 0  # UNet forwards
    rows: int = 0  # UNet rows summed over forwards (rows / steps = mean batch)
    finished: int = 0
    failed: int = 0
    step_seconds: float = 0.0


class Engine:
    def __init__(self, pipe, *, max_batch: int = 32, slots: int = 16, host_bytes: int = 2 << 30,
                 compile_backend: str | None = None, autostart: bool = True) -> None:
        self.pipe = pipe
        self.table = SlotTable(pipe.unet, num_slots=slots)
        self.host = HostCache(host_bytes)
        self.scheduler = Scheduler(max_batch)
        self.runner = Runner(pipe, self.table, compile_backend)
        self.counters = EngineStats()
        # held while the model runs a step; a caller that runs the pipeline directly (a named
        # adapter) takes it too, so the two never interleave inside a forward
        self.lock = threading.RLock()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._cancelled: set[str] = set()
        self.autostart = autostart  # False: nothing runs until step() is called (tests, benchmarks)

    # -- the public side ---------------------------------------------------------------------

    def resolve(self, request: Request) -> Request:
        """The request with the model's defaults filled in; ValueError for out-of-range values."""
        defaults = generation_defaults(self.pipe)
        request = replace(request, **{k: defaults[k] for k in ("steps", "guidance_scale", "width", "height")
                                      if getattr(request, k) is None})
        check_size(request.width, request.height, self.pipe.vae_scale_factor)
        if request.steps < 1 or request.num_images < 1:
            raise ValueError(f"steps and num_images must be >= 1 (got {request.steps}, {request.num_images})")
        if not request.prompts:
            raise ValueError("prompt: give at least one prompt")
        request.adapters_per_prompt()  # checks its shape
        return request

    def submit(self, request: Request) -> Future:
        """Queue a request; its future resolves to a list of PIL images (or the error).

        Bad options and unreadable adapters raise here, in the caller's thread; reading the
        adapters from disk also happens here, so the loop never waits on the disk."""
        request = self.resolve(request)
        for refs in request.adapters_per_prompt():
            for ref in refs:
                self.host.get(ref)
        future: Future = Future()
        with self._wake:
            self.scheduler.waiting.append((request, future))
            self._wake.notify()
        if self.autostart:
            self._start()
        return future

    def generate(self, request: Request) -> list[Image.Image]:
        return self.submit(request).result()

    def cancel(self, request_id: str) -> None:
        """Drop a request, waiting or running (it leaves the batch before the next step; its future
        raises ``CancelledError``)."""
        with self._wake:
            self._cancelled.add(request_id)
            self._wake.notify()

    def position(self, request_id: str) -> int | None:
        return self.scheduler.position(request_id)

    def stats(self) -> dict:
        c, slots, host = self.counters, self.table.stats, self.host.stats
        return {
            "waiting": len(self.scheduler.waiting), "active": self.scheduler.num_active,
            "steps": c.steps, "mean_batch_rows": c.rows / c.steps if c.steps else 0.0,
            "finished": c.finished, "failed": c.failed, "step_seconds": c.step_seconds,
            "device_slots": self.table.num_slots - 1, "device_resident": len(self.table.resident()),
            "device_hits": slots.hits, "device_misses": slots.misses, "device_evictions": slots.evictions,
            "device_bytes": self.table.nbytes, "device_grows": slots.grows,
            "host_entries": len(self.host), "host_bytes": self.host.nbytes, "host_max_bytes": self.host.max_bytes,
            "host_hits": host.hits, "host_misses": host.misses, "host_evictions": host.evictions,
        }

    def stop(self, timeout: float | None = 10) -> None:
        self._stopping = True
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the loop ----------------------------------------------------------------------------

    def _start(self) -> None:
        with self._wake:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="styleinject-engine", daemon=True)
                self._thread.start()
                # end the loop between two steps before the interpreter tears torch down under it
                atexit.register(self.stop)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.scheduler.waiting and not self.scheduler.num_active:
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # noqa: BLE001 - never let the loop die; step() already failed the batch
                log.exception("engine step failed")

    def step(self) -> bool:
        """One turn: admit, one denoising step for one batch, retire. False when there was no work."""
        with self.lock:
            self._drop_cancelled()
            self._admit()
            batch = self.scheduler.next_batch()
            if batch:
                started = time.perf_counter()
                try:
                    self.runner.step(batch)
                except Exception as exc:  # noqa: BLE001 - the requests in this batch fail, the engine goes on
                    log.exception("denoising step failed for %d requests", len(batch))
                    for active in list(batch):
                        self.scheduler.remove(active)
                        self._finish(active, error=exc)
                    return True
                self.counters.steps += 1
                self.counters.rows += sum(a.unet_rows for a in batch)
                self.counters.step_seconds += time.perf_counter() - started
                for active in batch:
                    if active.request.progress is not None:
                        try:
                            active.request.progress(active.index, len(active.timesteps))
                        except Exception:  # noqa: BLE001 - a caller's callback must not stop the batch
                            log.exception("progress callback failed")
            for active in self.scheduler.retire():
                try:
                    images = self.runner.decode(active)
                except Exception as exc:  # noqa: BLE001
                    self._finish(active, error=exc)
                else:
                    self._finish(active, images=images)
            return bool(batch)

    def _drop_cancelled(self) -> None:
        with self._wake:
            cancelled, self._cancelled = self._cancelled, set()
        if not cancelled:
            return
        for request, future in [w for w in self.scheduler.waiting if w[0].id in cancelled]:
            self._dequeue(request)
            future.cancel()
        for group in list(self.scheduler.active.values()):
            for active in [a for a in group if a.request.id in cancelled]:
                self.scheduler.remove(active)
                self._finish(active, error=concurrent.futures.CancelledError(f"request {active.request.id} cancelled"))

    def _admit(self) -> None:
        with self._wake:
            waiting = list(self.scheduler.waiting)
        for request, future in waiting:
            if future.cancelled():
                self._dequeue(request)
                continue
            cfg = request.guidance_scale > 1 and self.pipe.unet.config.time_cond_proj_dim is None
            rows = len(request.prompts) * request.num_images * (2 if cfg else 1)
            if not self.scheduler.fits((request.height, request.width), rows):
                continue
            try:
                pinned = self._pin(request)
            except SlotsBusy:
                continue  # its adapters wait for a slot to free; smaller or resident ones go ahead
            except Exception as exc:  # noqa: BLE001 - e.g. a corrupt or mismatched adapter
                self._dequeue(request)
                future.set_exception(exc)
                self.counters.failed += 1
                continue
            self._dequeue(request)
            keys, ids, weights = pinned
            if not future.set_running_or_notify_cancel():
                self._release(keys)
                continue
            try:
                active = self.runner.prepare(request, future, ids, weights, keys)
            except Exception as exc:  # noqa: BLE001
                self._release(keys)
                future.set_exception(exc)
                self.counters.failed += 1
                continue
            self.scheduler.add(active)

    def _pin(self, request: Request) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Acquire a device slot for each adapter of the request; per-row slot ids and weights."""
        per_prompt = request.adapters_per_prompt()
        width = max(1, max(len(refs) for refs in per_prompt))
        keys: list[str] = []
        slot_of: dict[str, int] = {}
        try:
            for refs in per_prompt:
                for ref in refs:
                    key, cfg, tensors = self.host.get(ref)
                    if key not in slot_of:
                        slot_of[key] = self.table.acquire(key, cfg, tensors)
                        keys.append(key)
        except BaseException:
            self._release(keys)
            raise
        ids = torch.zeros(len(per_prompt), width, dtype=torch.long)
        weights = torch.zeros(len(per_prompt), width, dtype=torch.float64)
        for p, refs in enumerate(per_prompt):
            for k, ref in enumerate(refs):
                ids[p, k] = slot_of[ref.cache_key()]
                weights[p, k] = ref.scale
        # rows are [prompt 0 x num_images, prompt 1 x num_images, ...], as diffusers orders them
        return keys, ids.repeat_interleave(request.num_images, 0), weights.repeat_interleave(request.num_images, 0)

    def _release(self, keys: list[str]) -> None:
        for key in keys:
            self.table.release(key)

    def _dequeue(self, request: Request) -> None:
        with self._wake:
            for index, (queued, _) in enumerate(self.scheduler.waiting):
                if queued is request:
                    del self.scheduler.waiting[index]
                    return

    def _finish(self, active: Active, images: list | None = None, error: BaseException | None = None) -> None:
        self._release(active.keys)
        if error is not None:
            self.counters.failed += 1
            active.future.set_exception(error)
        else:
            self.counters.finished += 1
            active.future.set_result(images)


_ENGINES_LOCK = threading.Lock()


def engine_for(pipe, **options) -> Engine:
    """The pipeline's engine, created on first use (``options`` apply only then)."""
    with _ENGINES_LOCK:
        engine = getattr(pipe, "_styleinject_engine", None)
        if engine is None:
            engine = Engine(pipe, **options)
            pipe._styleinject_engine = engine
        return engine


__all__ = ["AdapterRef", "Engine", "Request", "engine_for"]

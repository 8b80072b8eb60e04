"""The worker's metrics: heartbeats, task outcomes and run time, training throughput, and the
serving engine's counters (sampled from ``Engine.stats()`` of this process's engine).

Serving: with ``STYLEINJECT_METRICS_PORT`` set, the worker's main process serves ``/metrics`` on
that port (``worker_init``). Tasks of a prefork worker run in child processes, so ``styleinject
worker`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder when none is set and the pool is
prefork; the main process then serves the sum of its children (docs/ops.md). A threads or solo
pool runs tasks in the main process and needs no folder.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from celery.signals import task_postrun, task_prerun, worker_init, worker_process_init, worker_process_shutdown

from api.core import metrics as m
from api.core.settings import get_settings

log = logging.getLogger("worker.metrics")

SAMPLE_INTERVAL_S = 1.0
HEARTBEAT_INTERVAL_S = 5.0

# Engine.stats() key -> counter (cumulative in the engine; exported as deltas)
_COUNTERS: dict[str, Any] = {
    "steps": m.ENGINE_STEPS,
    "step_seconds": m.ENGINE_STEP_SECONDS,
    "finished": m.ENGINE_REQUESTS.labels("finished"),
    "failed": m.ENGINE_REQUESTS.labels("failed"),
    **{f"{tier}_{what}": counter.labels(tier)
       for tier in ("device", "host")
       for what, counter in (("hits", m.TIER_HITS), ("misses", m.TIER_MISSES), ("evictions", m.TIER_EVICTIONS))},
}


class EngineSampler:
    """Copy an engine's cumulative ``stats()`` into the Prometheus counters (by difference) and
    gauges. A counter that went down (the engine was replaced for another base model) restarts
    from the new value, so the exported counters only grow."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None]) -> None:
        self.stats = stats
        self._last: dict[str, float] = {}

    def sample(self) -> None:
        stats = self.stats()
        if not stats:
            return
        current = {key: float(stats.get(key, 0)) for key in _COUNTERS}
        current["rows"] = float(stats.get("mean_batch_rows", 0.0)) * float(stats.get("steps", 0))
        for key, now in current.items():
            before = self._last.get(key, 0.0)
            delta = now - before if now >= before else now
            if delta > 0:
                (m.ENGINE_ROWS if key == "rows" else _COUNTERS[key]).inc(delta)
        self._last = current
        m.ENGINE_INFLIGHT.labels("waiting").set(stats.get("waiting", 0))
        m.ENGINE_INFLIGHT.labels("active").set(stats.get("active", 0))
        for tier, entries in (("device", "device_resident"), ("host", "host_entries")):
            m.TIER_BYTES.labels(tier).set(stats.get(f"{tier}_bytes", 0))
            m.TIER_ENTRIES.labels(tier).set(stats.get(entries, 0))


def _engine_stats() -> dict[str, Any] | None:
    from worker.generation import ENGINES

    return ENGINES.stats()


QUEUES = "all"  # the queues label: set by `styleinject worker` (set_queues) before the worker starts


def set_queues(queues: str) -> None:
    """The queues this worker consumes, as one label value ("generate", "generate,train")."""
    global QUEUES
    QUEUES = ",".join(sorted(q.strip() for q in queues.split(",") if q.strip())) or "all"


_started = threading.Event()


def start_background() -> None:
    """Heartbeat and engine sampling threads for this process (once)."""
    if _started.is_set():
        return
    _started.set()
    queues = QUEUES
    sampler = EngineSampler(_engine_stats)

    def loop() -> None:
        next_beat = 0.0
        while True:
            now = time.time()
            if now >= next_beat:
                m.WORKER_HEARTBEAT.labels(queues).set(now)
                m.WORKER_HEARTBEATS.labels(queues).inc()
                next_beat = now + HEARTBEAT_INTERVAL_S
            try:
                sampler.sample()
            except Exception:  # noqa: BLE001 - metrics never take a worker down
                log.exception("engine metrics sample failed")
            time.sleep(SAMPLE_INTERVAL_S)

    threading.Thread(target=loop, name="styleinject-metrics", daemon=True).start()


def observe_training(kind: str, progress: dict[str, Any], last_step: list[int]) -> None:
    """From the train task's progress callback: samples/s now, steps done since the last call."""
    rate = progress.get("samples_per_s")
    if isinstance(rate, (int, float)) and rate == rate:
        m.TRAIN_SAMPLES_PER_S.labels(kind).set(rate)
    step = progress.get("step")
    if isinstance(step, int):
        if step > last_step[0]:
            m.TRAIN_STEPS.labels(kind).inc(step - last_step[0])
        last_step[0] = step


def training_done(kind: str) -> None:
    m.TRAIN_SAMPLES_PER_S.labels(kind).set(0)


# -- Celery signals -----------------------------------------------------------------------------------

_task_started: dict[str, float] = {}


@task_prerun.connect
def _prerun(task_id=None, **_: Any) -> None:
    _task_started[task_id] = time.perf_counter()


@task_postrun.connect
def _postrun(task_id=None, task=None, retval=None, state=None, **_: Any) -> None:
    started = _task_started.pop(task_id, None)
    name = (getattr(task, "name", "") or "").rsplit(".", 1)[-1] or "unknown"
    outcome = (state or "unknown").lower()
    if isinstance(retval, dict):  # the tasks return how their job or request ended
        if retval.get("skipped"):
            outcome = "skipped"
        elif "status" in retval and isinstance(retval["status"], str):
            outcome = retval["status"] if retval["status"] in ("succeeded", "failed", "cancelled", "lost") else outcome
        elif "ok" in retval:
            outcome = "succeeded" if retval["ok"] else "failed"
    m.TASKS.labels(name, outcome).inc()
    if started is not None:
        m.TASK_LATENCY.labels(name).observe(time.perf_counter() - started)


@worker_init.connect
def _worker_init(**_: Any) -> None:
    start_background()
    port = get_settings().metrics_port
    if port:
        m.serve_port(port, m.scrape_registry())


@worker_process_init.connect
def _child_init(**_: Any) -> None:
    _started.clear()  # the parent's threads did not survive the fork
    start_background()


@worker_process_shutdown.connect
def _child_exit(pid=None, **_: Any) -> None:
    if m.multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())

"""Prometheus metrics shared by the API and the worker (names: docs/ops.md; no torch here).

Every metric is named ``styleinject_*`` in base units (seconds, bytes), counters end in
``_total`` and labels take small fixed sets (route templates, statuses, queues, tiers; never ids).

Processes: a metric lives in the process that changes it. Where one host runs several processes
that write metrics (``uvicorn --workers N``, a prefork Celery worker), set the standard
``PROMETHEUS_MULTIPROC_DIR`` to an empty folder before they start: prometheus-client then keeps
the values in files there and any of the processes serves the sum (``render()``). Without it, a
scrape shows the serving process only (enough for one API process and threads/solo workers).

What is computed where:
  * HTTP requests and latency: the API's middleware (api/metrics.py).
  * jobs by kind and status, queue depth: read from the database at scrape time (``DatabaseCollector``,
    served by the API), so every replica reports the same numbers and no worker has to be scraped.
  * job transitions: the ``on_transition`` hook below, in the process that commits the change.
  * engine batches, step time, adapter tier hits / misses / evictions, training samples/s,
    heartbeats: the worker process that runs them (worker/metrics.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api.core.jobs import Transition, on_transition

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# -- the API ----------------------------------------------------------------------------------------
HTTP_REQUESTS = Counter("styleinject_http_requests_total", "HTTP requests by method, route template and status",
                        ["method", "route", "status"])
HTTP_LATENCY = Histogram("styleinject_http_request_duration_seconds",
                         "HTTP request duration (until the response is sent) by method and route template",
                         ["method", "route"], buckets=LATENCY_BUCKETS)

# -- jobs (the transition hook, in the committing process) ------------------------------------------
JOB_TRANSITIONS = Counter("styleinject_job_transitions_total", "Job status changes by the status entered",
                          ["status"])

# -- the worker -------------------------------------------------------------------------------------
WORKER_HEARTBEAT = Gauge("styleinject_worker_heartbeat_timestamp_seconds",
                         "Unix time of the worker's last heartbeat (a worker is alive while this advances)",
                         ["queues"], multiprocess_mode="max")
WORKER_HEARTBEATS = Counter("styleinject_worker_heartbeats_total", "Worker heartbeats", ["queues"])
TASKS = Counter("styleinject_tasks_total", "Celery tasks finished by task and outcome", ["task", "outcome"])
TASK_LATENCY = Histogram("styleinject_task_duration_seconds", "Celery task run time by task", ["task"],
                         buckets=LATENCY_BUCKETS + (900, 3600, 4 * 3600, 24 * 3600))
TRAIN_SAMPLES_PER_S = Gauge("styleinject_training_samples_per_second",
                            "Training throughput of the running jobs by kind (0 when none runs)", ["kind"],
                            multiprocess_mode="livesum")
TRAIN_STEPS = Counter("styleinject_training_steps_total", "Optimizer steps done by training jobs, by kind", ["kind"])

# the generate worker's serving engine (sampled from Engine.stats())
ENGINE_STEPS = Counter("styleinject_engine_steps_total", "UNet forwards run by the serving engine")
ENGINE_ROWS = Counter("styleinject_engine_batch_rows_total",
                      "UNet batch rows summed over forwards (rate / rate of steps = mean batch size)")
ENGINE_STEP_SECONDS = Counter("styleinject_engine_step_seconds_total",
                              "Seconds spent in engine steps (rate / rate of steps = mean step time)")
ENGINE_REQUESTS = Counter("styleinject_engine_requests_total", "Requests the engine finished, by outcome",
                          ["outcome"])
ENGINE_INFLIGHT = Gauge("styleinject_engine_inflight_requests", "Requests in the engine by state (waiting, active)",
                                ["state"], multiprocess_mode="livesum")
TIER_HITS = Counter("styleinject_adapter_tier_hits_total", "Adapter lookups served by a tier (device, host)", ["tier"])
TIER_MISSES = Counter("styleinject_adapter_tier_misses_total", "Adapter lookups a tier missed", ["tier"])
TIER_EVICTIONS = Counter("styleinject_adapter_tier_evictions_total", "Adapters evicted from a tier", ["tier"])
TIER_BYTES = Gauge("styleinject_adapter_tier_bytes", "Bytes of adapter tensors resident in a tier", ["tier"],
                   multiprocess_mode="livesum")
TIER_ENTRIES = Gauge("styleinject_adapter_tier_entries", "Adapters resident in a tier", ["tier"],
                     multiprocess_mode="livesum")

# queue depth, jobs: DatabaseCollector
DB_METRICS = ("styleinject_jobs", "styleinject_queue_depth")


@on_transition
def count_transition(change: Transition) -> None:
    JOB_TRANSITIONS.labels(change.to_status).inc()


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


class DatabaseCollector(Collector):
    """Gauges read from the database at scrape time: jobs by kind and status, queue depth."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    def describe(self) -> Iterable[Metric]:
        return []  # collected only when scraped, never while registering

    def collect(self) -> Iterator[Metric]:
        from sqlalchemy import func, select

        from api.core.celery import GENERATE_QUEUE, TRAIN_QUEUE
        from api.core.db.models import GENERATION_STATUSES, JOB_KINDS, JOB_STATUSES, GenerationRequest, Job
        from api.core.db.session import session_scope

        with session_scope(self.database_url) as session:
            jobs = dict(((kind, status), count) for kind, status, count in session.execute(
                select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)))
            generations = dict(session.execute(
                select(GenerationRequest.status, func.count()).group_by(GenerationRequest.status)).all())
        by_state = GaugeMetricFamily("styleinject_jobs", "Jobs by kind and status (from the database)",
                                     labels=["kind", "status"])
        for kind in JOB_KINDS:
            for status in JOB_STATUSES:
                by_state.add_metric([kind, status], jobs.get((kind, status), 0))
        yield by_state
        depth = GaugeMetricFamily("styleinject_queue_depth",
                                  "Work queued or running per Celery queue (jobs for train, requests for generate)",
                                  labels=["queue", "state"])
        for state in ("queued", "running"):
            depth.add_metric([TRAIN_QUEUE, state], sum(n for (_, s), n in jobs.items() if s == state))
            depth.add_metric([GENERATE_QUEUE, state], generations.get(state, 0) if state in GENERATION_STATUSES else 0)
        yield depth


class ScrapeCollector(Collector):
    """This process's metrics (or, in multiprocess mode, the sum over the folder) plus ``extra``."""

    def __init__(self, extra: Iterable[Collector] = ()) -> None:
        self.extra = list(extra)

    def collect(self) -> Iterator[Metric]:
        folder = multiprocess_dir()
        if folder:
            yield from multiprocess.MultiProcessCollector(None, folder).collect()
        else:
            yield from REGISTRY.collect()
        for collector in self.extra:
            try:
                yield from collector.collect()
            except Exception:  # noqa: BLE001 - a database hiccup must not hide the other metrics
                log.exception("metrics collector %r failed", collector)


def scrape_registry(extra: Iterable[Collector] = ()) -> CollectorRegistry:
    """A registry to serve: this process (or the multiprocess folder) plus ``extra`` collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ScrapeCollector(extra))
    return registry


def render(extra: Iterable[Collector] = ()) -> bytes:
    """The text exposition format of ``scrape_registry(extra)``."""
    return generate_latest(scrape_registry(extra))


def serve_port(port: int, registry: CollectorRegistry, addr: str = "0.0.0.0"):
    """Serve ``registry`` on its own port (a daemon thread); None when the port is taken (another
    process of the same host serves it: with PROMETHEUS_MULTIPROC_DIR it serves the same sum)."""
    from prometheus_client import start_http_server

    try:
        server, _thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        log.warning("metrics port %s not served by this process: %s", port, exc)
        return None
    log.info("metrics on http://%s:%s/metrics", addr, port)
    return server

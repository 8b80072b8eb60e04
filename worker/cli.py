"""``styleinject worker`` (or ``python -m worker.cli worker``): a Celery worker on this machine.

Found by the library CLI through the ``styleinject.commands`` entry point group (pyproject.toml).
Only argparse is imported at module level.
"""

import argparse


def add_commands(subparsers) -> None:
    worker = subparsers.add_parser(
        "worker", help="a Celery worker (run one per GPU machine in the distributed mode)",
        description="Consume the train and generate queues. Reads STYLEINJECT_BROKER_URL, "
        "STYLEINJECT_DATABASE_URL, STYLEINJECT_ARTIFACT_ROOT like the API.")
    worker.add_argument("--home", default=None,
                        help="state folder (default $STYLEINJECT_HOME or ~/.styleinject)")
    worker.add_argument("--queues", default="train,generate",
                        help="comma-separated (default train,generate; generate workers also deliver job webhooks)")
    worker.add_argument("--pool", default=None, choices=["prefork", "solo", "threads"],
                        help="default: threads for a generate-only worker (its engine batches the requests "
                        "it holds), else prefork (time limits enforced)")
    worker.add_argument("--concurrency", type=int, default=None,
                        help="tasks at once (default: STYLEINJECT_GENERATE_CONCURRENCY for a generate-only "
                        "worker, else 1 per GPU)")
    worker.add_argument("--hostname", default=None, help="Celery node name (default celery@<host>)")
    worker.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    worker.set_defaults(func=_worker)


def _worker(args) -> int:
    import os
    import tempfile

    from api.core.settings import Settings, configure_settings

    if args.home:
        # the process settings, set before the Celery app and the tasks are built from them
        configure_settings(Settings(home=args.home))
    from api.core.settings import get_settings

    generate_only = [q.strip() for q in args.queues.split(",") if q.strip()] == ["generate"]
    pool = args.pool or ("threads" if generate_only else "prefork")
    if pool == "prefork" and get_settings().metrics_port and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # tasks run in child processes: they write metrics to files the main process serves (set
        # before prometheus-client is imported; a fresh folder, so no stale values)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="styleinject-metrics-")
    from worker.celery_app import celery_app
    from worker.metrics import set_queues

    set_queues(args.queues)
    concurrency = args.concurrency or (get_settings().generate_concurrency if pool == "threads" else 1)
    argv = ["worker", "--pool", pool, "--concurrency", str(concurrency),
            "--queues", args.queues, "--loglevel", args.log_level.upper()]
    if get_settings().log_format == "json":
        argv.insert(0, "--quiet")  # a global option: no start-up banner among the JSON lines
    if args.hostname:
        argv += ["--hostname", args.hostname]
    celery_app.worker_main(argv)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.cli", description="StyleInject worker command")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

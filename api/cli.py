"""Service commands: serve, apikey, model, db. ``styleinject <command>`` or ``python -m api.cli``.

The library CLI finds this module through the ``styleinject.commands`` entry point group
(pyproject.toml) and calls ``add_commands``; ``worker`` comes from ``worker.cli`` the same way.
Only argparse is imported at module level, so ``styleinject --help`` stays fast.
"""

import argparse


def add_commands(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="API + one worker on this machine (embedded default: SQLite, no servers)",
        description="Run migrations, start one Celery worker process and the API. Without "
        "STYLEINJECT_BASE_MODEL the base model is the toy demo model shipped with the package.")
    _home(serve)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--no-worker", action="store_true", help="API only (workers run elsewhere)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=_serve)

    apikey = subparsers.add_parser("apikey", help="create, list or revoke API keys")
    keys = apikey.add_subparsers(dest="apikey_command", required=True, metavar="{create,list,revoke}")
    create = keys.add_parser("create", help="print a new key for a tenant (created if new)")
    create.add_argument("--tenant", required=True, help="tenant name")
    create.add_argument("--name", default=None, help="a label for the key")
    _home(create)
    create.set_defaults(func=_apikey_create)
    listing = keys.add_parser("list", help="list keys (prefixes only; keys are never stored)")
    listing.add_argument("--tenant", default=None, help="only this tenant")
    _home(listing)
    listing.set_defaults(func=_apikey_list)
    revoke = keys.add_parser("revoke", help="revoke a key by the key, its prefix or its id")
    revoke.add_argument("key", help="the key, its 12-character prefix or its id")
    _home(revoke)
    revoke.set_defaults(func=_apikey_revoke)

    model = subparsers.add_parser("model", help="register base and teacher models (tenants name them)")
    models = model.add_subparsers(dest="model_command", required=True, metavar="{add,list,remove}")
    add = models.add_parser("add", help="register a model under a name",
                            description="Tenants refer to models by these names in POST /train "
                            "(base_model, teacher_model); they never pass paths or hub ids.")
    add.add_argument("name", help="what tenants call it, e.g. sd15")
    add.add_argument("source", metavar="PATH_OR_HUB_ID",
                     help="hub id, diffusers folder or single-file .safetensors checkpoint (as the workers see it)")
    add.add_argument("--replace", action="store_true", help="change the source of an existing name")
    _home(add)
    add.set_defaults(func=_model_add)
    mlist = models.add_parser("list", help="list registered models")
    _home(mlist)
    mlist.set_defaults(func=_model_list)
    remove = models.add_parser("remove", help="unregister a model (jobs already queued keep their source)")
    remove.add_argument("name")
    _home(remove)
    remove.set_defaults(func=_model_remove)

    db = subparsers.add_parser("db", help="database migrations (Alembic)")
    steps = db.add_subparsers(dest="db_command", required=True, metavar="{upgrade,downgrade}")
    upgrade = steps.add_parser("upgrade", help="migrate to the newest schema (a start-up step)")
    upgrade.add_argument("--revision", default="head")
    _home(upgrade)
    upgrade.set_defaults(func=_db_upgrade)
    downgrade = steps.add_parser("downgrade", help="migrate down (`--revision base` drops everything)")
    downgrade.add_argument("--revision", required=True)
    _home(downgrade)
    downgrade.set_defaults(func=_db_downgrade)


def _home(parser) -> None:
    parser.add_argument("--home", default=None,
                        help="state folder (default $STYLEINJECT_HOME or ~/.styleinject)")


def _settings(args):
    """Settings from the environment, with ``--home`` on top (passed explicitly, never via os.environ)."""
    from api.core.settings import Settings

    return Settings(home=args.home) if getattr(args, "home", None) else Settings()


def _db_settings(args):
    """Settings for a command that reads or writes rows: the schema must be current, or a clear error."""
    from api.core.db.migrate import SchemaNotCurrent, check_current

    settings = _settings(args)
    try:
        check_current(settings.database_url)
    except SchemaNotCurrent as exc:
        raise SystemExit(f"error: {exc}") from None
    return settings


# -- serve ------------------------------------------------------------------------------------------

def _serve(args) -> int:
    import os
    import signal
    import sys

    import uvicorn

    from api.core.db.migrate import upgrade
    from api.core.logs import uvicorn_log_config
    from api.core.supervisor import WorkerSupervisor

    settings = _settings(args)
    _check_port_free(args.host, args.port)
    settings.home.mkdir(parents=True, exist_ok=True)
    if not settings.object_storage:
        settings.artifact_root.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    from api.core.sweep import sweep_orphans

    # what a killed serve left without its rows (an upload's validation, an adapter delete): embedded,
    # nothing else writes this store yet; with a shared broker, other API replicas may be writing it
    sweep_orphans(settings, older_than_s=0 if settings.embedded else 3600)
    first_key = None
    if not settings.bootstrap_key:
        from api.auth import first_start_key
        from api.core.db.session import session_scope

        with session_scope(settings.database_url) as session:
            first_key = first_start_key(session)
    from api.core.db.session import session_scope
    from api.core.registry import register_demo_model

    with session_scope(settings.database_url) as session:
        register_demo_model(session)  # the toy model, as "demo" (tenants name models, never paths)
    if not settings.base_model:
        print(f"base model: the toy demo model ({settings.resolved_base_model()}): it draws shapes at 32 x 32, "
              "e.g. 'two red circles on a white background'; set STYLEINJECT_BASE_MODEL to a Stable "
              "Diffusion 1.5 hub id or folder for real images", flush=True)
    # The API and the worker child run the same settings: passed to create_app here, and to the
    # child as its environment (this process's os.environ is left alone).
    settings = settings.model_copy(update={"base_model": settings.resolved_base_model()})

    from api.main import create_app

    app = create_app(settings)
    _prune_delivered_messages(settings.broker_url)
    _requeue_orphans(settings, app.state.celery)

    supervisors = []
    if not args.no_worker:
        # Two worker processes, so generation never waits behind training: "train" runs one job at a
        # time (solo pool: its soft time limit is enforced), "generate" holds many requests at once
        # (threads pool) and batches them on its serving engine. On a GPU both share the device.
        # The Celery app is named, not imported: api never imports worker.
        env = {**os.environ, **settings.to_env()}
        for queue, pool, concurrency in (("train", "solo", 1), ("generate", "threads", settings.generate_concurrency)):
            command = [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker",
                       "--pool", pool, "--concurrency", str(concurrency), "--queues", queue,
                       "--hostname", f"embedded-{queue}-{os.getpid()}@%h", "--loglevel", args.log_level.upper()]
            if settings.log_format == "json":
                command.insert(command.index("worker"), "--quiet")  # Celery's banner: the only non-JSON lines
            # Warm shutdown on stop: an idle worker exits at once; a running job gets 10 s, then is
            # killed and resumes from its latest checkpoint on the next start. After a crash the dead
            # worker's job resumes once its lease expires (re-sent here: the embedded broker does not).
            supervisor = WorkerSupervisor(
                command, env=env, max_restarts=5, backoff_s=2, stop_timeout_s=10,
                on_restart=lambda _n: _requeue_orphans(settings, app.state.celery))
            supervisor.start()
            supervisors.append(supervisor)

    def on_sigterm(signum, frame):  # uvicorn re-raises SIGTERM after its shutdown: end cleanly
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    base = f"http://{args.host}:{args.port}"
    print(f"StyleInject embedded service\n  home:      {settings.home}\n  API:       {base}\n"
          f"  docs:      {base}/docs\n  dashboard: {base}/dashboard (log in with an API key)\n"
          f"  base model: {settings.resolved_base_model()}\n"
          f"  create a key: styleinject apikey create --tenant NAME --home {settings.home}", flush=True)
    if first_key:
        print(f"  first start: an API key for tenant 'admin' (shown only this once; keep it):\n"
              f"    {first_key}\n"
              f"    curl -H 'Authorization: Bearer {first_key}' {base}/jobs", flush=True)
    try:
        # STYLEINJECT_LOG_FORMAT for uvicorn's lines and ours; the worker children read it from their env
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    log_config=uvicorn_log_config(settings.log_format, args.log_level))
    finally:
        for supervisor in supervisors:
            supervisor.stop()
    return 0


def _check_port_free(host: str, port: int) -> None:
    """Fail before starting anything when another process (often an earlier serve) has the port."""
    import socket
    import sys

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            print(f"styleinject serve: error: cannot listen on {host}:{port} ({exc.strerror}); is another "
                  "serve running? Stop it or pass --port", file=sys.stderr)
            raise SystemExit(2) from None


def _prune_delivered_messages(broker_url: str) -> None:
    """The SQLAlchemy transport keeps delivered messages (visible = false) forever; drop them."""
    if not broker_url.startswith("sqla+"):
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    engine = create_engine(broker_url.removeprefix("sqla+"))
    try:
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM kombu_message WHERE visible = false"))
    except OperationalError:  # first start: no table yet
        pass
    finally:
        engine.dispose()


def _requeue_orphans(settings, celery) -> None:
    """Send the task again for every job left running (its worker stopped with `serve`).

    The embedded broker does not re-deliver unacknowledged messages. A duplicate is harmless: the
    task waits while another worker's lease is live, then claims the job and resumes it from the
    latest checkpoint, or does nothing if the job has finished.
    """
    from sqlalchemy import select

    from api.core.celery import task_for_job
    from api.core.db.models import Job
    from api.core.db.session import session_scope

    with session_scope(settings.database_url) as session:
        running = session.execute(select(Job.id, Job.kind).where(Job.status == "running")).all()
    for job_id, kind in running:
        celery.send_task(task_for_job(kind), args=[job_id])
        print(f"re-queued job {job_id} (interrupted by the last shutdown)", flush=True)


# -- apikey -----------------------------------------------------------------------------------------

def _apikey_create(args) -> int:
    import sys

    from api.auth import create_api_key
    from api.core.db.session import session_scope

    settings = _db_settings(args)
    with session_scope(settings.database_url) as session:
        key, row = create_api_key(session, args.tenant, args.name)
        prefix = row.prefix
    print(f"new key for tenant {args.tenant!r} (prefix {prefix}); it is shown only once:", file=sys.stderr)
    print(key)
    return 0


def _apikey_list(args) -> int:
    from sqlalchemy import select

    from api.core.db.models import ApiKey, Tenant
    from api.core.db.session import session_scope

    settings = _db_settings(args)
    with session_scope(settings.database_url) as session:
        query = select(ApiKey, Tenant.name).join(Tenant).order_by(Tenant.name, ApiKey.created_at)
        if args.tenant:
            query = query.where(Tenant.name == args.tenant)
        rows = session.execute(query).all()
        print(f"{'tenant':<20} {'prefix':<14} {'id':<34} {'created':<20} {'last used':<20} state")
        for key, tenant in rows:
            state = "revoked" if key.revoked_at else "active"
            used = key.last_used_at.strftime("%Y-%m-%d %H:%M") if key.last_used_at else "-"
            print(f"{tenant:<20} {key.prefix:<14} {key.id:<34} "
                  f"{key.created_at.strftime('%Y-%m-%d %H:%M'):<20} {used:<20} {state}")
    return 0


def _apikey_revoke(args) -> int:
    import sys

    from api.auth import revoke_api_key
    from api.core.db.session import session_scope

    settings = _db_settings(args)
    with session_scope(settings.database_url) as session:
        row = revoke_api_key(session, args.key)
        if row is None:
            print(f"no key matches {args.key!r}", file=sys.stderr)
            return 1
        print(f"revoked key {row.prefix}")
    return 0


# -- db ---------------------------------------------------------------------------------------------

def _db_upgrade(args) -> int:
    from api.core.db.migrate import upgrade

    upgrade(_settings(args).database_url, args.revision)
    return 0


def _db_downgrade(args) -> int:
    from api.core.db.migrate import downgrade

    downgrade(_settings(args).database_url, args.revision)
    return 0


# -- model -------------------------------------------------------------------------------------------

def _model_add(args) -> int:
    import sys

    from api.core.db.session import session_scope
    from api.core.registry import RegistryError, add_model

    settings = _db_settings(args)
    try:
        with session_scope(settings.database_url) as session:
            row = add_model(session, args.name, args.source, replace=args.replace)
            print(f"registered model {row.name!r}: {row.source}")
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _model_list(args) -> int:
    from api.core.db.session import session_scope
    from api.core.registry import list_models

    settings = _db_settings(args)
    with session_scope(settings.database_url) as session:
        for row in list_models(session):
            print(f"{row.name}\t{row.source}")
    return 0


def _model_remove(args) -> int:
    import sys

    from api.core.db.session import session_scope
    from api.core.registry import remove_model

    with session_scope(_db_settings(args).database_url) as session:
        if not remove_model(session, args.name):
            print(f"error: no model named {args.name!r}", file=sys.stderr)
            return 1
    print(f"removed model {args.name!r}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.cli", description="StyleInject service commands")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

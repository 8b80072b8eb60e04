"""The service core: what the HTTP layer (``api``) and the worker (``worker``) share.

settings.py   Settings (env ``STYLEINJECT_*``), get_settings / configure_settings
db/           SQLAlchemy models (job kinds and statuses live there), sessions, Alembic runner
celery.py     make_celery(settings), task names (TASK_*), queues, routes
jobs.py       the job state machine: transition(), progress/event history, on_transition hooks
storage.py    ArtifactStore interface + LocalArtifactStore
supervisor.py WorkerSupervisor: runs and restarts a child process (``styleinject serve``)

Nothing here imports ``api``'s HTTP layer or ``worker``; no torch. See docs/architecture.md.
"""

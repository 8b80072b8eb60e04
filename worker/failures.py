"""How the tasks end cleanly when the machine fails them: a full disk, a database that goes away.

- A full disk (or quota) while a job writes a checkpoint fails the job with a message its owner can
  act on ("the artifact store's disk is full", the last complete checkpoint), never a server path;
  the worker log names the folder and the free bytes for the operator; the partial checkpoint is
  removed so the space it took is free again and the complete ones stay loadable.
- A database that is briefly unreachable: writes that matter (the final status, the adapter row)
  are retried until ``timeout_s``; progress writes and cancel polls are skipped meanwhile
  (worker/lease.py), so training goes on through the outage.
"""

from __future__ import annotations

import errno
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError

log = logging.getLogger("worker.failures")
T = TypeVar("T")

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# The same errors from native writers that do not raise OSError (safetensors' Rust I/O error text)
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "File too large", "os error 28",
                   "os error 122", "os error 27")
DB_UNREACHABLE = (OperationalError, InterfaceError)
# Celery task options: such an error escaping a job task sends the task again (backoff 2, 4 ... 64 s)
RETRY_ON_DB_OUTAGE = {"autoretry_for": DB_UNREACHABLE, "retry_backoff": 2, "retry_backoff_max": 64,
                      "retry_jitter": False, "max_retries": 8}


def _chain(exc: BaseException):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_disk_full(exc: BaseException) -> bool:
    return any((isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS)
               or any(text in str(e) for text in _DISK_FULL_TEXT) for e in _chain(exc))


def disk_full_error(exc: BaseException, output_dir: Path) -> str | None:
    """The job's error when ``exc`` is a full disk (else None), after removing the partial checkpoint."""
    if not is_disk_full(exc):
        return None
    from styleinject.train.checkpoint import list_checkpoints, remove_partial

    remove_partial(output_dir)
    try:
        free = shutil.disk_usage(output_dir).free
    except OSError:
        free = -1
    log.error("job output %s: the disk is full (%d bytes free after removing the partial checkpoint): %s",
              output_dir, free, exc)
    kept = list_checkpoints(output_dir)
    last = f"the last complete checkpoint, {kept[-1].name}, is kept" if kept else "no checkpoint was complete yet"
    return (f"the artifact store's disk is full: the job could not write its checkpoint ({last}); "
            "ask the operator to free space, then train again")


def retry_db(fn: Callable[[], T], *, timeout_s: float, what: str) -> T:
    """``fn()``, retried every second while the database is unreachable, for at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except DB_UNREACHABLE as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("%s: the database is unreachable (%s); retrying", what, str(exc).splitlines()[0][:200])
            time.sleep(1.0)


def best_effort(fn: Callable[[], object], what: str) -> None:
    """On the way to a final status: log what fails instead of leaving the job running."""
    try:
        fn()
    except Exception:  # noqa: BLE001
        log.exception("%s failed; the job's status is written anyway", what)

"""Soft time limits for pools where Celery does not enforce them.

Celery enforces ``soft_time_limit`` only in prefork children, by a signal the pool's parent sends.
The embedded ``styleinject serve`` runs its worker with ``--pool solo``, where the limits are
silently ignored, so a hung generation would hold the only worker for ever. In a solo worker the
task runs in the process's main thread, so a ``SIGALRM`` timer armed before the task raises the same
``SoftTimeLimitExceeded`` there, which the tasks already handle (a 504 for a generation, a failed job
with its checkpoints kept for training). The hard ``time_limit`` stays a prefork-only feature: a
solo worker has no parent to kill it.
"""

from __future__ import annotations

import signal
import threading

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import task_postrun, task_prerun, worker_process_init

_state = {"prefork_child": False}


@worker_process_init.connect
def _in_prefork_child(**_) -> None:
    _state["prefork_child"] = True  # the pool enforces limits itself


def applies() -> bool:
    return (not _state["prefork_child"] and hasattr(signal, "setitimer")
            and threading.current_thread() is threading.main_thread())


def arm(seconds: float | None) -> None:
    if not seconds or not applies():
        return

    def on_alarm(_signum, _frame):
        raise SoftTimeLimitExceeded(f"soft time limit ({seconds:g} s) exceeded")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def disarm() -> None:
    if applies():
        signal.setitimer(signal.ITIMER_REAL, 0)


@task_prerun.connect
def _arm_for_task(task=None, **_) -> None:
    if task is not None:
        arm(task.soft_time_limit or task.app.conf.task_soft_time_limit)


@task_postrun.connect
def _disarm_after_task(**_) -> None:
    disarm()

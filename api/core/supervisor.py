"""WorkerSupervisor: run one child process, restart it when it dies, stop it on request.

``styleinject serve`` runs its embedded Celery worker under one. Policy: a child that exits while
the supervisor is running is restarted after ``backoff_s``, at most ``max_restarts`` times in a
row (a child that ran for at least ``healthy_after_s`` resets the count); ``on_restart`` runs
after each restart (serve re-queues the jobs the dead worker left running). ``stop()`` sends
SIGTERM (warm shutdown), waits ``stop_timeout_s``, then kills.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence

log = logging.getLogger(__name__)


def die_with_parent() -> None:
    """In the child (Linux): die with the parent even if it is killed without cleaning up."""
    import ctypes

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class WorkerSupervisor:
    def __init__(
        self,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        max_restarts: int = 5,
        backoff_s: float = 2.0,
        healthy_after_s: float = 60.0,
        stop_timeout_s: float = 10.0,
        on_restart: Callable[[int], None] | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.command = list(command)
        self.env = dict(env) if env is not None else None
        self.max_restarts = max_restarts
        self.backoff_s = backoff_s
        self.healthy_after_s = healthy_after_s
        self.stop_timeout_s = stop_timeout_s
        self.on_restart = on_restart
        self._preexec = globals()["die_with_parent"] if die_with_parent else None
        self.proc: subprocess.Popen | None = None
        self.restarts = 0  # restarts in a row (reset by a healthy run)
        self.gave_up = False
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the child and the supervising thread (returns at once)."""
        if self._thread is not None:
            raise RuntimeError("WorkerSupervisor.start() called twice")
        self._spawn()
        self._thread = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        with self._lock:
            if not self._stopping.is_set():
                self.proc = subprocess.Popen(self.command, env=self.env, preexec_fn=self._preexec)

    def _supervise(self) -> None:
        while True:
            proc = self.proc
            started = time.monotonic()
            code = proc.wait() if proc is not None else None
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= self.healthy_after_s:
                self.restarts = 0
            if self.restarts >= self.max_restarts:
                self.gave_up = True
                print(f"worker exited with code {code} and keeps failing; not restarting it again",
                      file=sys.stderr, flush=True)
                return
            self.restarts += 1
            print(f"worker exited with code {code}; restarting ({self.restarts})", file=sys.stderr, flush=True)
            if self._stopping.wait(self.backoff_s):
                return
            self._spawn()
            if self.on_restart is not None:
                try:
                    self.on_restart(self.restarts)
                except Exception:  # noqa: BLE001 - a failing callback must not stop supervision
                    log.exception("on_restart callback failed")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """Stop supervising and end the child: SIGTERM, then SIGKILL after ``stop_timeout_s``.
        Returns the child's exit code (None if it never started)."""
        with self._lock:
            self._stopping.set()
            proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return proc.returncode

"""GenerationWaiter: await many generation requests with one database query per tick.

The synchronous ``POST /generate`` waits for its request without a thread or a database
connection of its own: it registers a future here, and a single polling task asks the database
for the status of every waited-for request at once (chunks of 500 ids), then resolves the futures
of the ones that finished. 200 waiting requests cost one small query every ``interval_s``.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select

from api.core.db.models import GenerationRequest
from api.core.db.session import session_scope

log = logging.getLogger(__name__)

FINAL = ("succeeded", "failed", "timeout")


class GenerationWaiter:
    def __init__(self, database_url: str, interval_s: float = 0.1) -> None:
        self.database_url = database_url
        self.interval_s = interval_s
        self._pending: dict[str, list[asyncio.Future]] = {}
        self._task: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        return sum(len(futures) for futures in self._pending.values())

    async def wait(self, request_id: str, timeout: float) -> str | None:
        """The request's final status, or None if it did not finish within ``timeout`` seconds."""
        future = asyncio.get_running_loop().create_future()
        self._pending.setdefault(request_id, []).append(future)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll())
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            futures = self._pending.get(request_id, [])
            if future in futures:
                futures.remove(future)
            if not futures:
                self._pending.pop(request_id, None)

    async def _poll(self) -> None:
        while self._pending:
            await asyncio.sleep(self.interval_s)
            ids = list(self._pending)
            try:
                statuses = await run_in_threadpool(self._statuses, ids)
            except Exception:  # noqa: BLE001 - a database hiccup: try again next tick
                log.exception("polling generation statuses failed")
                continue
            for request_id, status in statuses.items():
                if status in FINAL:
                    for future in self._pending.pop(request_id, []):
                        if not future.done():
                            future.set_result(status)

    def _statuses(self, ids: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        with session_scope(self.database_url) as session:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                found.update(session.execute(select(GenerationRequest.id, GenerationRequest.status)
                                             .where(GenerationRequest.id.in_(chunk))).all())
        return found

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from fastapi import APIRouter
from sqlalchemy import text

from api.core.db.session import session_scope
from api.deps import SettingsDep
from api.schemas import HealthOut

router = APIRouter(prefix="/healthz", tags=["health"])

# Its own two threads: a burst of requests queued on the shared thread pool (hundreds of
# /generate submissions at once) must not make the liveness check late.
_HEALTH_THREADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="healthz")
DATABASE_TIMEOUT_S = 0.8


@router.get("", response_model=HealthOut, summary="Liveness and database check (no auth)")
async def read_health(settings: SettingsDep) -> HealthOut:
    from api import __version__

    def ping() -> None:
        with session_scope(settings.database_url) as session:
            session.execute(text("SELECT 1"))

    try:
        future = asyncio.get_running_loop().run_in_executor(_HEALTH_THREADS, ping)
        await asyncio.wait_for(future, DATABASE_TIMEOUT_S)
        database = True
    except Exception:  # noqa: BLE001 - reported, not raised (a timeout too: the API itself answered)
        database = False
    return HealthOut(status="ok" if database else "degraded", database=database, version=__version__)

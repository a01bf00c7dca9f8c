"""/healthz (process alive) and /readyz (database, Redis, a live worker with its model)."""

import json
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import PlatformDep
from db.session import get_engine

router = APIRouter()

HEARTBEAT_PATTERN = (
    "abl:worker:*"  # workers.runtime.HEARTBEAT_PREFIX; keys expire when a worker dies
)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_database(database_url: str) -> None:
    with get_engine(database_url).connect() as conn:
        conn.execute(text("SELECT 1"))


@router.get("/readyz")
async def readyz(platform: PlatformDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    try:
        await run_in_threadpool(_check_database, platform.database_url)
        checks["database"] = {"ok": True}
    except Exception as exc:  # any failure means not ready; say which
        checks["database"] = {"ok": False, "error": type(exc).__name__}
    workers: list[dict[str, Any]] = []
    try:
        await platform.redis.ping()
        checks["redis"] = {"ok": True}
        keys = [k async for k in platform.redis.scan_iter(match=HEARTBEAT_PATTERN, count=500)]
        for raw in await platform.redis.mget(keys) if keys else []:
            if raw:
                workers.append(json.loads(raw))
    except Exception as exc:  # Redis down: not ready
        checks["redis"] = {"ok": False, "error": type(exc).__name__}
    served = sorted({m for w in workers for m in w.get("models", [])})
    checks["workers"] = {"ok": bool(served), "count": len(workers), "models": served}
    ready = all(c["ok"] for c in checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

"""/healthz (process alive) and /readyz (database, Redis, a live worker for each required model).

Required models: `ABL_READY_MODELS` (comma-separated) when set, otherwise every model in the
catalogue, which always holds the default model. So by default the default model needs a live
worker; a deployment that serves only other models names them in `ABL_READY_MODELS`.
"""

from typing import Any

import redis.asyncio as aioredis
from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import PlatformDep
from api.platform import Platform
from contract.worker_registry import LIVE_WORKERS_CALL, LIVE_WORKERS_SCRIPT, live_payloads
from db.session import get_engine

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_database(database_url: str) -> None:
    with get_engine(database_url).connect() as conn:
        conn.execute(text("SELECT 1"))


async def live_workers(client: aioredis.Redis) -> list[dict[str, Any]]:
    """The heartbeat payloads of the workers alive now (name, models, active, engines): one
    script over the live-worker registry, never a scan of the keyspace."""
    script = client.register_script(LIVE_WORKERS_SCRIPT)
    return live_payloads(await script(**LIVE_WORKERS_CALL))


def required_models(platform: Platform) -> list[str]:
    """The models that each need a live worker for the API to be ready."""
    named = [m.strip() for m in platform.settings.ready_models.split(",") if m.strip()]
    return named or [spec.id for spec in platform.catalog.all()]


def workers_check(required: list[str], workers: list[dict[str, Any]]) -> dict[str, Any]:
    """Live workers per model; ok when every required model has at least one."""
    by_model: dict[str, int] = dict.fromkeys(required, 0)
    for worker in workers:
        for model in worker.get("models", []):
            by_model[model] = by_model.get(model, 0) + 1
    missing = [m for m in required if by_model[m] == 0]
    return {
        "ok": bool(workers) and not missing,
        "count": len(workers),
        "models": sorted(m for m, n in by_model.items() if n),
        "required": required,
        "missing": missing,
        "by_model": by_model,
    }


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
        workers = await live_workers(platform.redis)
    except Exception as exc:  # Redis down: not ready
        checks["redis"] = {"ok": False, "error": type(exc).__name__}
    checks["workers"] = workers_check(required_models(platform), workers)
    failed = [name for name, check in checks.items() if not check["ok"]]
    body = {"ready": not failed, "failed": failed, "checks": checks}
    return JSONResponse(body, status_code=503 if failed else 200)

"""The API application: `uvicorn --factory api.main:create_app`."""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from api import account, health, metrics
from api.admin import audit as admin_audit
from api.admin import routes as admin_routes
from api.admin import tokens as admin_tokens
from api.admin import usage as admin_usage
from api.admin.throttle import RedisAdminThrottle
from api.anthropic import batches as anthropic_batches
from api.anthropic import routes as anthropic_routes
from api.anthropic.batch_dispatch import BatchDispatcher
from api.errors import install_error_handlers
from api.gate import CredentialGateMiddleware
from api.middleware import BodyLimitMiddleware, JsonBodyMiddleware, RequestIdMiddleware
from api.openapi import install_openapi
from api.platform import Platform
from api.request_body import BodyParser
from api.settings import ApiSettings
from api.versions import check_anthropic_version
from contract.logs import request_logger


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    request_logger()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        platform = Platform.create(settings)
        app.state.platform = platform
        app.state.settings = settings
        app.state.admin_throttle = RedisAdminThrottle(platform.redis, settings)
        platform.watch_for_shutdown()
        dispatcher = None
        if settings.batch_dispatch:
            dispatcher = asyncio.create_task(BatchDispatcher(platform).run())
        try:
            yield
        finally:
            if dispatcher is not None:
                platform.shutting_down.set()
                await dispatcher
            await platform.close()

    app = FastAPI(title="Abliterated inference platform", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.body_parser = BodyParser.of(settings)
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(anthropic_routes.router, dependencies=[Depends(check_anthropic_version)])
    app.include_router(anthropic_batches.router, dependencies=[Depends(check_anthropic_version)])
    app.include_router(account.router)
    app.include_router(admin_routes.router)
    app.include_router(admin_tokens.router)
    app.include_router(admin_audit.router)
    app.include_router(admin_usage.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    # Outermost last: the request id exists before the gate or the body limit can refuse a
    # request, and the gate refuses bad credentials before any body is read.
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(CredentialGateMiddleware)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(metrics.HttpMetricsMiddleware)
    return app

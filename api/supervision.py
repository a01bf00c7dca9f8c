"""Watching a request while its events stream in: dead workers, no workers, shutdown.

Between events, every `liveness_check_s` the watch looks at the request's lease in Redis. A
running request whose lease expired lost its worker: it is settled as failed (hold released,
nothing charged) and the client gets an `api_error`. A request no worker picked up within
`queue_timeout_s` is settled the same way and answered with 529 `overloaded_error`. Settling
is conditional on the status, so a worker that comes back later finds it settled and stops.
"""

import time
from datetime import UTC, datetime

from fastapi.concurrency import run_in_threadpool
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from api.errors import ApiInternalError, OverloadedError
from api.platform import Platform
from api.relay import EventSubscription, SequenceGap
from contract.events import WorkerEvent
from contract.keys import lease_key
from db.ledger import Outcome, settle_request
from db.models import Request
from db.session import transaction


class RequestWatch:
    def __init__(
        self, platform: Platform, request_id: str, subscription: EventSubscription
    ) -> None:
        self.platform = platform
        self.request_id = request_id
        self.subscription = subscription
        self.enqueued_at = time.monotonic()
        self._next_check = self.enqueued_at + platform.settings.liveness_check_s

    async def next(self, timeout: float) -> WorkerEvent | None:
        """The next event; None after `timeout` quiet seconds; raises if the request is lost."""
        deadline = time.monotonic() + timeout
        settings = self.platform.settings
        while True:
            if self.platform.shutting_down.is_set():
                raise OverloadedError("the server is shutting down; retry the request")
            now = time.monotonic()
            if now >= deadline:
                return None
            wait = min(deadline, self._next_check) - now
            try:
                event = await self.subscription.next(wait) if wait > 0 else None
            except (RedisError, OSError) as exc:
                raise ApiInternalError("lost the connection to the event stream") from exc
            except SequenceGap as exc:
                raise ApiInternalError(str(exc)) from exc
            if event is not None:
                self._next_check = time.monotonic() + settings.liveness_check_s
                return event
            if time.monotonic() >= self._next_check:
                try:
                    await self._check_alive()
                except SQLAlchemyError as exc:
                    raise ApiInternalError("the database is unavailable; retry shortly") from exc
                self._next_check = time.monotonic() + settings.liveness_check_s

    async def _check_alive(self) -> None:
        try:
            if await self.platform.redis.exists(lease_key(self.request_id)):
                return
        except RedisError as exc:
            raise ApiInternalError("lost the connection to the event stream") from exc
        status, started_at = await run_in_threadpool(self._status)
        settings = self.platform.settings
        if status == "queued":
            if time.monotonic() - self.enqueued_at < settings.queue_timeout_s:
                return
            if await run_in_threadpool(self._fail, "queued", "no worker picked the request up"):
                raise OverloadedError(
                    f"no worker picked the request up within {settings.queue_timeout_s:.0f}s",
                    retry_after=int(settings.queue_timeout_s // 3) or 1,
                )
        elif status == "running":
            assert started_at is not None
            age = (datetime.now(UTC) - started_at).total_seconds()
            if age < settings.worker_lease_s:
                return  # the worker may not have written its first lease yet
            if await run_in_threadpool(self._fail, "running", "the worker running it stopped"):
                raise ApiInternalError("the worker serving this request stopped; retry it")
        # Settled meanwhile: its terminal event is on its way (or was lost with Redis).
        if status not in ("queued", "running"):
            raise ApiInternalError("the request ended but its result was lost; retry it")

    def _status(self) -> tuple[str, datetime | None]:
        with transaction(self.platform.database_url) as session:
            row = session.execute(
                select(Request.status, Request.started_at).where(Request.id == self.request_id)
            ).one()
            return row.status, row.started_at

    def _fail(self, expected: str, reason: str) -> bool:
        """Settle as failed if still in `expected` status; False if something else settled it."""
        with transaction(self.platform.database_url) as session:
            settlement = settle_request(
                session,
                self.request_id,
                Outcome.unbilled("failed", reason),
                only_queued=expected == "queued",
            )
            return not settlement.already_settled

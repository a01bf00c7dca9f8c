"""One admitted request on its way through a worker: enqueue, events, and the cleanup.

Both answers, streamed and not, read the same events from here: the deadline, the watch on the
request's worker (api/supervision.py), metering, and what happens however the request ends
(an unfinished request is cancelled, its rate-limit claim settled, its metrics closed).
"""

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType

from redis.exceptions import RedisError

from api.anthropic.admission import Admitted, finish
from api.errors import (
    ApiError,
    ApiInternalError,
    GatewayTimeoutError,
    OverloadedError,
    api_error_for,
)
from api.metrics import RequestMeter
from api.platform import Platform
from api.relay import EventSubscription
from api.supervision import RequestWatch
from contract.events import (
    BlockStartEvent,
    BlockStopEvent,
    ClaimedEvent,
    ContentEvent,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    WorkerEvent,
)


class RequestRun:
    """`await run.start()`, `await run.claimed(...)`, then `async with run:` around
    `run.events(...)` (or `run.close()` if it ends before)."""

    def __init__(self, platform: Platform, admitted: Admitted, meter: RequestMeter) -> None:
        self.platform = platform
        self.admitted = admitted
        self.meter = meter
        self.subscription = EventSubscription(platform.events, admitted.request_id)
        self.finished = False  # a terminal event arrived
        self.produced: int | None = None  # output tokens, once known
        self._deadline = time.monotonic() + platform.settings.request_timeout_s
        self._watch = RequestWatch(platform, admitted.request_id, self.subscription)
        self._closed = False

    async def start(self) -> None:
        """Subscribe first, then enqueue: no event can be published before we listen.

        If that fails, the request is over: its hold released, its claim settled, its metrics
        closed; the error is raised.
        """
        platform, request_id = self.platform, self.admitted.request_id
        try:
            await self.subscription.__aenter__()
            try:
                await platform.enqueue(self.admitted.spec, self.admitted.job)
            except BaseException:
                await self.subscription.__aexit__(None, None, None)
                await platform.abandon(request_id, "could not enqueue the request")
                raise
        except (RedisError, OSError, TimeoutError) as exc:
            self._ended_early(exc)
            raise OverloadedError("the request queue is unavailable, retry shortly") from exc
        except BaseException as exc:
            self._ended_early(exc)
            raise
        self.meter.queued(self.admitted.input_tokens)

    def _ended_early(self, exc: BaseException) -> None:
        self.meter.fail(exc)
        self.meter.close()
        self.platform.spawn(finish(self.platform, self.admitted, None))

    async def claimed(
        self, gone: Callable[[], Awaitable[bool]], tick: float = 1.0
    ) -> ClaimedEvent | None:
        """Waits for a worker to claim the request; None if the client went away meanwhile.

        Nothing is sent to the client before this returns, so a request that times out in the
        queue (or fails before it runs) is answered with a real HTTP error its SDK retries.
        """
        while True:
            event = await self._next(tick)
            if event is None:
                if await gone():
                    return None
                continue
            if isinstance(event, ClaimedEvent):
                return event
            raise self._ended_by(event)

    async def events(self, tick: float) -> AsyncIterator[ContentEvent | DoneEvent | None]:
        """The answer's block events, then the succeeded `DoneEvent`; None after `tick` quiet
        seconds. Any other ending (an error event, a timeout, a lost worker, a worker that
        stopped the request) is raised as an `ApiError`."""
        while True:
            event = await self._next(tick)
            if event is None or isinstance(event, BlockStartEvent | DeltaEvent | BlockStopEvent):
                if isinstance(event, DeltaEvent):
                    self.meter.delta(event)
                yield event
                continue
            if isinstance(event, DoneEvent) and event.status == "succeeded":
                self.finished = True
                self.meter.done(event)
                self.produced = event.output_tokens
                yield event
                return
            raise self._ended_by(event)

    async def _next(self, tick: float) -> WorkerEvent | None:
        """The next event within `tick` seconds, or None; past the deadline, a timeout error."""
        remaining = self._deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise GatewayTimeoutError("the request timed out and was cancelled")
            return await self._watch.next(min(remaining, tick))
        except ApiError as exc:
            self.meter.fail(exc)
            raise

    def _ended_by(self, event: WorkerEvent) -> ApiError:
        """The error for an event that ends the request without an answer."""
        error: ApiError
        if isinstance(event, DoneEvent):
            self.finished = True
            self.meter.done(event)
            self.produced = event.output_tokens
            error = OverloadedError("the request was stopped by its worker; retry it")
        elif isinstance(event, ErrorEvent):
            self.finished = True
            error = api_error_for(event.error_type, event.message)
        else:
            error = ApiInternalError(f"unexpected {event.type} event from the worker")
        self.meter.fail(error)
        return error

    async def __aenter__(self) -> "RequestRun":
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """However the request ended: cancel it if unfinished, settle its rate-limit claim,
        close its metrics, unsubscribe. Once; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        # Before any await: a client that went away cancels this task, and under anyio's
        # cancellation every later await raises again, skipping the rest of this block.
        if not self.finished:
            self.platform.cancel_soon(self.admitted.request_id)
        self.meter.close(cancelled=not self.finished)
        self.platform.spawn(finish(self.platform, self.admitted, self.produced))
        await self.subscription.__aexit__(None, None, None)

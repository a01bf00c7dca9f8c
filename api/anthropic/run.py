"""One admitted request on its way through a worker: enqueue, events, and the cleanup.

Both answers, streamed and not, read the same events from here: the deadline, the watch on the
request's worker (api/supervision.py), metering, and what happens however the request ends
(an unfinished request is cancelled, its rate-limit claim settled, its metrics closed).
"""

import time
from collections.abc import AsyncIterator
from types import TracebackType

from redis.exceptions import RedisError

from api.anthropic.admission import Admitted, finish
from api.errors import ApiError, GatewayTimeoutError, OverloadedError, api_error_for
from api.metrics import RequestMeter
from api.platform import Platform
from api.relay import EventSubscription
from api.supervision import RequestWatch
from contract.events import DeltaEvent, DoneEvent


class RequestRun:
    """`await run.start()`, then `async with run:` around `run.events(...)`."""

    def __init__(self, platform: Platform, admitted: Admitted, meter: RequestMeter) -> None:
        self.platform = platform
        self.admitted = admitted
        self.meter = meter
        self.subscription = EventSubscription(platform.events, admitted.request_id)
        self.finished = False  # a terminal event arrived
        self.produced: int | None = None  # output tokens, once known

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

    async def events(self, tick: float) -> AsyncIterator[DeltaEvent | DoneEvent | None]:
        """Deltas, then the succeeded `DoneEvent`; None after `tick` quiet seconds.

        Any other ending (an error event, a timeout, a lost worker, a worker that stopped the
        request) is raised as an `ApiError`.
        """
        deadline = time.monotonic() + self.platform.settings.request_timeout_s
        watch = RequestWatch(self.platform, self.admitted.request_id, self.subscription)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GatewayTimeoutError("the request timed out and was cancelled")
                event = await watch.next(min(remaining, tick))
                if event is None or isinstance(event, DeltaEvent):
                    if event is not None:
                        self.meter.delta(event)
                    yield event
                    continue
                self.finished = True
                if isinstance(event, DoneEvent):
                    self.meter.done(event)
                    self.produced = event.output_tokens
                    if event.status == "cancelled":
                        raise OverloadedError("the request was stopped by its worker; retry it")
                    yield event
                    return
                raise api_error_for(event.error_type, event.message)
        except ApiError as exc:
            self.meter.fail(exc)
            raise

    async def __aenter__(self) -> "RequestRun":
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Before any await: a client that went away cancels this task, and under anyio's
        # cancellation every later await raises again, skipping the rest of this block.
        if not self.finished:
            self.platform.cancel_soon(self.admitted.request_id)
        self.meter.close(cancelled=not self.finished)
        self.platform.spawn(finish(self.platform, self.admitted, self.produced))
        await self.subscription.__aexit__(None, None, None)

"""Anthropic-compatible routes: /v1/messages, /v1/messages/count_tokens, /v1/models."""

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from redis.exceptions import RedisError

from api.anthropic import sse
from api.anthropic.admission import Admitted, admit, finish, resolve_model, tokenize_async
from api.anthropic.convert import message_delta_event, message_response, model_info, models_page
from api.anthropic.protocol import CountTokensRequest, MessagesRequest, ModelInfo, TokenCount
from api.credentials import PrincipalDep
from api.deps import PlatformDep
from api.errors import (
    ApiError,
    GatewayTimeoutError,
    OverloadedError,
    api_error_for,
    request_id_of,
)
from api.metrics import RequestMeter
from api.platform import Platform
from api.relay import EventSubscription
from api.supervision import RequestWatch
from contract.events import DeltaEvent, DoneEvent

# nginx's code for a client that went away before the answer; nobody reads it.
CLIENT_CLOSED_REQUEST = 499

router = APIRouter()


@router.post("/v1/messages")
async def create_message(
    body: MessagesRequest, principal: PrincipalDep, platform: PlatformDep, request: Request
) -> object:
    meter = RequestMeter(
        platform.catalog, principal, body.model, request_id_of(request), body.stream
    )
    try:
        admitted = await admit(platform, principal, body, request_id_of(request))
    except BaseException as exc:
        meter.fail(exc)
        meter.close(cancelled=True)
        raise
    try:
        subscription = await _start(platform, admitted)
    except ApiError as exc:
        meter.fail(exc)
        meter.close()
        await finish(platform, admitted, None)
        exc.headers = {**admitted.headers, **exc.headers}
        raise
    meter.queued(admitted.input_tokens)
    if body.stream:
        return StreamingResponse(
            _stream(platform, admitted, body.model, subscription, meter),
            media_type="text/event-stream; charset=utf-8",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no", **admitted.headers},
        )
    try:
        response = await _complete(platform, admitted, body.model, request, subscription, meter)
    except ApiError as exc:
        exc.headers = {**admitted.headers, **exc.headers}
        raise
    response.headers.update(admitted.headers)
    return response


async def _start(platform: Platform, admitted: Admitted) -> EventSubscription:
    """Subscribe first, then enqueue: no event can be published before we listen."""
    subscription = EventSubscription(platform.events, admitted.request_id)
    try:
        await subscription.__aenter__()
        await platform.enqueue(admitted.spec, admitted.job)
    except BaseException as exc:
        await subscription.__aexit__(None, None, None)
        await platform.abandon(admitted.request_id, "could not enqueue the request")
        if isinstance(exc, RedisError | OSError | TimeoutError):
            raise OverloadedError("the request queue is unavailable, retry shortly") from exc
        raise
    return subscription


async def _complete(
    platform: Platform,
    admitted: Admitted,
    model: str,
    request: Request,
    subscription: EventSubscription,
    meter: RequestMeter,
) -> Response:
    deadline = time.monotonic() + platform.settings.request_timeout_s
    watch = RequestWatch(platform, admitted.request_id, subscription)
    text: list[str] = []
    finished = False
    produced: int | None = None
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GatewayTimeoutError("the request timed out and was cancelled")
            event = await watch.next(min(remaining, 1.0))
            if event is None:
                if await request.is_disconnected():
                    return Response(status_code=CLIENT_CLOSED_REQUEST)
                continue
            if isinstance(event, DeltaEvent):
                meter.delta(event)
                text.append(event.text)
                continue
            finished = True
            if isinstance(event, DoneEvent):
                meter.done(event)
                produced = event.output_tokens
                if event.status == "cancelled":
                    raise OverloadedError("the request was stopped by its worker; retry it")
                response = message_response(
                    message_id=admitted.message_id, model=model, text="".join(text), done=event
                )
                return JSONResponse(response.model_dump(mode="json"))
            raise api_error_for(event.error_type, event.message)
    except ApiError as exc:
        meter.fail(exc)
        raise
    finally:
        # Before any await: a client that went away cancels this task, and under anyio's
        # cancellation every later await raises again, skipping the rest of this block.
        if not finished:
            platform.cancel_soon(admitted.request_id)
        meter.close(cancelled=not finished)
        platform.spawn(finish(platform, admitted, produced))
        await subscription.__aexit__(None, None, None)


async def _stream(
    platform: Platform,
    admitted: Admitted,
    model: str,
    subscription: EventSubscription,
    meter: RequestMeter,
) -> AsyncIterator[bytes]:
    deadline = time.monotonic() + platform.settings.request_timeout_s
    watch = RequestWatch(platform, admitted.request_id, subscription)
    finished = False
    produced: int | None = None
    try:
        yield sse.message_start(admitted.message_id, model, admitted.input_tokens)
        yield sse.content_block_start(0)
        yield sse.ping()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GatewayTimeoutError("the request timed out and was cancelled")
            event = await watch.next(min(remaining, platform.settings.ping_interval_s))
            if event is None:
                yield sse.ping()
            elif isinstance(event, DeltaEvent):
                meter.delta(event)
                yield sse.text_delta(0, event.text)
            elif isinstance(event, DoneEvent):
                finished = True
                meter.done(event)
                produced = event.output_tokens
                if event.status == "cancelled":
                    raise OverloadedError("the request was stopped by its worker; retry it")
                yield sse.content_block_stop(0)
                yield message_delta_event(event)
                yield sse.message_stop()
                return
            else:
                finished = True
                meter.fail(event.error_type)
                yield sse.error_event(event.error_type, event.message)
                return
    except ApiError as exc:
        meter.fail(exc)
        yield sse.error_event(exc.error_type, exc.message)
    finally:
        # Before any await: a client that went away cancels this task, and under anyio's
        # cancellation every later await raises again, skipping the rest of this block.
        if not finished:
            platform.cancel_soon(admitted.request_id)
        meter.close(cancelled=not finished)
        platform.spawn(finish(platform, admitted, produced))
        await subscription.__aexit__(None, None, None)


@router.post("/v1/messages/count_tokens")
async def count_tokens(
    body: CountTokensRequest, principal: PrincipalDep, platform: PlatformDep
) -> TokenCount:
    spec = resolve_model(platform, body.model)
    ids = await tokenize_async(platform, spec, body)
    return TokenCount(input_tokens=len(ids))


@router.get("/v1/models")
async def list_models(
    principal: PrincipalDep,
    platform: PlatformDep,
    after_id: str | None = None,
    before_id: str | None = None,
    limit: int = Query(default=20),
) -> object:
    page = models_page(platform.catalog.all(), after_id, before_id, limit)
    return page.model_dump(mode="json")


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, principal: PrincipalDep, platform: PlatformDep) -> ModelInfo:
    return model_info(resolve_model(platform, model_id))

"""Anthropic-compatible routes: /v1/messages, /v1/messages/count_tokens, /v1/models."""

from collections.abc import AsyncIterator
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.anthropic import sse
from api.anthropic.admission import (
    admit,
    current_limit_headers,
    resolve_model,
    spend_count,
    tokenize_async,
)
from api.anthropic.convert import (
    ContentAssembler,
    ThinkingSignatures,
    block_opening,
    message_delta_event,
    message_response,
    model_info,
    models_page,
)
from api.anthropic.protocol import CountTokensRequest, MessagesRequest, ModelInfo, TokenCount
from api.anthropic.run import RequestRun
from api.credentials import PrincipalDep
from api.deps import PlatformDep
from api.errors import ApiError, request_id_of
from api.metrics import RequestMeter
from api.request_body import BodyRoute
from api.response_headers import ResponseHeaders, response_headers
from contract.events import (
    BlockStartEvent,
    BlockStopEvent,
    ClaimedEvent,
    DeltaEvent,
    DoneEvent,
)

# nginx's code for a client that went away before the answer; nobody reads it.
CLIENT_CLOSED_REQUEST = 499

router = APIRouter(route_class=BodyRoute)


def _collect_headers(
    request: Request, principal: PrincipalDep, platform: PlatformDep
) -> ResponseHeaders:
    """Every answer to a known caller carries its rate-limit state, errors included (a body
    that fails validation too: dependencies run before the body is validated)."""
    headers = response_headers(request)
    headers.fallback = partial(current_limit_headers, platform, principal)
    return headers


HeadersDep = Annotated[ResponseHeaders, Depends(_collect_headers)]


@router.post("/v1/messages")
async def create_message(
    body: MessagesRequest,
    principal: PrincipalDep,
    platform: PlatformDep,
    headers: HeadersDep,
    request: Request,
) -> Response:
    request_id = request_id_of(request)
    meter = RequestMeter(platform.catalog, principal, body.model, request_id, body.stream)
    try:
        admitted = await admit(platform, principal, body, request_id, headers)
    except BaseException as exc:
        meter.fail(exc)
        meter.close(cancelled=True)
        raise
    run = RequestRun(platform, admitted, meter)
    await run.start()
    try:
        claimed = await run.claimed(request.is_disconnected)
    except BaseException:
        await run.close()
        raise
    if claimed is None:
        await run.close()
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    extra = await headers.resolve()
    if body.stream:
        return StreamingResponse(
            _stream(run, body.model, claimed),
            media_type="text/event-stream; charset=utf-8",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no", **extra},
        )
    response = await _complete(run, body.model, request)
    response.headers.update(extra)
    return response


async def _complete(run: RequestRun, model: str, request: Request) -> Response:
    content = ContentAssembler()
    async with run:
        async for event in run.events(tick=1.0):
            if event is None:
                if await request.is_disconnected():
                    return Response(status_code=CLIENT_CLOSED_REQUEST)
            elif isinstance(event, DoneEvent):
                message = message_response(
                    message_id=run.admitted.message_id,
                    model=model,
                    content=content.blocks(),
                    done=event,
                )
                return JSONResponse(message.model_dump(mode="json"))
            else:
                content.add(event)
    raise AssertionError("the events of a request end with its DoneEvent or an error")


async def _stream(run: RequestRun, model: str, claimed: ClaimedEvent) -> AsyncIterator[bytes]:
    async with run:
        try:
            yield sse.message_start(
                run.admitted.message_id,
                model,
                claimed.input_tokens
                - claimed.cache_read_input_tokens
                - claimed.cache_creation_input_tokens,
                cache_read_input_tokens=claimed.cache_read_input_tokens,
                cache_creation_input_tokens=claimed.cache_creation_input_tokens,
            )
            yield sse.ping()
            started = False
            signatures = ThinkingSignatures()
            async for event in run.events(tick=run.platform.settings.ping_interval_s):
                if event is None:
                    yield sse.ping()
                elif isinstance(event, BlockStartEvent):
                    started = True
                    signatures.add(event)
                    yield sse.content_block_start(event.block, block_opening(event))
                elif isinstance(event, DeltaEvent):
                    signatures.add(event)
                    yield sse.content_delta(event.block, event.kind, event.text)
                elif isinstance(event, BlockStopEvent):
                    signature = signatures.closing(event.block)
                    if signature is not None:
                        yield sse.signature_delta(event.block, signature)
                    yield sse.content_block_stop(event.block)
                else:
                    if not started:  # an empty answer still has its one (empty) text block
                        yield sse.content_block_start(0)
                        yield sse.content_block_stop(0)
                    yield message_delta_event(event)
                    yield sse.message_stop()
        except ApiError as exc:
            yield sse.error_event(exc.error_type, exc.message)


@router.post("/v1/messages/count_tokens")
async def count_tokens(
    body: CountTokensRequest,
    principal: PrincipalDep,
    platform: PlatformDep,
    headers: HeadersDep,
    response: Response,
) -> TokenCount:
    """Counted against the caller's request rates, as Anthropic does (no tokens, no slot)."""
    spec = resolve_model(platform, body.model)
    headers.update(await spend_count(platform, principal))
    ids = await tokenize_async(platform, spec, body)
    response.headers.update(await headers.resolve())
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

"""Message Batches: `/v1/messages/batches` (create, list, retrieve, cancel, delete, results).

Same credentials as `/v1/messages`; an account sees only its own batches (another's is a 404).
The requests run through the model's batch lane (api/anthropic/batch_dispatch.py); results are
streamed from the database as JSONL, a page of rows at a time.
"""

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from api.anthropic.batch_create import CUSTOM_ID, parse_batch
from api.anthropic.batch_protocol import (
    DeletedMessageBatch,
    MessageBatch,
    MessageBatchList,
    RequestCounts,
)
from api.anthropic.convert import ContentAssembler, message_response
from api.credentials import PrincipalDep
from api.deps import PlatformDep
from api.errors import InvalidRequestError, NotFoundError
from api.ids import base62
from api.platform import Platform
from contract.events import BlockStartEvent, BlockStopEvent, DeltaEvent, DoneEvent
from db import batches as db
from db.models import MessageBatch as BatchRow
from db.session import transaction

router = APIRouter()

# Result rows read per database round trip while streaming results.
RESULTS_PAGE = 500


def new_batch_id() -> str:
    return f"msgbatch_{base62()}"


def wire_batch(row: BatchRow, counts: db.Counts, base_url: str) -> MessageBatch:
    ended = row.processing_status == "ended" and row.archived_at is None
    return MessageBatch(
        id=row.id,
        processing_status=row.processing_status,  # type: ignore[arg-type]
        request_counts=RequestCounts(**counts.__dict__),
        created_at=row.created_at,
        expires_at=row.expires_at,
        ended_at=row.ended_at,
        cancel_initiated_at=row.cancel_initiated_at,
        archived_at=row.archived_at,
        results_url=f"{base_url}/v1/messages/batches/{row.id}/results" if ended else None,
    )


def _base_url(platform: Platform, request: Request) -> str:
    return (platform.settings.public_base_url or str(request.base_url)).rstrip("/")


def _one(platform: Platform, account_id: str, batch_id: str) -> tuple[BatchRow, db.Counts]:
    with transaction(platform.database_url) as session:
        row = db.get_batch(session, account_id, batch_id)
        if row is None:
            raise NotFoundError(f"message batch: {batch_id}")
        return row, db.counts(session, [row.id])[row.id]


# The create body, for the OpenAPI document: parsed by hand (batch_create.py), not by FastAPI.
CREATE_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["requests"],
                "additionalProperties": False,
                "properties": {
                    "requests": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["custom_id", "params"],
                            "additionalProperties": False,
                            "properties": {
                                "custom_id": {"type": "string", "pattern": CUSTOM_ID.pattern},
                                "params": {"$ref": "#/components/schemas/MessagesRequest"},
                            },
                        },
                    }
                },
            }
        }
    },
}


@router.post("/v1/messages/batches", openapi_extra={"requestBody": CREATE_BODY})
async def create_batch(
    principal: PrincipalDep, platform: PlatformDep, request: Request
) -> MessageBatch:
    body = await request.body()
    items = await run_in_threadpool(parse_batch, body, platform.settings, platform.catalog)
    expires_at = datetime.now(UTC) + timedelta(seconds=platform.settings.batch_expiry_s)

    def create() -> tuple[BatchRow, db.Counts]:
        with transaction(platform.database_url) as session:
            row = db.create_batch(
                session,
                batch_id=new_batch_id(),
                account_id=principal.account_id,
                api_key_id=principal.api_key_id,
                items=items,
                expires_at=expires_at,
            )
            return row, db.counts(session, [row.id])[row.id]

    row, counts = await run_in_threadpool(create)
    return wire_batch(row, counts, _base_url(platform, request))


@router.get("/v1/messages/batches")
async def list_batches(
    principal: PrincipalDep,
    platform: PlatformDep,
    request: Request,
    after_id: str | None = None,
    before_id: str | None = None,
    limit: int = Query(default=20, ge=1, le=1000),
) -> MessageBatchList:
    if after_id is not None and before_id is not None:
        raise InvalidRequestError("before_id and after_id: send at most one of them")

    def page() -> tuple[list[BatchRow], bool, dict[str, db.Counts]]:
        with transaction(platform.database_url) as session:
            rows, more = db.list_batches(
                session, principal.account_id, limit=limit, after_id=after_id, before_id=before_id
            )
            return rows, more, db.counts(session, [r.id for r in rows])

    rows, more, counts = await run_in_threadpool(page)
    base = _base_url(platform, request)
    data = [wire_batch(r, counts[r.id], base) for r in rows]
    return MessageBatchList(
        data=data,
        has_more=more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/v1/messages/batches/{batch_id}")
async def retrieve_batch(
    batch_id: str, principal: PrincipalDep, platform: PlatformDep, request: Request
) -> MessageBatch:
    row, counts = await run_in_threadpool(_one, platform, principal.account_id, batch_id)
    return wire_batch(row, counts, _base_url(platform, request))


@router.post("/v1/messages/batches/{batch_id}/cancel")
async def cancel_batch(
    batch_id: str, principal: PrincipalDep, platform: PlatformDep, request: Request
) -> MessageBatch:
    """Pending requests end `canceled` at once; running ones are stopped and pay for what
    they produced; the batch is `canceling` until the last has ended."""

    def cancel() -> list[str]:
        with transaction(platform.database_url) as session:
            row = db.get_batch(session, principal.account_id, batch_id)
            if row is None:
                raise NotFoundError(f"message batch: {batch_id}")
            return db.cancel_batch(session, row) if row.processing_status != "ended" else []

    for request_id in await run_in_threadpool(cancel):
        await platform.cancel(request_id)
    row, counts = await run_in_threadpool(_one, platform, principal.account_id, batch_id)
    return wire_batch(row, counts, _base_url(platform, request))


@router.delete("/v1/messages/batches/{batch_id}")
async def delete_batch(
    batch_id: str, principal: PrincipalDep, platform: PlatformDep
) -> DeletedMessageBatch:
    def delete() -> None:
        with transaction(platform.database_url) as session:
            row = db.get_batch(session, principal.account_id, batch_id)
            if row is None:
                raise NotFoundError(f"message batch: {batch_id}")
            if not db.delete_batch(session, row):
                raise InvalidRequestError(
                    f"message batch {batch_id} is {row.processing_status}: only an ended batch"
                    " can be deleted (cancel it first)"
                )

    await run_in_threadpool(delete)
    return DeletedMessageBatch(id=batch_id)


@router.get("/v1/messages/batches/{batch_id}/results")
async def batch_results(
    batch_id: str, principal: PrincipalDep, platform: PlatformDep
) -> StreamingResponse:
    """One JSON line per request: `custom_id` and its `result`."""
    row, _ = await run_in_threadpool(_one, platform, principal.account_id, batch_id)
    if row.archived_at is not None:
        raise NotFoundError(f"message batch {batch_id} is archived: its results were deleted")
    if row.processing_status != "ended":
        raise InvalidRequestError(
            f"message batch {batch_id} is {row.processing_status}: its results are available"
            " once it has ended"
        )
    return StreamingResponse(_lines(platform, batch_id), media_type="application/x-jsonl")


async def _lines(platform: Platform, batch_id: str) -> AsyncIterator[bytes]:
    after = -1
    while True:

        def page(after: int = after) -> list[db.ResultRow]:
            with transaction(platform.database_url) as session:
                return db.result_rows(session, batch_id, after_position=after, limit=RESULTS_PAGE)

        rows = await run_in_threadpool(page)
        if not rows:
            return
        yield b"".join(result_line(r) for r in rows)
        after = rows[-1].position


def result_line(row: db.ResultRow) -> bytes:
    """A request's line of the results file (Anthropic's MessageBatchIndividualResponse)."""
    result: dict[str, Any]
    if row.status == "succeeded" and row.result is not None:
        result = {"type": "succeeded", "message": _message(row, row.result["events"])}
    elif row.status == "errored":
        error = row.result or {"type": "api_error", "message": "unknown error"}
        result = {"type": "errored", "error": {"type": "error", "error": error}}
    else:
        result = {"type": row.status}
    return json.dumps({"custom_id": row.custom_id, "result": result}).encode() + b"\n"


_EVENTS: dict[str, Any] = {
    "block_start": BlockStartEvent,
    "delta": DeltaEvent,
    "block_stop": BlockStopEvent,
}


def _message(row: db.ResultRow, events: list[dict[str, Any]]) -> dict[str, Any]:
    content = ContentAssembler()
    done: DoneEvent | None = None
    for event in events:
        if event["type"] == "done":
            done = DoneEvent.model_validate(event)
        elif event["type"] in _EVENTS:
            content.add(_EVENTS[event["type"]].model_validate(event))
    assert done is not None and row.message_id is not None, row
    message = message_response(
        message_id=row.message_id, model=row.model or "", content=content.blocks(), done=done
    )
    return message.model_dump(mode="json")

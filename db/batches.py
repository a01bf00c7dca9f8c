"""Message Batches in Postgres: the batch and its requests, and every step of their lives.

Creation, reading, cancelling and deleting here; dispatch, settlement, retries, expiry and
archival in db/batch_steps.py. A batch's requests (`batch_request`) are `pending` until a
dispatcher gives one to a worker (`dispatched`: a row of `request` runs it, reserved like any
request), then end `succeeded`,
`errored`, `canceled` or `expired`. The worker writes a dispatched request's outcome in the
transaction of its settlement (`settle_item`), so an item never ends without its money settled
nor the other way round. A request that ended otherwise (its worker died and the sweeper
settled it, or it never left the queue) leaves its item dispatched; `retry_orphans` puts it
back to pending, up to a number of attempts (docs/batches.md). Functions take a session and
never commit.
"""

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from db.models import ITEM_ENDED, BatchRequest, MessageBatch, Request

# Rows per INSERT when a batch is created (a 100,000-request batch: 20 statements).
INSERT_CHUNK = 5_000


@dataclass(frozen=True)
class NewItem:
    """One request of a batch being created: its params, or the error that ended it at once."""

    custom_id: str
    model: str | None
    params: dict[str, Any] | None
    error: dict[str, str] | None = None  # {"type", "message"}: ends `errored` on creation


def dumps(value: object) -> str | None:
    return None if value is None else json.dumps(value)


@dataclass(frozen=True)
class Counts:
    processing: int = 0
    succeeded: int = 0
    errored: int = 0
    canceled: int = 0
    expired: int = 0


def create_batch(
    session: Session,
    *,
    batch_id: str,
    account_id: str,
    api_key_id: str | None,
    items: Sequence[NewItem],
    expires_at: datetime,
) -> MessageBatch:
    batch = MessageBatch(
        id=batch_id,
        account_id=account_id,
        api_key_id=api_key_id,
        processing_status="in_progress",
        request_count=len(items),
        expires_at=expires_at,
    )
    session.add(batch)
    session.flush()
    now = func.now()
    for start in range(0, len(items), INSERT_CHUNK):
        rows = [
            {
                "batch_id": batch_id,
                "position": start + offset,
                "custom_id": item.custom_id,
                "model": item.model,
                "params": dumps(item.params),
                "status": "errored" if item.error else "pending",
                "attempts": 0,
                "result": dumps(item.error),
            }
            for offset, item in enumerate(items[start : start + INSERT_CHUNK])
        ]
        session.execute(insert(BatchRequest), rows)
    session.execute(
        update(BatchRequest)
        .where(BatchRequest.batch_id == batch_id, BatchRequest.status == "errored")
        .values(ended_at=now)
    )
    session.refresh(batch)
    return batch


def get_batch(session: Session, account_id: str, batch_id: str) -> MessageBatch | None:
    """The account's batch (another account's is not found)."""
    return session.scalars(
        select(MessageBatch).where(
            MessageBatch.id == batch_id, MessageBatch.account_id == account_id
        )
    ).one_or_none()


def counts(session: Session, batch_ids: Iterable[str]) -> dict[str, Counts]:
    """Each batch's requests by outcome; `processing`: not ended yet."""
    ids = list(batch_ids)
    tallies: dict[str, dict[str, int]] = {i: {} for i in ids}
    if not ids:
        return {}
    rows = session.execute(
        select(BatchRequest.batch_id, BatchRequest.status, func.count())
        .where(BatchRequest.batch_id.in_(ids))
        .group_by(BatchRequest.batch_id, BatchRequest.status)
    )
    for batch_id, status, n in rows:
        key = status if status in ITEM_ENDED else "processing"
        tallies[batch_id][key] = tallies[batch_id].get(key, 0) + int(n)
    return {i: Counts(**t) for i, t in tallies.items()}


def list_batches(
    session: Session,
    account_id: str,
    *,
    limit: int,
    after_id: str | None = None,
    before_id: str | None = None,
) -> tuple[list[MessageBatch], bool]:
    """The account's batches, newest first: the page after `after_id` (older ones) or before
    `before_id` (newer ones); and whether more follow in that direction."""
    query = select(MessageBatch).where(MessageBatch.account_id == account_id)
    key = (MessageBatch.created_at, MessageBatch.id)
    cursor_id = after_id or before_id
    if cursor_id is not None:
        cursor = get_batch(session, account_id, cursor_id)
        if cursor is None:
            return [], False
        mark = (cursor.created_at, cursor.id)
        if after_id is not None:
            query = query.where(or_(key[0] < mark[0], and_(key[0] == mark[0], key[1] < mark[1])))
        else:
            query = query.where(or_(key[0] > mark[0], and_(key[0] == mark[0], key[1] > mark[1])))
    if before_id is not None:
        rows = list(session.scalars(query.order_by(*key).limit(limit + 1)))
        return list(reversed(rows[:limit])), len(rows) > limit
    rows = list(session.scalars(query.order_by(key[0].desc(), key[1].desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def cancel_batch(session: Session, batch: MessageBatch) -> list[str]:
    """in_progress -> canceling: pending requests end `canceled` (they cost nothing); the ids of
    the requests still running, which the caller stops."""
    if batch.processing_status == "in_progress":
        batch.processing_status = "canceling"
        batch.cancel_initiated_at = session.scalar(select(func.now()))
    return stop_open(session, [batch.id], "canceled")


def stop_open(session: Session, batch_ids: list[str], ending: str) -> list[str]:
    """Pending requests of these batches end `ending`; the ids of the requests of those
    dispatched, which the caller stops."""
    session.execute(
        update(BatchRequest)
        .where(BatchRequest.batch_id.in_(batch_ids), BatchRequest.status == "pending")
        .values(status=ending, ended_at=func.now())
    )
    return [
        r
        for r in session.scalars(
            select(BatchRequest.request_id).where(
                BatchRequest.batch_id.in_(batch_ids), BatchRequest.status == "dispatched"
            )
        )
        if r is not None
    ]


def delete_batch(session: Session, batch: MessageBatch) -> bool:
    """Deletes an ended batch and its requests; False (nothing done) if it has not ended."""
    if batch.processing_status != "ended":
        return False
    session.execute(delete(MessageBatch).where(MessageBatch.id == batch.id))
    return True


@dataclass(frozen=True)
class ResultRow:
    position: int
    custom_id: str
    status: str
    result: dict[str, Any] | None
    model: str | None
    message_id: str | None


def result_rows(
    session: Session, batch_id: str, *, after_position: int, limit: int
) -> list[ResultRow]:
    """The ended requests of a batch after `after_position`, in order, with the message id of
    the request that answered each (for a succeeded one)."""
    rows = session.execute(
        select(
            BatchRequest.position,
            BatchRequest.custom_id,
            BatchRequest.status,
            BatchRequest.result,
            BatchRequest.model,
            Request.message_id,
        )
        .outerjoin(Request, Request.id == BatchRequest.request_id)
        .where(BatchRequest.batch_id == batch_id, BatchRequest.position > after_position)
        .order_by(BatchRequest.position)
        .limit(limit)
    )
    return [
        ResultRow(p, c, s, json.loads(r) if r is not None else None, m, i)
        for p, c, s, r, m, i in rows
    ]

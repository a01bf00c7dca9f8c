"""Message Batches in Postgres: the batch and its requests, and every step of their lives.

A batch's requests (`batch_request`) are `pending` until a dispatcher gives one to a worker
(`dispatched`: a row of `request` runs it, reserved like any request), then end `succeeded`,
`errored`, `canceled` or `expired`. The worker writes a dispatched request's outcome in the
transaction of its settlement (`settle_item`), so an item never ends without its money settled
nor the other way round. A request that ended otherwise (its worker died and the sweeper
settled it, or it never left the queue) leaves its item dispatched; `retry_orphans` puts it
back to pending, up to a number of attempts (docs/batches.md). Functions take a session and
never commit.
"""

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, delete, func, insert, or_, select, text, update
from sqlalchemy.orm import Session

from db.ledger import Outcome, Settlement, settle_request
from db.models import ITEM_ENDED, BatchRequest, MessageBatch, Request
from db.pricing import Prices

# Rows per INSERT when a batch is created (a 100,000-request batch: 20 statements).
INSERT_CHUNK = 5_000
# The advisory lock that makes one dispatcher at a time (of all API replicas) count what is in
# flight and add to it; the others skip their turn.
DISPATCH_LOCK = 0x6162_6C62  # "ablb"


@dataclass(frozen=True)
class NewItem:
    """One request of a batch being created: its params, or the error that ended it at once."""

    custom_id: str
    model: str | None
    params: dict[str, Any] | None
    error: dict[str, str] | None = None  # {"type", "message"}: ends `errored` on creation


def _json(value: object) -> str | None:
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
                "params": _json(item.params),
                "status": "errored" if item.error else "pending",
                "attempts": 0,
                "result": _json(item.error),
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
    return _stop_open(session, [batch.id], "canceled")


def _stop_open(session: Session, batch_ids: list[str], ending: str) -> list[str]:
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


# -- dispatch -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PendingItem:
    batch_id: str
    position: int
    custom_id: str
    model: str | None
    params: dict[str, Any] | None
    account_id: str
    api_key_id: str | None
    attempts: int


def lock_dispatch(session: Session) -> bool:
    """Whether this transaction may dispatch (no other dispatcher is at it right now)."""
    return bool(session.scalar(select(func.pg_try_advisory_xact_lock(DISPATCH_LOCK))))


def in_flight(session: Session) -> dict[str | None, int]:
    """Dispatched, not yet ended requests, by the model their params name."""
    rows = session.execute(
        select(BatchRequest.model, func.count())
        .where(BatchRequest.status == "dispatched")
        .group_by(BatchRequest.model)
    )
    return {model: int(n) for model, n in rows}


def take_pending(session: Session, limit: int) -> list[PendingItem]:
    """Up to `limit` pending requests of live batches, oldest batch first, locked for this
    transaction (rows another transaction holds are skipped, never waited for)."""
    rows = session.execute(
        select(
            BatchRequest.batch_id,
            BatchRequest.position,
            BatchRequest.custom_id,
            BatchRequest.model,
            BatchRequest.params,
            MessageBatch.account_id,
            MessageBatch.api_key_id,
            BatchRequest.attempts,
        )
        .join(MessageBatch, MessageBatch.id == BatchRequest.batch_id)
        .where(
            BatchRequest.status == "pending",
            MessageBatch.processing_status == "in_progress",
            MessageBatch.expires_at > func.now(),
        )
        .order_by(MessageBatch.created_at, BatchRequest.batch_id, BatchRequest.position)
        .limit(limit)
        .with_for_update(of=BatchRequest, skip_locked=True)
    )
    return [
        PendingItem(b, p, c, m, json.loads(params) if params is not None else None, a, k, n)
        for b, p, c, m, params, a, k, n in rows
    ]


def mark_dispatched(session: Session, item: PendingItem, request_id: str) -> None:
    session.execute(
        update(BatchRequest)
        .where(BatchRequest.batch_id == item.batch_id, BatchRequest.position == item.position)
        .values(status="dispatched", request_id=request_id, dispatched_at=func.now())
    )


def mark_errored(session: Session, item: PendingItem, error_type: str, message: str) -> None:
    session.execute(
        update(BatchRequest)
        .where(BatchRequest.batch_id == item.batch_id, BatchRequest.position == item.position)
        .values(
            status="errored",
            result=_json({"type": error_type, "message": message}),
            ended_at=func.now(),
        )
    )


# The outcome of a dispatched request, written by the worker in its settlement's transaction.
# A request cancelled (its batch canceled, or expired) ends its item canceled or expired; a
# request that failed leaves its item dispatched for `retry_orphans`.
_END_ITEM = text(
    """
    UPDATE batch_request r
    SET status = CASE WHEN CAST(:succeeded AS boolean) THEN 'succeeded'
                      WHEN b.expires_at <= now() THEN 'expired' ELSE 'canceled' END,
        result = :result, ended_at = now()
    FROM message_batch b
    WHERE r.request_id = :request_id AND r.status = 'dispatched' AND b.id = r.batch_id
    """
)


def settle_item(
    session: Session,
    request_id: str,
    outcome: Outcome,
    result: Callable[[Settlement], str | None],
    *,
    legacy_prices: Prices | None = None,
) -> Settlement:
    """Settles a batch request's request like any other, and ends its item in the same
    transaction: `result(settlement)` is the stored result (JSON) of a succeeded one."""
    settlement = settle_request(session, request_id, outcome, legacy_prices=legacy_prices)
    if not settlement.already_settled and outcome.status != "failed":
        succeeded = outcome.status == "succeeded"
        session.execute(
            _END_ITEM,
            {
                "request_id": request_id,
                "succeeded": succeeded,
                "result": result(settlement) if succeeded else None,
            },
        )
    return settlement


@dataclass(frozen=True)
class Orphan:
    batch_id: str
    position: int
    request_status: str
    started: bool
    error: str | None
    attempts: int
    batch_status: str
    expired: bool


def retry_orphans(session: Session, max_attempts: int, limit: int = 500) -> list[Orphan]:
    """Dispatched requests whose request ended without the worker ending them (it died, or the
    request never left the queue): back to pending, or ended when the batch is canceling or
    expired, or errored after `max_attempts` runs that failed."""
    rows = session.execute(
        select(
            BatchRequest.batch_id,
            BatchRequest.position,
            Request.status,
            Request.started_at.is_not(None),
            Request.error,
            BatchRequest.attempts,
            MessageBatch.processing_status,
            MessageBatch.expires_at <= func.now(),
        )
        .join(Request, Request.id == BatchRequest.request_id)
        .join(MessageBatch, MessageBatch.id == BatchRequest.batch_id)
        .where(
            BatchRequest.status == "dispatched",
            Request.status.in_(("succeeded", "failed", "cancelled")),
        )
        .limit(limit)
        .with_for_update(of=BatchRequest, skip_locked=True)
    )
    orphans = [Orphan(*row) for row in rows]
    for orphan in orphans:
        where = and_(
            BatchRequest.batch_id == orphan.batch_id, BatchRequest.position == orphan.position
        )
        attempts = orphan.attempts + (1 if orphan.started else 0)
        values: dict[str, Any]
        if orphan.request_status == "succeeded":
            # Charged, but its answer was not stored with it (a request settled by something
            # other than its worker): never run again, which would charge it twice.
            values = {
                "status": "errored",
                "result": _json({"type": "api_error", "message": "the answer was lost"}),
                "ended_at": func.now(),
            }
        elif orphan.expired:
            values = {"status": "expired", "ended_at": func.now()}
        elif orphan.batch_status != "in_progress" or orphan.request_status == "cancelled":
            values = {"status": "canceled", "ended_at": func.now()}
        elif attempts >= max_attempts:
            message = f"the request failed {attempts} times; the last: {orphan.error}"
            values = {
                "status": "errored",
                "result": _json({"type": "api_error", "message": message}),
                "ended_at": func.now(),
                "attempts": attempts,
            }
        else:
            values = {"status": "pending", "attempts": attempts}
        session.execute(update(BatchRequest).where(where).values(**values))
    return orphans


def queued_since(session: Session, older_than: timedelta) -> list[tuple[str, str]]:
    """(request id, model) of dispatched requests still queued `older_than` after their
    dispatch: lost if no job waits in their lane (a worker took the job and died before its
    claim; the broker gives it back only after its visibility timeout)."""
    rows = session.execute(
        select(Request.id, Request.model)
        .join(BatchRequest, BatchRequest.request_id == Request.id)
        .where(
            BatchRequest.status == "dispatched",
            Request.status == "queued",
            Request.created_at < func.now() - older_than,
        )
    )
    return [(request_id, model) for request_id, model in rows]


def expire_batches(session: Session) -> list[str]:
    """Pending requests of batches past their expiry end `expired`; the ids of those still
    running, which the caller stops (the worker's settlement then ends them expired)."""
    ids = list(
        session.scalars(
            select(MessageBatch.id).where(
                MessageBatch.processing_status != "ended", MessageBatch.expires_at <= func.now()
            )
        )
    )
    return _stop_open(session, ids, "expired") if ids else []


def end_finished(session: Session) -> list[str]:
    """Batches whose every request has ended: `ended` now; their ids."""
    still_open = (
        select(BatchRequest.position)
        .where(
            BatchRequest.batch_id == MessageBatch.id,
            BatchRequest.status.in_(("pending", "dispatched")),
        )
        .exists()
    )
    return list(
        session.scalars(
            update(MessageBatch)
            .where(MessageBatch.processing_status != "ended", ~still_open)
            .values(processing_status="ended", ended_at=func.now())
            .returning(MessageBatch.id)
        )
    )


def archive_old(session: Session, retention: timedelta) -> list[str]:
    """Batches ended longer than `retention` ago: archived, their params and results dropped."""
    ids = list(
        session.scalars(
            update(MessageBatch)
            .where(
                MessageBatch.processing_status == "ended",
                MessageBatch.archived_at.is_(None),
                MessageBatch.ended_at < func.now() - retention,
            )
            .values(archived_at=func.now())
            .returning(MessageBatch.id)
        )
    )
    if ids:
        session.execute(
            update(BatchRequest)
            .where(BatchRequest.batch_id.in_(ids))
            .values(params=None, result=None)
        )
    return ids


def open_items(session: Session | Connection) -> dict[str, int]:
    """Batch requests not ended, by status (metrics)."""
    rows = session.execute(
        select(BatchRequest.status, func.count())
        .where(BatchRequest.status.in_(("pending", "dispatched")))
        .group_by(BatchRequest.status)
    ).all()
    return {status: int(n) for status, n in rows}

"""Message Batches in Postgres, from dispatch to the end: the steps of the API's batch
dispatcher (api/anthropic/batch_dispatch.py) and the worker's settlement of a batch request.

Several API replicas run the dispatcher: one at a time fills what is in flight (a
transaction-level advisory lock), and rows are taken with SKIP LOCKED. Functions take a
session and never commit.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, and_, func, select, text, update
from sqlalchemy.orm import Session

from db.batches import dumps, stop_open
from db.ledger import Outcome, Settlement, settle_request
from db.models import BatchRequest, MessageBatch, Request
from db.pricing import Prices

# The advisory lock that makes one dispatcher at a time (of all API replicas) count what is in
# flight and add to it; the others skip their turn.
DISPATCH_LOCK = 0x6162_6C62  # "ablb"


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
            result=dumps({"type": error_type, "message": message}),
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
                "result": dumps({"type": "api_error", "message": "the answer was lost"}),
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
                "result": dumps({"type": "api_error", "message": message}),
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
    return stop_open(session, ids, "expired") if ids else []


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

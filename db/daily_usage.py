"""The `daily_usage` rollup: settled requests summed per UTC day, account, key and model.

`settle_request` (db/ledger.py) adds a request to its day's row in the same statement that
settles it, so a request is added exactly once (its settlement is) and the rollup always equals
the sums over the request rows;
`discrepancies` proves it. Functions take a session and never commit.
"""

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Date,
    Select,
    cast,
    delete,
    func,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.models import TERMINAL_STATUSES, DailyUsage, Request

ROLLUP_METRICS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "credits_charged",
    "cost_usd",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
)
# Stored for a request without a key (JWT): primary key columns cannot be NULL.
NO_KEY = ""


def utc_day(moment: datetime) -> date:
    """The UTC calendar day of a moment: the day its request is counted on."""
    return moment.astimezone(UTC).date()


def _day_of_request() -> Any:
    # Must agree with utc_day: timezone('UTC', timestamptz) is the UTC wall-clock time.
    return cast(func.timezone(literal_column("'UTC'"), Request.created_at), Date)


def _from_requests(account_id: str | None = None) -> Select[Any]:
    """The rollup's rows computed from the request table."""
    query = (
        select(
            _day_of_request().label("day"),
            Request.account_id,
            func.coalesce(Request.api_key_id, NO_KEY).label("api_key_id"),
            Request.model,
            func.count().label("requests"),
            cast(func.sum(Request.input_tokens), BigInteger).label("input_tokens"),
            cast(func.sum(Request.output_tokens), BigInteger).label("output_tokens"),
            cast(func.sum(Request.credits_charged), BigInteger).label("credits_charged"),
            func.sum(Request.cost_usd).label("cost_usd"),
            cast(func.sum(Request.cache_read_input_tokens), BigInteger).label(
                "cache_read_input_tokens"
            ),
            cast(func.sum(Request.cache_creation_input_tokens), BigInteger).label(
                "cache_creation_input_tokens"
            ),
        )
        .where(Request.status.in_(TERMINAL_STATUSES))
        .group_by(
            literal_column("1"), literal_column("2"), literal_column("3"), literal_column("4")
        )
    )
    if account_id is not None:
        query = query.where(Request.account_id == account_id)
    return query


def _stored(account_id: str | None = None) -> Select[Any]:
    query = select(
        DailyUsage.day,
        DailyUsage.account_id,
        DailyUsage.api_key_id,
        DailyUsage.model,
        *(getattr(DailyUsage, name) for name in ROLLUP_METRICS),
    )
    if account_id is not None:
        query = query.where(DailyUsage.account_id == account_id)
    return query


def discrepancies(
    session: Session, *, account_id: str | None = None
) -> list[tuple[str, tuple[Any, ...]]]:
    """Rollup rows that differ from the sums over the requests, each side's version labelled
    `requests` (what the requests sum to) or `rollup` (what is stored)."""
    computed, stored = _from_requests(account_id), _stored(account_id)
    missing = session.execute(computed.except_(stored)).all()
    extra = session.execute(stored.except_(computed)).all()
    return [("requests", tuple(row)) for row in missing] + [("rollup", tuple(row)) for row in extra]


def rebuild(session: Session) -> int:
    """Recompute the whole rollup from the requests; rows written. Settlements wait for the
    caller's commit (the table is locked), so none is lost or counted twice."""
    session.execute(text("LOCK TABLE daily_usage IN EXCLUSIVE MODE"))
    session.execute(delete(DailyUsage))
    computed = _from_requests()
    columns = ["day", "account_id", "api_key_id", "model", *ROLLUP_METRICS]
    result = session.execute(insert(DailyUsage).from_select(columns, computed))
    return int(result.rowcount)  # type: ignore[attr-defined]

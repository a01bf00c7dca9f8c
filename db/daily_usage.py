"""The `daily_usage` rollup: settled requests summed per UTC day, account, key and model.

`record_usage` runs inside `settle_request`'s transaction, so a request is added exactly once
(its settlement is) and the rollup always equals the sums over the request rows;
`discrepancies` proves it. Functions take a session and never commit.
"""

from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Date,
    Select,
    Table,
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

ROLLUP_METRICS = ("requests", "input_tokens", "output_tokens", "credits_charged", "cost_usd")
# Stored for a request without a key (JWT): primary key columns cannot be NULL.
NO_KEY = ""


def utc_day(moment: datetime) -> date:
    """The UTC calendar day of a moment: the day its request is counted on."""
    return moment.astimezone(UTC).date()


@dataclass(frozen=True)
class SettledUsage:
    """What one settled request adds to the rollup."""

    created_at: datetime
    account_id: str
    api_key_id: str | None
    model: str
    input_tokens: int
    output_tokens: int
    credits_charged: int
    cost_usd: Decimal


_DAILY: Table = DailyUsage.__table__  # type: ignore[assignment]
_NEW_ROW = insert(_DAILY)
# Built once, like the settlement's other statements (db/ledger.py says why).
_ADD_TO_DAY = _NEW_ROW.on_conflict_do_update(
    index_elements=[_DAILY.c.day, _DAILY.c.account_id, _DAILY.c.api_key_id, _DAILY.c.model],
    set_={name: _DAILY.c[name] + _NEW_ROW.excluded[name] for name in ROLLUP_METRICS},
)


def record_usage(session: Session | Connection, usage: SettledUsage) -> None:
    """Add one settled request to its day's row (upsert). Call it in the settlement's
    transaction, after the request's status moved: that is what makes it exactly once."""
    row = {
        "day": utc_day(usage.created_at),
        "account_id": usage.account_id,
        "api_key_id": usage.api_key_id or NO_KEY,
        "model": usage.model,
        "requests": 1,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "credits_charged": usage.credits_charged,
        "cost_usd": usage.cost_usd,
    }
    session.execute(_ADD_TO_DAY, row)


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


def discrepancies(session: Session, *, account_id: str | None = None) -> list[tuple[Any, ...]]:
    """Rollup rows that differ from the sums over the requests (either side's version)."""
    computed, stored = _from_requests(account_id), _stored(account_id)
    missing = session.execute(computed.except_(stored)).all()
    extra = session.execute(stored.except_(computed)).all()
    return [tuple(row) for row in (*missing, *extra)]


def rebuild(session: Session) -> int:
    """Recompute the whole rollup from the requests; rows written. Settlements wait for the
    caller's commit (the table is locked), so none is lost or counted twice."""
    session.execute(text("LOCK TABLE daily_usage IN EXCLUSIVE MODE"))
    session.execute(delete(DailyUsage))
    computed = _from_requests()
    columns = ["day", "account_id", "api_key_id", "model", *ROLLUP_METRICS]
    result = session.execute(insert(DailyUsage).from_select(columns, computed))
    return int(result.rowcount)  # type: ignore[attr-defined]

"""Billing queries: usage over a time range, grouped any way, and the top accounts by spend.

Usage counts settled requests (succeeded, failed, cancelled) by the time they were created,
in the half-open range [start, end); days are UTC calendar days. Requests still queued or
running are not counted: their tokens and charge are not known yet. Whole days inside the
range are read from the `daily_usage` rollup (db/daily_usage.py), the partial days at its ends
from `request`; both are exact, so the answer is the same as summing the request rows.
Functions take a session and never commit. An account's ledger page is served by
`api.admin.routes.account_ledger`.
"""

from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    Select,
    and_,
    cast,
    func,
    literal,
    literal_column,
    null,
    or_,
    select,
    union_all,
)
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from db.daily_usage import NO_KEY, ROLLUP_METRICS, utc_day
from db.models import TERMINAL_STATUSES, Account, DailyUsage, Request

# The names the API, the CLI and the CSV header use, in output order.
GROUP_BY_FIELDS = ("account", "model", "day", "key", "batch")
# Column of a usage row for each group-by name. `batch`: the Message Batch (null: interactive
# requests); the rollup does not keep it, so a report grouped by batch reads request rows.
GROUP_COLUMN_NAMES = {
    "account": "account_id",
    "model": "model",
    "day": "day",
    "key": "key_id",
    "batch": "batch_id",
}
# input_tokens counts every prompt token; the cache columns say how many of them were read from
# the prompt cache and written to it (docs/caching.md).
METRIC_NAMES = ROLLUP_METRICS
# Hash-aggregating a month of rollup rows needs more than PostgreSQL's default 4MB.
REPORT_WORK_MEM = "64MB"


class UnknownGroup(ValueError):
    """A group-by name that is not one of GROUP_BY_FIELDS."""


class UsageRow(NamedTuple):
    """One group's totals; the group columns not grouped by are None."""

    account_id: str | None
    model: str | None
    day: date | None
    key_id: str | None
    batch_id: str | None
    requests: int
    input_tokens: int
    output_tokens: int
    credits_charged: int
    cost_usd: Decimal
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0

    def as_dict(self, group_by: Sequence[str]) -> dict[str, Any]:
        """The grouped columns, then the metrics (the shape of a JSON or CSV row)."""
        return {name: getattr(self, name) for name in usage_columns(group_by)}


class AccountSpend(NamedTuple):
    account_id: str
    name: str
    requests: int
    input_tokens: int
    output_tokens: int
    credits_charged: int
    cost_usd: Decimal
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


def parse_group_by(value: str | Iterable[str] | None) -> list[str]:
    """`"account,day"` (or a list) -> ["account", "day"] in canonical order; no duplicates."""
    if value is None:
        return []
    parts = value.split(",") if isinstance(value, str) else list(value)
    names = {p.strip().lower() for p in parts if p.strip()}
    unknown = sorted(names - set(GROUP_BY_FIELDS))
    if unknown:
        raise UnknownGroup(
            f"unknown group_by {', '.join(unknown)}: use any of {', '.join(GROUP_BY_FIELDS)}"
        )
    return [name for name in GROUP_BY_FIELDS if name in names]


def usage_group_columns(group_by: Sequence[str]) -> list[str]:
    """Row column names for group-by names, e.g. ["account", "key"] -> ["account_id", "key_id"]."""
    return [GROUP_COLUMN_NAMES[name] for name in parse_group_by(group_by)]


def usage_columns(group_by: Sequence[str]) -> list[str]:
    """Every column of a usage row for this grouping: the CSV header."""
    return [*usage_group_columns(group_by), *METRIC_NAMES]


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def whole_days(start: datetime, end: datetime) -> tuple[date, date]:
    """The UTC days entirely inside [start, end), as [first, stop); first >= stop if none."""
    first = utc_day(start)
    if _midnight(first) < start:
        first += timedelta(days=1)
    return first, utc_day(end)


def _from_rollup(first: date, stop: date) -> Select[Any]:
    return select(
        DailyUsage.account_id,
        DailyUsage.model,
        DailyUsage.day,
        func.nullif(DailyUsage.api_key_id, NO_KEY).label("key_id"),
        null().label("batch_id"),
        *(getattr(DailyUsage, name) for name in METRIC_NAMES),
    ).where(DailyUsage.day >= first, DailyUsage.day < stop)


def _from_requests(ranges: list[tuple[datetime, datetime]]) -> Select[Any]:
    day = func.timezone(literal_column("'UTC'"), Request.created_at)
    return select(
        Request.account_id,
        Request.model,
        cast(day, DailyUsage.day.type).label("day"),
        Request.api_key_id.label("key_id"),
        Request.batch_id,
        literal(1, BigInteger).label("requests"),
        cast(Request.input_tokens, BigInteger).label("input_tokens"),
        cast(Request.output_tokens, BigInteger).label("output_tokens"),
        Request.credits_charged,
        Request.cost_usd,
        cast(Request.cache_read_input_tokens, BigInteger).label("cache_read_input_tokens"),
        cast(Request.cache_creation_input_tokens, BigInteger).label("cache_creation_input_tokens"),
    ).where(
        Request.status.in_(TERMINAL_STATUSES),
        or_(*(and_(Request.created_at >= a, Request.created_at < b) for a, b in ranges)),
    )


def _parts(
    start: datetime, end: datetime, filters: dict[str, str | None], by_batch: bool = False
) -> list[Select[Any]]:
    first, stop = whole_days(start, end)
    if by_batch:
        first = stop  # the rollup has no batch: every request row is read
    parts: list[Select[Any]] = []
    if first < stop:
        parts.append(_from_rollup(first, stop))
        edges = [(start, _midnight(first)), (_midnight(stop), end)]
    else:
        edges = [(start, end)]
    edges = [(a, b) for a, b in edges if a < b]
    if edges:
        parts.append(_from_requests(edges))
    columns = {"account_id": "account_id", "key_id": "key_id", "model": "model"}
    for name, value in filters.items():
        if value is not None:
            parts = [p.where(p.selected_columns[columns[name]] == value) for p in parts]
    return parts


def usage_query(
    start: datetime,
    end: datetime,
    group_by: Sequence[str] = (),
    *,
    account_id: str | None = None,
    key_id: str | None = None,
    model: str | None = None,
) -> Select[Any]:
    """The usage SELECT: rows shaped as UsageRow, ordered by the grouped columns."""
    filters = {"account_id": account_id, "key_id": key_id, "model": model}
    parts = _parts(start, end, filters, by_batch="batch" in group_by)
    rows = (union_all(*parts) if len(parts) > 1 else parts[0]).subquery("settled")
    grouped = usage_group_columns(group_by)
    columns: list[ColumnElement[Any]] = [
        rows.c[name] if name in grouped else null().label(name)
        for name in GROUP_COLUMN_NAMES.values()
    ]
    metrics = [
        func.coalesce(func.sum(rows.c.cost_usd), 0).label(name)
        if name == "cost_usd"
        else cast(func.coalesce(func.sum(rows.c[name]), 0), BigInteger).label(name)
        for name in METRIC_NAMES
    ]
    query = select(*columns, *metrics)
    if grouped:
        keys = [rows.c[name] for name in grouped]
        query = query.group_by(*keys).order_by(*(k.asc().nulls_first() for k in keys))
    return query


def raise_work_mem(session: Session) -> None:
    """Give the rest of this transaction REPORT_WORK_MEM (set_config(..., is_local))."""
    session.execute(select(func.set_config("work_mem", REPORT_WORK_MEM, True)))


def usage(
    session: Session,
    start: datetime,
    end: datetime,
    group_by: Sequence[str] = (),
    *,
    account_id: str | None = None,
    key_id: str | None = None,
    model: str | None = None,
) -> list[UsageRow]:
    """Requests, tokens, credits and USD cost per group over [start, end); see the module doc.

    Rows come ordered by their group columns (a null key first). Raises the transaction's
    `work_mem` (like SET LOCAL) so that the groups are hash-aggregated in memory.
    """
    query = usage_query(start, end, group_by, account_id=account_id, key_id=key_id, model=model)
    raise_work_mem(session)
    return [UsageRow._make(row) for row in session.execute(query)]


def usage_totals(rows: Iterable[UsageRow]) -> UsageRow:
    """The sum of usage rows, with no group columns."""
    rows = list(rows)
    return UsageRow(
        None,
        None,
        None,
        None,
        None,
        sum(r.requests for r in rows),
        sum(r.input_tokens for r in rows),
        sum(r.output_tokens for r in rows),
        sum(r.credits_charged for r in rows),
        sum((r.cost_usd for r in rows), Decimal(0)),
        sum(r.cache_read_input_tokens for r in rows),
        sum(r.cache_creation_input_tokens for r in rows),
    )


def top_accounts(
    session: Session, start: datetime, end: datetime, limit: int = 10
) -> list[AccountSpend]:
    """The accounts that spent the most credits over [start, end), most first."""
    spend = usage_query(start, end, ["account"]).subquery("spend")
    query = (
        select(spend.c.account_id, Account.name, *(spend.c[name] for name in METRIC_NAMES))
        .join(Account, Account.id == spend.c.account_id)
        .order_by(spend.c.credits_charged.desc(), spend.c.account_id)
        .limit(limit)
    )
    raise_work_mem(session)
    return [AccountSpend._make(row) for row in session.execute(query)]

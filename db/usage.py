"""Billing queries: usage over a time range, grouped any way, and the top accounts by spend.

Usage counts settled requests (succeeded, failed, cancelled) by the time they were created,
in the half-open range [start, end); days are UTC calendar days. Requests still queued or
running are not counted: their tokens and charge are not known yet. Functions take a session
and never commit. An account's ledger page is served by `api.admin.routes.account_ledger`.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, Date, Select, cast, func, literal_column, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from db.models import TERMINAL_STATUSES, Account, Request

# The names the API, the CLI and the CSV header use, in output order.
GROUP_BY_FIELDS = ("account", "model", "day", "key")
# Column of a usage row for each group-by name.
GROUP_COLUMN_NAMES = {"account": "account_id", "model": "model", "day": "day", "key": "key_id"}
METRIC_NAMES = ("requests", "input_tokens", "output_tokens", "credits_charged", "cost_usd")


class UnknownGroup(ValueError):
    """A group-by name that is not one of GROUP_BY_FIELDS."""


@dataclass(frozen=True)
class UsageRow:
    """One group's totals; the group columns not grouped by are None."""

    account_id: str | None
    model: str | None
    day: date | None
    key_id: str | None
    requests: int
    input_tokens: int
    output_tokens: int
    credits_charged: int
    cost_usd: Decimal

    def as_dict(self, group_by: Sequence[str]) -> dict[str, Any]:
        """The grouped columns, then the metrics (the shape of a JSON or CSV row)."""
        columns = [*usage_group_columns(group_by), *METRIC_NAMES]
        return {name: getattr(self, name) for name in columns}


@dataclass(frozen=True)
class AccountSpend:
    account_id: str
    name: str
    requests: int
    input_tokens: int
    output_tokens: int
    credits_charged: int
    cost_usd: Decimal


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


# Hash-aggregating a month of requests needs more than PostgreSQL's default 4MB.
REPORT_WORK_MEM = "64MB"


def _day() -> ColumnElement[date]:
    # The UTC calendar day, whatever the session's TimeZone setting. 'UTC' is a literal, not a
    # parameter: only then does the expression match statistics st_request_usage (0002).
    return cast(func.timezone(literal_column("'UTC'"), Request.created_at), Date)


def _group_expressions() -> dict[str, ColumnElement[Any]]:
    return {
        "account": Request.account_id,
        "model": Request.model,
        "day": _day(),
        "key": Request.api_key_id,
    }


def _metrics() -> list[ColumnElement[Any]]:
    return [
        func.count().label("requests"),
        func.coalesce(func.sum(Request.input_tokens), 0).label("input_tokens"),
        func.coalesce(func.sum(Request.output_tokens), 0).label("output_tokens"),
        # sum(bigint) is numeric in PostgreSQL; credits are whole numbers.
        cast(func.coalesce(func.sum(Request.credits_charged), 0), BigInteger).label(
            "credits_charged"
        ),
        func.coalesce(func.sum(Request.cost_usd), 0).label("cost_usd"),
    ]


def _settled_between(query: Select[Any], start: datetime, end: datetime) -> Select[Any]:
    return query.where(
        Request.created_at >= start,
        Request.created_at < end,
        Request.status.in_(TERMINAL_STATUSES),
    )


def usage_query(
    start: datetime,
    end: datetime,
    group_by: Sequence[str] = (),
    *,
    account_id: str | None = None,
    key_id: str | None = None,
    model: str | None = None,
) -> Select[Any]:
    """The usage SELECT (exposed for EXPLAIN in the benchmark)."""
    names = parse_group_by(group_by)
    expressions = _group_expressions()
    grouped = [expressions[n].label(GROUP_COLUMN_NAMES[n]) for n in names]
    query = _settled_between(select(*grouped, *_metrics()), start, end)
    if account_id is not None:
        query = query.where(Request.account_id == account_id)
    if key_id is not None:
        query = query.where(Request.api_key_id == key_id)
    if model is not None:
        query = query.where(Request.model == model)
    if grouped:
        # GROUP BY position: the day expression is written once. No ORDER BY: sorting the
        # groups here is cheaper than steering the planner away from a sort-based aggregate.
        query = query.group_by(*(literal_column(str(p)) for p in range(1, len(grouped) + 1)))
    return query


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

    Rows come ordered by their group columns (None first). Raises the transaction's
    `work_mem` (like SET LOCAL) so that the groups are hash-aggregated in memory.
    """
    query = usage_query(start, end, group_by, account_id=account_id, key_id=key_id, model=model)
    raise_work_mem(session)
    result = session.execute(query)
    names = list(result.keys())
    ungrouped = dict.fromkeys(GROUP_COLUMN_NAMES.values())
    rows = [UsageRow(**{**ungrouped, **dict(zip(names, row, strict=True))}) for row in result]
    columns = usage_group_columns(group_by)
    # Only key_id can be None (JWT requests); "" sorts it first.
    rows.sort(key=lambda r: tuple(getattr(r, c) or "" for c in columns))
    return rows


def raise_work_mem(session: Session) -> None:
    """Give the rest of this transaction REPORT_WORK_MEM (set_config(..., is_local))."""
    session.execute(select(func.set_config("work_mem", REPORT_WORK_MEM, True)))


def usage_totals(rows: Iterable[UsageRow]) -> UsageRow:
    """The sum of usage rows, with no group columns."""
    total = UsageRow(None, None, None, None, 0, 0, 0, 0, Decimal(0))
    for r in rows:
        total = UsageRow(
            None,
            None,
            None,
            None,
            total.requests + r.requests,
            total.input_tokens + r.input_tokens,
            total.output_tokens + r.output_tokens,
            total.credits_charged + r.credits_charged,
            total.cost_usd + r.cost_usd,
        )
    return total


def top_accounts(
    session: Session, start: datetime, end: datetime, limit: int = 10
) -> list[AccountSpend]:
    """The accounts that spent the most credits over [start, end), most first."""
    spend = (
        _settled_between(select(Request.account_id, *_metrics()), start, end)
        .group_by(Request.account_id)
        .order_by(func.sum(Request.credits_charged).desc(), Request.account_id)
        .limit(limit)
        .subquery()
    )
    rows = session.execute(
        select(spend, Account.name)
        .join(Account, Account.id == spend.c.account_id)
        .order_by(spend.c.credits_charged.desc(), spend.c.account_id)
    ).all()
    return [
        AccountSpend(
            account_id=r.account_id,
            name=r.name,
            requests=int(r.requests),
            input_tokens=int(r.input_tokens),
            output_tokens=int(r.output_tokens),
            credits_charged=int(r.credits_charged),
            cost_usd=Decimal(r.cost_usd),
        )
        for r in rows
    ]

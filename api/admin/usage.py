"""Admin billing queries: usage over a time range (JSON or CSV) and the top accounts by spend.

Ranges are half-open, [start, end), and default to the 30 days before now. A time without a
timezone (or a bare date) is UTC. Money is serialised as strings: it never passes through a
float.
"""

import csv
import io
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel

from api.admin.access import AdminDep, SettingsDep
from api.errors import InvalidRequestError
from api.request_body import BodyRoute
from db.session import transaction
from db.usage import (
    GROUP_BY_FIELDS,
    METRIC_NAMES,
    UnknownGroup,
    parse_group_by,
    top_accounts,
    usage,
    usage_columns,
    usage_totals,
)

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep], route_class=BodyRoute)

DEFAULT_RANGE = timedelta(days=30)
MAX_TOP_ACCOUNTS = 1000

Cell = str | int | None


class UsageReport(BaseModel):
    start: datetime
    end: datetime
    group_by: list[str]
    # Every row's keys, in order: the grouped columns, then the metrics (the CSV header).
    columns: list[str]
    data: list[dict[str, Cell]]
    # The metrics summed over every row.
    totals: dict[str, Cell]


class AccountSpendOut(BaseModel):
    account_id: str
    name: str
    requests: int
    input_tokens: int
    output_tokens: int
    credits_charged: int
    cost_usd: str
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


class TopAccounts(BaseModel):
    start: datetime
    end: datetime
    data: list[AccountSpendOut]


def time_range(start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
    """[start, end) in UTC; missing ends default to the 30 days before now."""
    end = _utc(end) if end is not None else datetime.now(UTC)
    start = _utc(start) if start is not None else end - DEFAULT_RANGE
    if start >= end:
        raise InvalidRequestError(f"start: {start.isoformat()} is not before end {end.isoformat()}")
    return start, end


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def cell(value: object) -> Cell:
    """A JSON/CSV value: money and days as strings, counts as integers."""
    if isinstance(value, Decimal):
        # NUMERIC(20, 9) sums read back as 0E-9 or 7.398245122000; answer 0 and 7.398245122.
        return format(value.normalize(), "f")
    if isinstance(value, date):
        return value.isoformat()
    if value is None or isinstance(value, str | int):
        return value
    raise TypeError(f"unexpected {type(value).__name__} in a usage row")


def usage_csv(columns: list[str], rows: list[dict[str, Cell]]) -> str:
    """The report as CSV with a header row; None is an empty field."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


@router.get("/usage", response_model=None)
def usage_report(
    settings: SettingsDep,
    start: Annotated[datetime | None, Query()] = None,
    end: Annotated[datetime | None, Query()] = None,
    group_by: Annotated[
        str | None, Query(description=f"comma-separated: {','.join(GROUP_BY_FIELDS)}")
    ] = None,
    output: Annotated[Literal["json", "csv"], Query(alias="format")] = "json",
    account_id: Annotated[str | None, Query()] = None,
    key_id: Annotated[str | None, Query()] = None,
    model: Annotated[str | None, Query()] = None,
) -> UsageReport | Response:
    """Settled requests over [start, end) grouped by any of account, model, day (UTC), key,
    batch (the Message Batch; null: interactive requests)."""
    start, end = time_range(start, end)
    try:
        groups = parse_group_by(group_by)
    except UnknownGroup as exc:
        raise InvalidRequestError(f"group_by: {exc}") from None
    with transaction(settings.require_database_url()) as session:
        rows = usage(session, start, end, groups, account_id=account_id, key_id=key_id, model=model)
    columns = usage_columns(groups)
    data = [{k: cell(v) for k, v in row.as_dict(groups).items()} for row in rows]
    if output == "csv":
        filename = f"usage_{start:%Y%m%dT%H%M%SZ}_{end:%Y%m%dT%H%M%SZ}.csv"
        return Response(
            usage_csv(columns, data),
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": f'attachment; filename="{filename}"'},
        )
    total = usage_totals(rows)
    return UsageReport(
        start=start,
        end=end,
        group_by=groups,
        columns=columns,
        data=data,
        totals={name: cell(getattr(total, name)) for name in METRIC_NAMES},
    )


@router.get("/top-accounts")
def top_accounts_report(
    settings: SettingsDep,
    start: Annotated[datetime | None, Query()] = None,
    end: Annotated[datetime | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_TOP_ACCOUNTS)] = 10,
) -> TopAccounts:
    """The accounts that spent the most credits over [start, end), most first."""
    start, end = time_range(start, end)
    with transaction(settings.require_database_url()) as session:
        spenders = top_accounts(session, start, end, limit)
    data = [
        AccountSpendOut(
            account_id=s.account_id,
            name=s.name,
            requests=s.requests,
            input_tokens=s.input_tokens,
            output_tokens=s.output_tokens,
            credits_charged=s.credits_charged,
            cost_usd=str(cell(s.cost_usd)),
            cache_read_input_tokens=s.cache_read_input_tokens,
            cache_creation_input_tokens=s.cache_creation_input_tokens,
        )
        for s in spenders
    ]
    return TopAccounts(start=start, end=end, data=data)

"""Usage report plumbing without a database: group-by parsing, day boundaries, the SQL's shape,
money and CSV formatting, and the CLI writing the same CSV as the API."""

import csv
import io
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from rich.console import Console
from sqlalchemy.dialects import postgresql

from api.admin.usage import cell, time_range, usage_csv
from api.errors import InvalidRequestError
from db.daily_usage import utc_day
from db.usage import (
    UnknownGroup,
    UsageRow,
    parse_group_by,
    usage_columns,
    usage_query,
    usage_totals,
    whole_days,
)
from infra.cli.admin_usage import usage_table, write_usage_csv

METRICS = [
    "requests",
    "input_tokens",
    "output_tokens",
    "credits_charged",
    "cost_usd",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, []),
        ("", []),
        ("day,account", ["account", "day"]),
        (" Key , MODEL ,key", ["model", "key"]),
        (["key", "day", "model", "account"], ["account", "model", "day", "key"]),
    ],
)
def test_group_by_is_parsed_into_canonical_order(value: object, expected: list[str]) -> None:
    assert parse_group_by(value) == expected  # type: ignore[arg-type]


def test_unknown_group_names_are_refused_by_name() -> None:
    with pytest.raises(UnknownGroup, match="colour, size: use any of account, model, day, key"):
        parse_group_by("account,size,colour")


def test_columns_are_groups_then_metrics() -> None:
    assert usage_columns(["key", "account"]) == ["account_id", "key_id", *METRICS]
    assert usage_columns([]) == METRICS


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.mark.parametrize(
    ("start", "end", "first", "stop"),
    [
        ("2026-03-01T00:00:00+00:00", "2026-03-04T00:00:00+00:00", "2026-03-01", "2026-03-04"),
        ("2026-03-01T00:00:01+00:00", "2026-03-04T09:30:00+00:00", "2026-03-02", "2026-03-04"),
        # 01:00 at +02:00 is 23:00 UTC the day before.
        ("2026-03-02T01:00:00+02:00", "2026-03-03T01:00:00+02:00", "2026-03-02", "2026-03-02"),
        ("2026-03-01T08:00:00+00:00", "2026-03-01T09:00:00+00:00", "2026-03-02", "2026-03-01"),
    ],
)
def test_whole_days_are_utc_days_inside_the_range(
    start: str, end: str, first: str, stop: str
) -> None:
    assert whole_days(at(start), at(end)) == (date.fromisoformat(first), date.fromisoformat(stop))


def test_utc_day_of_an_aware_moment() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert utc_day(datetime(2026, 3, 2, 1, 0, tzinfo=plus_two)) == date(2026, 3, 1)


def sql(start: str, end: str, group_by: list[str], **filters: str) -> str:
    query = usage_query(at(start), at(end), group_by, **filters)
    return str(query.compile(dialect=postgresql.dialect()))


def test_whole_days_come_from_the_rollup_and_the_ends_from_requests() -> None:
    text = sql("2026-03-01T10:00:00+00:00", "2026-03-31T10:00:00+00:00", ["account", "day"])
    assert "FROM daily_usage" in text and "FROM request" in text and "UNION ALL" in text
    assert "GROUP BY settled.account_id, settled.day" in text
    assert "ORDER BY settled.account_id ASC NULLS FIRST, settled.day ASC NULLS FIRST" in text


def test_a_range_of_whole_days_reads_only_the_rollup() -> None:
    text = sql("2026-03-01T00:00:00+00:00", "2026-03-31T00:00:00+00:00", [], model="m")
    assert "FROM daily_usage" in text and "FROM request" not in text
    assert "GROUP BY" not in text


def test_a_range_inside_one_day_reads_only_requests() -> None:
    text = sql("2026-03-01T01:00:00+00:00", "2026-03-01T02:00:00+00:00", ["key"], key_id="k")
    assert "FROM request" in text and "FROM daily_usage" not in text


def test_cells_keep_money_exact_and_plain() -> None:
    assert cell(Decimal("0E-9")) == "0"
    assert cell(Decimal("7.398245122000")) == "7.398245122"
    assert cell(Decimal("12000.000000000")) == "12000"
    assert cell(date(2026, 3, 1)) == "2026-03-01"
    assert (cell(None), cell(3), cell("acct_x")) == (None, 3, "acct_x")
    with pytest.raises(TypeError):
        cell(0.1)


def test_time_range_defaults_and_checks() -> None:
    start, end = time_range(None, None)
    assert end - start == timedelta(days=30) and end.tzinfo is not None
    naive = time_range(datetime(2026, 3, 1), datetime(2026, 3, 2))
    assert naive == (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC))
    with pytest.raises(InvalidRequestError, match="is not before end"):
        time_range(datetime(2026, 3, 2, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC))


def report() -> dict[str, object]:
    columns = ["day", "key_id", *METRICS]
    data = [
        {
            "day": "2026-03-01",
            "key_id": None,
            "requests": 2,
            "input_tokens": 10,
            "output_tokens": 4,
            "credits_charged": 2,
            "cost_usd": "0.00007",
            "cache_read_input_tokens": 6,
            "cache_creation_input_tokens": 0,
        },
        {
            "day": "2026-03-01",
            "key_id": "key_a",
            "requests": 1,
            "input_tokens": 5,
            "output_tokens": 1,
            "credits_charged": 1,
            "cost_usd": "0.00003",
            "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 4,
        },
    ]
    totals = {
        "requests": 3,
        "input_tokens": 15,
        "output_tokens": 5,
        "credits_charged": 3,
        "cost_usd": "0.0001",
        "cache_read_input_tokens": 6,
        "cache_creation_input_tokens": 4,
    }
    return {
        "start": "2026-03-01T00:00:00Z",
        "end": "2026-03-02T00:00:00Z",
        "columns": columns,
        "data": data,
        "totals": totals,
    }


def test_api_and_cli_write_the_same_csv() -> None:
    data = report()
    out = io.StringIO()
    write_usage_csv(data, out)
    assert out.getvalue() == usage_csv(data["columns"], data["data"])  # type: ignore[arg-type]
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert rows[0] == {
        "day": "2026-03-01",
        "key_id": "",
        "requests": "2",
        "input_tokens": "10",
        "output_tokens": "4",
        "credits_charged": "2",
        "cost_usd": "0.00007",
        "cache_read_input_tokens": "6",
        "cache_creation_input_tokens": "0",
    }


def test_cli_table_ends_with_the_totals() -> None:
    console = Console(width=200, record=True)
    console.print(usage_table(report()))
    lines = [line for line in console.export_text().splitlines() if "│" in line]
    assert "key_a" in lines[-2]
    assert lines[-1].split("│")[1].strip() == "total" and "0.0001" in lines[-1]


def test_totals_add_every_metric() -> None:
    rows = [
        UsageRow("a", None, None, None, None, 1, 10, 2, 1, Decimal("0.00006")),
        UsageRow("b", None, None, None, None, 2, 20, 4, 3, Decimal("0.00012")),
    ]
    assert usage_totals(rows) == UsageRow(
        None, None, None, None, None, 3, 30, 6, 4, Decimal("0.00018")
    )
    assert usage_totals([]).cost_usd == 0

"""`abl admin usage` and `abl admin top`: billing reports from the admin API as tables or CSV.

Registered by `infra.cli.admin.register_admin`; the handlers get an `AdminClient`. Times are
ISO 8601 (a bare date or a time without a zone is UTC); the range defaults to the last 30 days.
"""

import argparse
import csv
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO, TypeAlias

from rich.console import Console
from rich.table import Table

from infra.cli.admin_client import AdminClient

Json = Any
Handler = Callable[[AdminClient, argparse.Namespace, Console], int]
Leaf = Callable[..., argparse.ArgumentParser]
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

METRICS = ("requests", "input_tokens", "output_tokens", "credits_charged", "cost_usd")
# Right-aligned in tables.
NUMERIC = frozenset({*METRICS, "rank"})


def _range_params(args: argparse.Namespace) -> dict[str, str | int]:
    params: dict[str, str | int] = {}
    if args.start:
        params["start"] = args.start
    if args.end:
        params["end"] = args.end
    return params


def _table(columns: list[str], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="right" if column in NUMERIC else "left", overflow="fold")
    return table


def _cell(value: Json) -> str:
    return "-" if value is None else str(value)


def write_usage_csv(report: Mapping[str, Json], out: TextIO) -> None:
    """The same CSV as `GET /admin/usage?format=csv`: a header row, empty for null."""
    writer = csv.DictWriter(out, fieldnames=report["columns"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(report["data"])


def usage_table(report: Mapping[str, Json]) -> Table:
    columns: list[str] = report["columns"]
    title = f"usage {report['start'][:19]} .. {report['end'][:19]} (UTC)"
    table = _table(columns, title)
    for row in report["data"]:
        table.add_row(*(_cell(row[c]) for c in columns))
    groups = [c for c in columns if c not in report["totals"]]
    if groups:  # with no grouping, the one row is the total
        label = ["total", *([""] * (len(groups) - 1))]
        metrics = [_cell(report["totals"][c]) for c in columns[len(groups) :]]
        table.add_row(*label, *metrics, style="bold")
    return table


def _usage(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    params = _range_params(args)
    for name in ("group_by", "account_id", "key_id", "model"):
        value = getattr(args, name)
        if value:
            params[name] = value
    report = client.call("GET", "/admin/usage", params=params)
    if args.csv == "-":
        write_usage_csv(report, sys.stdout)
        return 0
    if args.csv:
        with open(args.csv, "w", newline="") as out:
            write_usage_csv(report, out)
    if args.json:
        sys.stdout.write(_dumps(report))
    else:
        console.print(usage_table(report))
        if args.csv:
            console.print(f"wrote {len(report['data'])} rows to {args.csv}")
    return 0


def _top(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    params = {**_range_params(args), "limit": args.limit}
    result = client.call("GET", "/admin/top-accounts", params=params)
    if args.json:
        sys.stdout.write(_dumps(result))
        return 0
    columns = ["rank", "account_id", "name", *METRICS]
    table = _table(columns, f"top accounts {result['start'][:19]} .. {result['end'][:19]} (UTC)")
    for rank, row in enumerate(result["data"], start=1):
        table.add_row(str(rank), *(_cell(row[c]) for c in columns[1:]))
    console.print(table)
    return 0


def _dumps(data: Json) -> str:
    return json.dumps(data, indent=2) + "\n"


def register_usage(admin: Subparsers, leaf: Leaf) -> None:
    """Add `usage` and `top` under `abl admin`; `leaf(group, name, handler, help_text=...)`."""
    p = leaf(admin, "usage", _usage, help_text="usage over a time range, grouped")
    _range_arguments(p)
    p.add_argument(
        "--group-by",
        dest="group_by",
        metavar="FIELDS",
        help="comma-separated: account,model,day,key,batch (default: one total)",
    )
    p.add_argument("--account", dest="account_id", metavar="ACCOUNT_ID", help="only this account")
    p.add_argument("--key", dest="key_id", metavar="KEY_ID", help="only this API key")
    p.add_argument("--model", help="only this model")
    p.add_argument("--csv", metavar="FILE", help="also write the rows as CSV ('-': stdout only)")
    p = leaf(admin, "top", _top, help_text="the accounts that spent the most credits")
    _range_arguments(p)
    p.add_argument("--limit", type=int, default=10, help="accounts to show (1..1000)")


def _range_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--start", help="ISO 8601 time or date (default: 30 days before --end)")
    parser.add_argument("--end", help="ISO 8601 time or date, excluded (default: now)")

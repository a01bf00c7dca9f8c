"""How the `abl admin` commands print: tables (rich) or the raw JSON (`--json`)."""

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

Json = Any


def cell(value: Json, column: str = "") -> str:
    if column.endswith("_at") and isinstance(value, str):
        # 2026-01-02T03:04:05.678Z -> 2026-01-02 03:04:05 (the API answers in UTC).
        return value[:19].replace("T", " ")
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def make_table(*columns: str, title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        # fold, never ellipsis: ids must stay copyable on a narrow terminal.
        table.add_column(column, overflow="fold")
    return table


def record_table(data: Mapping[str, Json], title: str | None = None) -> Table:
    table = Table(show_header=False, title=title, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in data.items():
        if not isinstance(value, list):
            table.add_row(key, cell(value, key))
    return table


def print_json(data: Json) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def emit(console: Console, args: argparse.Namespace, data: Json, table: Table) -> None:
    if args.json:
        print_json(data)
    else:
        console.print(table)


def emit_secret(
    console: Console, args: argparse.Namespace, data: Json, field: str, title: str
) -> None:
    """The record without the secret, then the secret alone on one unwrapped line to copy."""
    if args.json:
        print_json(data)
        return
    console.print(record_table({k: v for k, v in data.items() if k != field}, title=title))
    console.print(f"{field}: {data[field]}", soft_wrap=True, highlight=False, markup=False)

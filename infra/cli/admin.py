"""`abl admin ...`: the admin API from the command line, printed as tables (or `--json`).

The server is `--url`, else `ABL_URL`, else `http://$ABL_HOST:$ABL_PORT`. The token is
`ABL_ADMIN_TOKEN`, else the file `$ABL_DATA_DIR/admin_token` that `make up` writes.
Exit codes: 0 done, 1 the API refused or is unreachable (or reconcile found discrepancies),
2 no admin token to send.
"""

import argparse
import csv
import json
import sys
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, TextIO

import httpx
from rich.console import Console
from rich.table import Table

from infra.cli.admin_client import TOKEN_FILE, AdminApiError, AdminClient, AdminClientSettings
from infra.cli.admin_usage import register_usage

# Ledger fields, and their table headers (short: the table has nine columns).
LEDGER_COLUMNS = (
    "id",
    "created_at",
    "kind",
    "amount",
    "balance_after",
    "reserved_after",
    "request_id",
    "reason",
    "created_by",
)
LEDGER_HEADERS = ("id", "time", "kind", "amount", "balance", "reserved", "request", "reason", "by")
DISCREPANCY_COLUMNS = (
    "account_id",
    "balance",
    "ledger_balance",
    "reserved",
    "ledger_reserved",
    "open_reservations",
)
Json = Any
Handler = Callable[[AdminClient, argparse.Namespace, Console], int]


# ---- rendering ---------------------------------------------------------------------------


def _cell(value: Json, column: str = "") -> str:
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


def _table(*columns: str, title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        # fold, never ellipsis: ids must stay copyable on a narrow terminal.
        table.add_column(column, overflow="fold")
    return table


def _record(data: Mapping[str, Json], title: str | None = None) -> Table:
    table = Table(show_header=False, title=title, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in data.items():
        if not isinstance(value, list):
            table.add_row(key, _cell(value, key))
    return table


def _accounts_table(accounts: list[Json]) -> Table:
    table = _table("id", "name", "credits", "reserved", "available", "disabled", "created")
    for a in accounts:
        table.add_row(
            a["id"],
            a["name"],
            _cell(a["credits"]),
            _cell(a["reserved_credits"]),
            _cell(a["available_credits"]),
            _cell(a["disabled"]),
            _cell(a["created_at"], "created_at"),
        )
    return table


def _ledger_table(entries: list[Json], title: str | None = None) -> Table:
    table = _table(*LEDGER_HEADERS, title=title)
    for e in entries:
        table.add_row(*(_cell(e[c], c) for c in LEDGER_COLUMNS))
    return table


def _write_csv(entries: list[Json], out: TextIO) -> None:
    writer = csv.DictWriter(out, fieldnames=LEDGER_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(entries)


# ---- commands ----------------------------------------------------------------------------


def _print_json(data: Json) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _emit(console: Console, args: argparse.Namespace, data: Json, table: Table) -> None:
    if args.json:
        _print_json(data)
    else:
        console.print(table)


def _emit_secret(
    console: Console, args: argparse.Namespace, data: Json, field: str, title: str
) -> None:
    """The record without the secret, then the secret alone on one unwrapped line to copy."""
    if args.json:
        _print_json(data)
        return
    console.print(_record({k: v for k, v in data.items() if k != field}, title=title))
    console.print(f"{field}: {data[field]}", soft_wrap=True, highlight=False, markup=False)


def _accounts_create(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    body = {"name": args.name, "credits": args.credits}
    account = client.call("POST", "/admin/accounts", body=body)
    _emit(console, args, account, _record(account, title="account created"))
    return 0


def _accounts_list(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    params: dict[str, str | int] = {"limit": args.limit}
    if args.after:
        params["after_id"] = args.after
    page = client.call("GET", "/admin/accounts", params=params)
    _emit(console, args, page, _accounts_table(page["data"]))
    if not args.json and page["has_more"]:
        console.print(f"more: --after {page['next_after_id']}")
    return 0


def _accounts_show(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    account = client.call("GET", f"/admin/accounts/{args.account_id}")
    _emit(console, args, account, _record(account))
    return 0


def _accounts_set_disabled(
    disabled: bool, client: AdminClient, args: argparse.Namespace, console: Console
) -> int:
    path = f"/admin/accounts/{args.account_id}"
    account = client.call("PATCH", path, body={"disabled": disabled})
    _emit(console, args, account, _record(account))
    return 0


def _credits_add(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    body: dict[str, Json] = {"amount": args.amount}
    if args.reason:
        body["reason"] = args.reason
    result = client.call("POST", f"/admin/accounts/{args.account_id}/credits", body=body)
    if args.json:
        _print_json(result)
        return 0
    account = {k: v for k, v in result.items() if k != "ledger_entry"}
    console.print(_record(account, title="account"))
    console.print(_ledger_table([result["ledger_entry"]], title="ledger entry"))
    return 0


def _keys_create(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    limits = {
        "requests_per_minute": args.rpm,
        "input_tokens_per_minute": args.input_tpm,
        "output_tokens_per_minute": args.output_tpm,
        "concurrent_requests": args.concurrency,
    }
    body: dict[str, Json] = {"name": args.name, "expires_at": args.expires_at}
    if any(v is not None for v in limits.values()):
        body["rate_limits"] = {k: v for k, v in limits.items() if v is not None}
    key = client.call("POST", f"/admin/accounts/{args.account_id}/keys", body=body)
    _emit_secret(console, args, key, "key", "key created")
    if not args.json:
        console.print("[bold yellow]Save the key now: it is not shown again.[/]")
    return 0


def _keys_list(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    keys = client.call("GET", f"/admin/accounts/{args.account_id}/keys")
    columns = ("id", "prefix", "name", "rate_limits", "created_at", "expires_at", "revoked_at")
    table = _table("id", "prefix", "name", "rate limits", "created", "expires", "revoked")
    for k in keys["data"]:
        table.add_row(*(_cell(k[c], c) for c in columns))
    _emit(console, args, keys, table)
    return 0


def _keys_revoke(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    result = client.call("DELETE", f"/admin/keys/{args.key_id}")
    _emit(console, args, result, _record(result, title="key revoked"))
    return 0


def _tokens_mint(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    body = {"ttl_seconds": args.ttl}
    result = client.call("POST", f"/admin/accounts/{args.account_id}/tokens", body=body)
    _emit_secret(console, args, result, "token", "account token")
    return 0


def _ledger(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    entries = list(client.ledger(args.account_id, None if args.all else args.limit))
    if args.csv == "-":
        _write_csv(entries, sys.stdout)
        return 0
    if args.csv:
        with open(args.csv, "w", newline="") as out:
            _write_csv(entries, out)
    _emit(console, args, entries, _ledger_table(entries))
    if args.csv and not args.json:
        console.print(f"wrote {len(entries)} entries to {args.csv}")
    return 0


def _request(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    record = client.call("GET", f"/admin/requests/{args.request_id}")
    if args.json:
        _print_json(record)
        return 0
    console.print(_record(record, title="request"))
    console.print(_ledger_table(record["ledger_entries"], title="ledger entries"))
    return 0


def _reconcile(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    result = client.call("GET", "/admin/reconcile")
    table = _table(*DISCREPANCY_COLUMNS, title="discrepancies")
    for d in result["discrepancies"]:
        table.add_row(*(_cell(d[c]) for c in DISCREPANCY_COLUMNS))
    if args.json:
        _emit(console, args, result, table)
    elif result["ok"]:
        console.print(f"ok: {result['accounts_checked']} accounts agree with the ledger")
    else:
        console.print(table)
    return 0 if result["ok"] else 1


# ---- wiring ------------------------------------------------------------------------------


def _execute(handler: Handler, args: argparse.Namespace) -> int:
    settings = AdminClientSettings()
    if args.url:
        settings.url = args.url
    err = Console(stderr=True)
    token = settings.token()
    if token is None:
        err.print(f"no admin token: set ABL_ADMIN_TOKEN or write {settings.data_dir / TOKEN_FILE}")
        return 2
    client = AdminClient(settings.base_url(), token)
    try:
        return handler(client, args, Console())
    except AdminApiError as exc:
        err.print(f"error: {exc}", markup=False, soft_wrap=True)
        return 1
    except httpx.HTTPError as exc:
        err.print(f"cannot reach {settings.base_url()}: {exc}", markup=False, soft_wrap=True)
        return 1
    except OSError as exc:  # --csv FILE not writable
        err.print(f"error: {exc}", markup=False, soft_wrap=True)
        return 1
    finally:
        client.close()


def _leaf(
    group: "argparse._SubParsersAction[argparse.ArgumentParser]",
    name: str,
    handler: Handler,
    common: argparse.ArgumentParser,
    help_text: str,
) -> argparse.ArgumentParser:
    parser = group.add_parser(name, parents=[common], help=help_text, description=help_text)
    parser.set_defaults(func=partial(_execute, handler))
    return parser


def _group(
    parent: "argparse._SubParsersAction[argparse.ArgumentParser]", name: str, help_text: str
) -> "argparse._SubParsersAction[argparse.ArgumentParser]":
    parser = parent.add_parser(name, help=help_text, description=help_text)
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")


def register_admin(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add `admin` and its subcommands; each sets `func(args) -> exit code`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="admin API base URL (default: ABL_URL or ABL_HOST:ABL_PORT)")
    common.add_argument("--json", action="store_true", help="print the raw JSON response")
    admin = _group(subparsers, "admin", "accounts, credits, keys, the ledger and usage")

    accounts = _group(admin, "accounts", "create, list, show, disable or enable accounts")
    p = _leaf(accounts, "create", _accounts_create, common, "create an account")
    p.add_argument("name")
    p.add_argument("--credits", type=int, default=0, help="initial credits (a grant)")
    p = _leaf(accounts, "list", _accounts_list, common, "list accounts, oldest first")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--after", metavar="ACCOUNT_ID", help="start after this account")
    for name, handler, help_text in (
        ("show", _accounts_show, "show an account and its balance"),
        ("disable", partial(_accounts_set_disabled, True), "refuse the account's requests"),
        ("enable", partial(_accounts_set_disabled, False), "accept the account's requests"),
    ):
        _leaf(accounts, name, handler, common, help_text).add_argument("account_id")

    credits = _group(admin, "credits", "grant or take back credits")
    p = _leaf(credits, "add", _credits_add, common, "add credits (negative: an adjustment)")
    p.add_argument("account_id")
    p.add_argument("amount", type=int)
    p.add_argument("--reason")

    keys = _group(admin, "keys", "create, list or revoke API keys")
    p = _leaf(keys, "create", _keys_create, common, "create an API key (printed once)")
    p.add_argument("account_id")
    p.add_argument("--name")
    p.add_argument("--rpm", type=int, help="requests per minute")
    p.add_argument("--input-tpm", type=int, help="input tokens per minute")
    p.add_argument("--output-tpm", type=int, help="output tokens per minute")
    p.add_argument("--concurrency", type=int, help="concurrent requests")
    p.add_argument("--expires-at", help="ISO 8601 time with a timezone")
    _leaf(keys, "list", _keys_list, common, "list an account's keys").add_argument("account_id")
    _leaf(keys, "revoke", _keys_revoke, common, "revoke a key").add_argument("key_id")

    tokens = _group(admin, "tokens", "mint account JWTs")
    p = _leaf(tokens, "mint", _tokens_mint, common, "mint a JWT for an account")
    p.add_argument("account_id")
    p.add_argument("--ttl", type=int, default=3600, help="seconds, 1..86400")

    p = _leaf(admin, "ledger", _ledger, common, "an account's ledger, newest first")
    p.add_argument("account_id")
    p.add_argument("--limit", type=int, default=50, help="entries to show")
    p.add_argument("--all", action="store_true", help="every entry (pages through)")
    p.add_argument("--csv", metavar="FILE", help="also write the entries as CSV ('-': stdout)")
    p = _leaf(admin, "request", _request, common, "a request record and its ledger entries")
    p.add_argument("request_id")
    _leaf(admin, "reconcile", _reconcile, common, "check balances against the ledger")
    register_usage(admin, partial(_leaf, common=common))

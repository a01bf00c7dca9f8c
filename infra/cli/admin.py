"""`abl admin ...`: the admin API from the command line, printed as tables (or `--json`).

The server is `--url`, else `ABL_URL`, else `http://$ABL_HOST:$ABL_PORT`. The token is
`ABL_ADMIN_TOKEN`, else the file `$ABL_DATA_DIR/admin_token` that `make up` writes.
Exit codes: 0 done, 1 the API refused or is unreachable (or reconcile found discrepancies),
2 no admin token to send.
"""

import argparse
import csv
import sys
from collections.abc import Callable
from functools import partial
from typing import TextIO

import httpx
from rich.console import Console
from rich.table import Table

from infra.cli.admin_access import add_limit_options, limits_of, register_access
from infra.cli.admin_client import TOKEN_FILE, AdminApiError, AdminClient, AdminClientSettings
from infra.cli.admin_render import Json, cell, emit, make_table, print_json, record_table
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
RECONCILE_TIMEOUT_S = 600.0
# Each check of `GET /admin/reconcile`: its field, its table's title and columns.
RECONCILE_CHECKS = (
    (
        "discrepancies",
        "balances that disagree with the ledger",
        (
            "account_id",
            "balance",
            "ledger_balance",
            "reserved",
            "ledger_reserved",
            "open_reservations",
        ),
    ),
    (
        "chain_breaks",
        "ledger rows that do not follow from the row before",
        (
            "account_id",
            "entry_id",
            "kind",
            "amount",
            "balance_after",
            "expected_balance_after",
            "reserved_after",
            "expected_reserved_after",
        ),
    ),
    (
        "request_mismatches",
        "requests whose ledger rows disagree",
        (
            "request_id",
            "account_id",
            "status",
            "credits_reserved",
            "credits_charged",
            "reserve_amount",
            "release_amount",
            "charge_amount",
        ),
    ),
    (
        "usage_mismatches",
        "daily usage that differs from the requests",
        (
            "source",
            "day",
            "account_id",
            "api_key_id",
            "model",
            "requests",
            "credits_charged",
            "cost_usd",
        ),
    ),
)
Handler = Callable[[AdminClient, argparse.Namespace, Console], int]


# ---- rendering ---------------------------------------------------------------------------


def _accounts_table(accounts: list[Json]) -> Table:
    table = make_table("id", "name", "credits", "reserved", "available", "disabled", "created")
    for a in accounts:
        table.add_row(
            a["id"],
            a["name"],
            cell(a["credits"]),
            cell(a["reserved_credits"]),
            cell(a["available_credits"]),
            cell(a["disabled"]),
            cell(a["created_at"], "created_at"),
        )
    return table


def _ledger_table(entries: list[Json], title: str | None = None) -> Table:
    table = make_table(*LEDGER_HEADERS, title=title)
    for e in entries:
        table.add_row(*(cell(e[c], c) for c in LEDGER_COLUMNS))
    return table


def _write_csv(entries: list[Json], out: TextIO) -> None:
    writer = csv.DictWriter(out, fieldnames=LEDGER_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(entries)


# ---- commands ----------------------------------------------------------------------------


def _accounts_create(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    body = {"name": args.name, "credits": args.credits}
    account = client.call("POST", "/admin/accounts", body=body)
    emit(console, args, account, record_table(account, title="account created"))
    return 0


def _accounts_list(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    params: dict[str, str | int] = {"limit": args.limit}
    if args.after:
        params["after_id"] = args.after
    page = client.call("GET", "/admin/accounts", params=params)
    emit(console, args, page, _accounts_table(page["data"]))
    if not args.json and page["has_more"]:
        console.print(f"more: --after {page['next_after_id']}")
    return 0


def _accounts_show(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    account = client.call("GET", f"/admin/accounts/{args.account_id}")
    emit(console, args, account, record_table(account))
    return 0


def _accounts_set_disabled(
    disabled: bool, client: AdminClient, args: argparse.Namespace, console: Console
) -> int:
    path = f"/admin/accounts/{args.account_id}"
    account = client.call("PATCH", path, body={"disabled": disabled})
    emit(console, args, account, record_table(account))
    return 0


def _credits_add(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    body: dict[str, Json] = {"amount": args.amount}
    if args.reason:
        body["reason"] = args.reason
    result = client.call("POST", f"/admin/accounts/{args.account_id}/credits", body=body)
    if args.json:
        print_json(result)
        return 0
    account = {k: v for k, v in result.items() if k != "ledger_entry"}
    console.print(record_table(account, title="account"))
    console.print(_ledger_table([result["ledger_entry"]], title="ledger entry"))
    return 0


def _accounts_update(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    body: dict[str, Json] = {}
    if args.name is not None:
        body["name"] = args.name
    limits, shared = limits_of(args), limits_of(args, "shared_")
    if limits is not None or args.clear_limits:
        body["rate_limits"] = limits
    if shared is not None or args.clear_shared_limits:
        body["shared_rate_limits"] = shared
    account = client.call("PATCH", f"/admin/accounts/{args.account_id}", body=body)
    emit(console, args, account, record_table(account, title="account updated"))
    return 0


def _ledger(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    entries = list(client.ledger(args.account_id, None if args.all else args.limit))
    if args.csv == "-":
        _write_csv(entries, sys.stdout)
        return 0
    if args.csv:
        with open(args.csv, "w", newline="") as out:
            _write_csv(entries, out)
    emit(console, args, entries, _ledger_table(entries))
    if args.csv and not args.json:
        console.print(f"wrote {len(entries)} entries to {args.csv}")
    return 0


def _request(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    record = client.call("GET", f"/admin/requests/{args.request_id}")
    if args.json:
        print_json(record)
        return 0
    console.print(record_table(record, title="request"))
    console.print(_ledger_table(record["ledger_entries"], title="ledger entries"))
    return 0


def _reconcile(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    # Every ledger row and request is read: minutes on a large database (docs/billing.md).
    result = client.call("GET", "/admin/reconcile", timeout=RECONCILE_TIMEOUT_S)
    if args.json:
        print_json(result)
    elif result["ok"]:
        console.print(
            f"ok: {result['accounts_checked']} accounts agree with the ledger; every ledger row,"
            " request and day of usage is consistent"
        )
    else:
        for field, title, columns in RECONCILE_CHECKS:
            if result.get(field):
                table = make_table(*columns, title=title)
                for finding in result[field]:
                    table.add_row(*(cell(finding[c]) for c in columns))
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
    p = _leaf(accounts, "update", _accounts_update, common, "rename an account or set its limits")
    p.add_argument("account_id")
    p.add_argument("--name")
    add_limit_options(p, what="each credential's default ")
    p.add_argument("--clear-limits", action="store_true", help="no credential defaults")
    add_limit_options(p, "shared_", "the budget all its credentials share: ")
    p.add_argument("--clear-shared-limits", action="store_true", help="no shared budget")
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

    register_access(admin, partial(_leaf, common=common), _group)

    p = _leaf(admin, "ledger", _ledger, common, "an account's ledger, newest first")
    p.add_argument("account_id")
    p.add_argument("--limit", type=int, default=50, help="entries to show")
    p.add_argument("--all", action="store_true", help="every entry (pages through)")
    p.add_argument("--csv", metavar="FILE", help="also write the entries as CSV ('-': stdout)")
    p = _leaf(admin, "request", _request, common, "a request record and its ledger entries")
    p.add_argument("request_id")
    _leaf(admin, "reconcile", _reconcile, common, "check balances against the ledger")
    register_usage(admin, partial(_leaf, common=common))

"""`abl admin keys|tokens|audit`: API keys, account JWTs and the audit log from the command line.

Registered by `infra.cli.admin.register_admin`; the handlers get an `AdminClient`.
"""

import argparse
from collections.abc import Callable
from typing import TypeAlias

from rich.console import Console

from infra.cli.admin_client import AdminClient
from infra.cli.admin_render import Json, cell, emit, emit_secret, make_table, record_table

Leaf = Callable[..., argparse.ArgumentParser]
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Group = Callable[..., Subparsers]


def limits_of(args: argparse.Namespace, prefix: str = "") -> dict[str, int] | None:
    """The rate limits given as --rpm/--input-tpm/... (with `prefix`: --shared-rpm/...)."""
    limits = {
        "requests_per_minute": getattr(args, f"{prefix}rpm"),
        "input_tokens_per_minute": getattr(args, f"{prefix}input_tpm"),
        "output_tokens_per_minute": getattr(args, f"{prefix}output_tpm"),
        "concurrent_requests": getattr(args, f"{prefix}concurrency"),
    }
    given = {k: v for k, v in limits.items() if v is not None}
    return given or None


def add_limit_options(parser: argparse.ArgumentParser, prefix: str = "", what: str = "") -> None:
    flag = f"--{prefix.replace('_', '-')}"
    parser.add_argument(f"{flag}rpm", type=int, help=f"{what}requests per minute")
    parser.add_argument(f"{flag}input-tpm", type=int, help=f"{what}input tokens per minute")
    parser.add_argument(f"{flag}output-tpm", type=int, help=f"{what}output tokens per minute")
    parser.add_argument(f"{flag}concurrency", type=int, help=f"{what}concurrent requests")


def _keys_create(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    body: dict[str, Json] = {"name": args.name, "expires_at": args.expires_at}
    limits = limits_of(args)
    if limits:
        body["rate_limits"] = limits
    key = client.call("POST", f"/admin/accounts/{args.account_id}/keys", body=body)
    emit_secret(console, args, key, "key", "key created")
    if not args.json:
        console.print("[bold yellow]Save the key now: it is not shown again.[/]")
    return 0


def _keys_list(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    keys = client.call("GET", f"/admin/accounts/{args.account_id}/keys")
    columns = ("id", "prefix", "name", "rate_limits", "created_at", "expires_at", "revoked_at")
    table = make_table("id", "prefix", "name", "rate limits", "created", "expires", "revoked")
    for k in keys["data"]:
        table.add_row(*(cell(k[c], c) for c in columns))
    emit(console, args, keys, table)
    return 0


def _keys_update(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    body: dict[str, Json] = {}
    if args.name is not None:
        body["name"] = args.name
    limits = limits_of(args)
    if limits is not None or args.clear_limits:
        body["rate_limits"] = limits
    if args.expires_at is not None or args.no_expiry:
        body["expires_at"] = args.expires_at
    key = client.call("PATCH", f"/admin/keys/{args.key_id}", body=body)
    emit(console, args, key, record_table(key, title="key updated"))
    return 0


def _tokens_revoke(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    body: dict[str, Json] = {"reason": args.reason}
    if args.token:
        body["token"] = args.token
    else:
        body["jti"] = args.jti
        body["expires_at"] = args.expires_at
    result = client.call("POST", "/admin/tokens/revoke", body=body)
    emit(console, args, result, record_table(result, title="token revoked"))
    return 0


AUDIT_COLUMNS = ("id", "created_at", "admin", "action", "target", "details", "client_address")


def _audit(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    filters = {"admin": args.admin, "action": args.action, "target": args.target}
    filters |= {"since": args.since, "until": args.until}
    entries = list(client.audit({k: v for k, v in filters.items() if v}, args.limit))
    table = make_table("id", "time", "admin", "action", "target", "details", "from")
    for entry in entries:
        table.add_row(*(cell(entry[c], c) for c in AUDIT_COLUMNS))
    emit(console, args, entries, table)
    return 0


def _keys_revoke(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    result = client.call("DELETE", f"/admin/keys/{args.key_id}")
    emit(console, args, result, record_table(result, title="key revoked"))
    return 0


def _tokens_mint(client: AdminClient, args: argparse.Namespace, console: Console) -> int:
    body = {"ttl_seconds": args.ttl}
    result = client.call("POST", f"/admin/accounts/{args.account_id}/tokens", body=body)
    emit_secret(console, args, result, "token", "account token")
    return 0


def register_access(admin: Subparsers, leaf: Leaf, group: Group) -> None:
    """Add `keys`, `tokens` and `audit` under `abl admin`."""
    keys = group(admin, "keys", "create, list, update or revoke API keys")
    p = leaf(keys, "create", _keys_create, help_text="create an API key (printed once)")
    p.add_argument("account_id")
    p.add_argument("--name")
    add_limit_options(p, what="its own ")
    p.add_argument("--expires-at", help="ISO 8601 time with a timezone")
    leaf(keys, "list", _keys_list, help_text="list an account's keys").add_argument("account_id")
    p = leaf(keys, "update", _keys_update, help_text="rename a key, set its limits or expiry")
    p.add_argument("key_id")
    p.add_argument("--name")
    add_limit_options(p, what="its own (replacing all its own) ")
    p.add_argument("--clear-limits", action="store_true", help="its account's limits only")
    expiry = p.add_mutually_exclusive_group()
    expiry.add_argument("--expires-at", help="ISO 8601 time with a timezone")
    expiry.add_argument("--no-expiry", action="store_true", help="never expires")
    leaf(keys, "revoke", _keys_revoke, help_text="revoke a key").add_argument("key_id")

    tokens = group(admin, "tokens", "mint or revoke account JWTs")
    p = leaf(tokens, "mint", _tokens_mint, help_text="mint a JWT for an account")
    p.add_argument("account_id")
    p.add_argument("--ttl", type=int, default=3600, help="seconds, 1..86400")
    p = leaf(tokens, "revoke", _tokens_revoke, help_text="refuse a JWT until it expires")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--jti", help="the token's jti (as mint printed it)")
    which.add_argument("--token", help="the token itself")
    p.add_argument("--expires-at", help="with --jti: when the token expires (ISO 8601)")
    p.add_argument("--reason")

    p = leaf(admin, "audit", _audit, help_text="what admins changed, newest first")
    p.add_argument("--admin", help="the admin token's name")
    p.add_argument("--action", help="e.g. credits.add, key.update, token.revoke")
    p.add_argument("--target", help="an account, key or token id")
    p.add_argument("--since", help="ISO 8601 time")
    p.add_argument("--until", help="ISO 8601 time")
    p.add_argument("--limit", type=int, default=50, help="entries to show (0: all)")

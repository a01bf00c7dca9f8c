"""`python -m infra.bench.revocation`: what checking a JWT against the revocation list costs.

A JWT's authentication reads its account from Postgres on every request; the revocation check
rides in that same statement (`db.accounts.find_token_account`). This times, on one embedded
PostgreSQL (or `--database-url`'s server, in a scratch database), with `--revoked` rows on the
list, the three ways to authenticate the same token, interleaved round by round:
- `before`: what the API did before the list existed (ORM `session.get` in a transaction);
- `account only`: the one-statement autocommit read without the revocation check;
- `with revocation`: the same statement with the check (what the API runs now).
Prints a table and writes JSON (`--output`). Figures in docs/access.md.
"""

import argparse
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from db.accounts import find_token_account
from db.migrate import upgrade
from db.models import Account
from db.session import in_autocommit, transaction
from infra.launcher.services import EmbeddedPostgres

DEFAULT_OUTPUT = Path("bench-results/revocation.json")
ACCOUNT = "acct_bench_revocation"
console = Console()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="a server to use (default: embedded PostgreSQL)")
    parser.add_argument("--revoked", type=int, default=100_000, help="rows on the list")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=200, help="calls per way per round")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    return parser.parse_args(argv)


@contextmanager
def server(database_url: str | None) -> Iterator[str]:
    """An owner's URL to a scratch database: on the given server, else an embedded one."""
    if database_url is None:
        with tempfile.TemporaryDirectory(prefix="abl-bench-revocation-") as tmp:
            postgres = EmbeddedPostgres(Path(tmp))
            try:
                postgres.start()
                assert postgres.migration_url is not None
                yield postgres.migration_url
            finally:
                postgres.stop()
        return
    url = make_url(database_url)
    name = f"abl_bench_revocation_{uuid.uuid4().hex[:8]}"
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def seed(url: str, revoked: int) -> None:
    expires = datetime.now(UTC) + timedelta(days=1)
    with transaction(url) as session:
        session.add(Account(id=ACCOUNT, name="bench", credit_balance=0, reserved_credits=0))
        session.execute(
            text(
                "INSERT INTO revoked_token (jti, expires_at, revoked_by)"
                " SELECT 'jti-' || g, :expires, 'bench' FROM generate_series(1, :n) AS g"
            ),
            {"expires": expires, "n": revoked},
        )
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE revoked_token")


def ways(url: str) -> dict[str, Callable[[], object]]:
    account_only = select(Account.id, Account.disabled, Account.rate_limits).where(
        Account.id == ACCOUNT
    )

    def before() -> object:
        with transaction(url) as session:
            return session.get(Account, ACCOUNT)

    return {
        "before (ORM get in a transaction)": before,
        "account only (one statement, autocommit)": lambda: in_autocommit(
            url, lambda conn: conn.execute(account_only).first()
        ),
        "with revocation (what the API runs)": lambda: in_autocommit(
            url, lambda conn: find_token_account(conn, ACCOUNT, "jti-not-revoked")
        ),
    }


def measure(url: str, rounds: int, calls: int) -> dict[str, dict[str, float]]:
    timings: dict[str, list[float]] = {}
    candidates = ways(url)
    for fn in candidates.values():  # warm the pools and the plans
        for _ in range(50):
            fn()
    for _ in range(rounds):
        for name, fn in candidates.items():
            started = time.perf_counter()
            for _ in range(calls):
                fn()
            per_call_us = (time.perf_counter() - started) / calls * 1e6
            timings.setdefault(name, []).append(per_call_us)
    return {
        name: {
            "median_us": round(statistics.median(values), 1),
            "min_us": round(min(values), 1),
            "max_us": round(max(values), 1),
        }
        for name, values in timings.items()
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with server(args.database_url) as url:
        upgrade(url)
        seed(url, args.revoked)
        found = in_autocommit(url, lambda conn: find_token_account(conn, ACCOUNT, "jti-7"))
        assert found is not None and found.revoked, "the list must find a revoked jti"
        results = measure(url, args.rounds, args.calls)
    table = Table(title=f"JWT account lookup, {args.revoked:,} revoked tokens on the list")
    for column in ("way", "median µs", "min µs", "max µs"):
        table.add_column(column, justify="left" if column == "way" else "right")
    for name, t in results.items():
        table.add_row(name, str(t["median_us"]), str(t["min_us"]), str(t["max_us"]))
    console.print(table)
    output: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(),
        "parameters": {k: v for k, v in vars(args).items() if k not in ("output", "database_url")},
        "per_call": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(output, indent=2) + "\n")
    console.print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

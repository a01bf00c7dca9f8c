"""`python -m infra.bench.billing`: seed a scratch database at scale and time the billing queries.

Creates a database beside the one `--database-url` names (default: the machine's PostgreSQL at
127.0.0.1:5432, user postgres), migrates it to head, and seeds it in SQL with `generate_series`:
accounts with two keys each, requests spread evenly over `--days` of history with a skewed
account mix, their reserve/release/charge ledger rows, top-up grants up to `--ledger` rows, and
balances that reconcile. Then it times `db.usage` (the code the admin API runs) and prints a
table and writes JSON (`--output`). The scratch database is dropped unless `--keep`.
"""

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table
from sqlalchemy import Date, Engine, cast, create_engine, func, literal_column, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from db import daily_usage
from db.migrate import upgrade
from db.models import TERMINAL_STATUSES, LedgerEntry, Request
from db.reconcile import balances, reconcile
from db.usage import raise_work_mem, top_accounts, usage, usage_query

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_OUTPUT = Path("bench-results/usage.json")
GOAL = "usage 30d by account,day"
RAW_GOAL = f"{GOAL}, summing request rows (no rollup)"

console = Console()

# Three models with different prices (USD per million input / output tokens).
SEED_REQUESTS = """
INSERT INTO request (id, message_id, account_id, api_key_id, model, status, stream, max_tokens,
    input_tokens, output_tokens, stop_reason, credits_reserved, credits_charged, cost_usd,
    worker, created_at, started_at, finished_at)
SELECT 'req_bench' || lpad(g::text, 10, '0'), 'msg_bench' || lpad(g::text, 10, '0'),
    'acct_bench' || lpad(a::text, 6, '0'), 'key_bench' || lpad(a::text, 6, '0') || '_' || k,
    model, status, g % 3 = 0, max_tokens, input_tokens, output_tokens,
    CASE status WHEN 'succeeded' THEN 'end_turn' END,
    ceil((input_tokens * pin + max_tokens * pout) / 1e6 / :credit_usd)::bigint,
    CASE WHEN status = 'failed' THEN 0
         ELSE ceil((input_tokens * pin + output_tokens * pout) / 1e6 / :credit_usd)::bigint END,
    CASE WHEN status = 'failed' THEN 0
         ELSE (input_tokens * pin + output_tokens * pout) / 1e6 END,
    'bench-worker', created_at, created_at + interval '50 ms',
    created_at + make_interval(secs => 0.1 + output_tokens / 200.0)
FROM (
    SELECT g, a, k, created_at, status, max_tokens, input_tokens,
        (ARRAY['abliterated-model', 'abliterated-large', 'abliterated-mini'])[m] AS model,
        (ARRAY[5, 15, 0.25])[m]::numeric AS pin, (ARRAY[5, 75, 1.25])[m]::numeric AS pout,
        CASE status WHEN 'failed' THEN 0
                    WHEN 'cancelled' THEN floor(r4 * max_tokens)::int
                    ELSE 1 + floor(r4 * (max_tokens - 1))::int END AS output_tokens
    FROM (
        SELECT g, r4, 1 + floor(:accounts * power(r1, 3))::int AS a,
            1 + floor(r2 * 2)::int AS k, 1 + floor(r3 * 3)::int AS m,
            CASE WHEN r5 < 0.01 THEN 'failed' WHEN r5 < 0.03 THEN 'cancelled'
                 ELSE 'succeeded' END AS status,
            (ARRAY[256, 512, 1024])[1 + floor(r6 * 3)::int] AS max_tokens,
            16 + floor(r6 * r1 * 4000)::int AS input_tokens,
            :now - make_interval(secs => :days * 86400.0 * (1 - g::float8 / :requests))
                AS created_at
        FROM (
            SELECT g, random() AS r1, random() AS r2, random() AS r3, random() AS r4,
                random() AS r5, random() AS r6
            FROM generate_series(1, :requests) AS g
        ) AS draws
    ) AS shaped
) AS priced
ORDER BY g
"""

# Every movement in time order, so ids follow time as they do in production; the running sums
# give each row its balance_after / reserved_after. Top-ups pad the ledger to the target size.
SEED_LEDGER = """
INSERT INTO ledger_entry (account_id, request_id, kind, amount, balance_after, reserved_after,
    reason, created_by, created_at)
SELECT account_id, request_id, kind, amount,
    coalesce(sum(amount) FILTER (WHERE kind IN ('grant', 'charge')) OVER running, 0),
    coalesce(sum(amount) FILTER (WHERE kind IN ('reserve', 'release')) OVER running, 0),
    reason, created_by, at
FROM (
    SELECT a.id AS account_id, NULL AS request_id, 'grant' AS kind,
        coalesce(spent.total, 0) + 100000 AS amount, :start - interval '1 day' AS at, 0 AS ord,
        'initial credits' AS reason, 'bench' AS created_by
    FROM account AS a LEFT JOIN (
        SELECT account_id, sum(credits_charged) AS total FROM request GROUP BY account_id
    ) AS spent ON spent.account_id = a.id
    UNION ALL
    SELECT account_id, id, 'reserve', credits_reserved, created_at, 1, NULL, NULL FROM request
    UNION ALL
    SELECT account_id, id, 'release', -credits_reserved, finished_at, 2, NULL, NULL FROM request
    UNION ALL
    SELECT account_id, id, 'charge', -credits_charged, finished_at, 3, NULL, NULL
    FROM request WHERE credits_charged > 0
    UNION ALL
    SELECT 'acct_bench' || lpad((1 + floor(random() * :accounts))::int::text, 6, '0'), NULL,
        'grant', 1000, :start + make_interval(secs => random() * :days * 86400.0), 0,
        'top-up', 'bench'
    FROM generate_series(1, :topups)
) AS movement
WINDOW running AS (PARTITION BY account_id ORDER BY at, request_id, ord
                   ROWS UNBOUNDED PRECEDING)
ORDER BY at, request_id, ord
"""

SEED_ACCOUNTS = """
INSERT INTO account (id, name, credit_balance, reserved_credits, disabled, created_at)
SELECT 'acct_bench' || lpad(i::text, 6, '0'), 'bench account ' || i, 0, 0, false,
    :start - interval '1 day'
FROM generate_series(1, :accounts) AS i
"""

SEED_KEYS = """
INSERT INTO api_key (id, account_id, name, key_hash, prefix, created_at)
SELECT 'key_bench' || lpad(i::text, 6, '0') || '_' || k, 'acct_bench' || lpad(i::text, 6, '0'),
    'bench key ' || k, md5(i || '/' || k) || md5(k || '/' || i), 'ak_bench',
    :start - interval '1 day'
FROM generate_series(1, :accounts) AS i, generate_series(1, 2) AS k
"""

SETTLE_BALANCES = """
UPDATE account SET credit_balance = totals.balance
FROM (
    SELECT account_id, sum(amount) AS balance FROM ledger_entry
    WHERE kind IN ('grant', 'charge', 'refund', 'adjustment') GROUP BY account_id
) AS totals
WHERE totals.account_id = account.id
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m infra.bench.billing", description=__doc__)
    parser.add_argument("--database-url", default=DEFAULT_URL, help="server to create it on")
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--ledger", type=int, default=3_000_000, help="ledger rows to reach")
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--days", type=int, default=60, help="history the requests span")
    parser.add_argument("--window-days", type=int, default=30, help="range of the reports")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per query, after one")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument(
        "--no-compare", action="store_true", help="skip timing the goal from requests alone"
    )
    return parser.parse_args(argv)


@contextmanager
def scratch_database(server_url: str, keep: bool) -> Iterator[str]:
    """A new, empty database on the server; its SQLAlchemy URL."""
    url = make_url(server_url)
    name = f"abl_bench_usage_{uuid.uuid4().hex[:8]}"
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        if keep:
            console.print(f"kept database {name}")
        else:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def seed(engine: Engine, args: argparse.Namespace, now: datetime) -> dict[str, float]:
    """Fill the database; seconds per step."""
    start = now - timedelta(days=args.days)
    base_ledger = args.accounts + 2 * args.requests
    params: dict[str, Any] = {
        "accounts": args.accounts,
        "requests": args.requests,
        "days": args.days,
        "now": now,
        "start": start,
        "credit_usd": 0.001,
        "topups": 0,
    }
    steps = {"accounts": SEED_ACCOUNTS, "keys": SEED_KEYS, "requests": SEED_REQUESTS}
    timings: dict[str, float] = {}
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL synchronous_commit = off"))
        conn.execute(text("SET LOCAL work_mem = '512MB'"))
        for step, sql in steps.items():
            timings[step] = _timed(partial(conn.execute, text(sql), params))
        charged = conn.execute(text("SELECT count(*) FROM request WHERE credits_charged > 0"))
        params["topups"] = max(0, args.ledger - base_ledger - int(charged.scalar_one()))
        timings["ledger"] = _timed(lambda: conn.execute(text(SEED_LEDGER), params))
        timings["balances"] = _timed(lambda: conn.execute(text(SETTLE_BALANCES)))
    with Session(engine) as session, session.begin():
        # What settle_request would have written, request by request.
        timings["daily_usage"] = _timed(lambda: daily_usage.rebuild(session))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        # What autovacuum does in production: fresh statistics and visibility map.
        timings["vacuum_analyze"] = _timed(lambda: conn.execute(text("VACUUM ANALYZE")))
    return timings


def _timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def time_query(fn: Callable[[], object], runs: int) -> dict[str, float]:
    """One cold run, then `runs` timed ones: milliseconds."""
    first = _timed(fn) * 1000
    times = [_timed(fn) * 1000 for _ in range(runs)]
    return {
        "first_ms": round(first, 1),
        "min_ms": round(min(times), 1),
        "median_ms": round(statistics.median(times), 1),
        "max_ms": round(max(times), 1),
    }


def queries(session: Session, now: datetime, window: timedelta) -> dict[str, Callable[[], object]]:
    """The billing queries to time, by name."""
    start = now - window
    busiest = session.execute(
        text("SELECT account_id FROM request GROUP BY account_id ORDER BY count(*) DESC LIMIT 1")
    ).scalar_one()
    ledger_page = (
        select(LedgerEntry)
        .where(LedgerEntry.account_id == busiest)
        .order_by(LedgerEntry.id.desc())
        .limit(51)
    )
    return {
        GOAL: lambda: usage(session, start, now, ["account", "day"]),
        "usage 30d by account,model,day,key": lambda: usage(
            session, start, now, ["account", "model", "day", "key"]
        ),
        "usage 30d totals": lambda: usage(session, start, now),
        "usage 30d by model,day": lambda: usage(session, start, now, ["model", "day"]),
        "usage all-time by account,day": lambda: usage(
            session, now - timedelta(days=3650), now, ["account", "day"]
        ),
        "usage 30d, busiest account, by day": lambda: usage(
            session, start, now, ["day"], account_id=busiest
        ),
        "top 10 accounts 30d": lambda: top_accounts(session, start, now, 10),
        "ledger page (busiest account)": lambda: list(session.scalars(ledger_page)),
        "reconcile, balances only (every account)": lambda: balances(session),
        "reconcile, all four checks (docs/billing.md)": lambda: reconcile(session),
    }


def explain(session: Session, now: datetime, window: timedelta) -> list[str]:
    """EXPLAIN ANALYZE of the goal query: the plan that made it fast (or not)."""
    query = usage_query(now - window, now, ["account", "day"])
    compiled = query.compile(session.get_bind(), compile_kwargs={"literal_binds": True})
    plan = session.execute(text(f"EXPLAIN (ANALYZE, BUFFERS) {compiled}")).scalars().all()
    return [str(line) for line in plan]


def goal_from_requests(session: Session, start: datetime, end: datetime) -> list[Any]:
    """The goal report summed from request rows alone: what it cost before the rollup."""
    day = cast(func.timezone(literal_column("'UTC'"), Request.created_at), Date)
    query = (
        select(
            Request.account_id,
            day,
            func.count(),
            func.sum(Request.input_tokens),
            func.sum(Request.output_tokens),
            func.sum(Request.credits_charged),
            func.sum(Request.cost_usd),
        )
        .where(
            Request.created_at >= start,
            Request.created_at < end,
            Request.status.in_(TERMINAL_STATUSES),
        )
        .group_by(Request.account_id, day)
        .order_by(Request.account_id, day)
    )
    raise_work_mem(session)
    return list(session.execute(query))


def counts(session: Session) -> dict[str, int]:
    tables = ("account", "api_key", "request", "ledger_entry")
    return {t: int(session.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()) for t in tables}


def measure(session: Session, args: argparse.Namespace, now: datetime) -> dict[str, Any]:
    window = timedelta(days=args.window_days)
    results = {
        name: time_query(fn, args.runs) for name, fn in queries(session, now, window).items()
    }
    if not args.no_compare:
        results[RAW_GOAL] = time_query(
            lambda: goal_from_requests(session, now - window, now), args.runs
        )
    session.rollback()
    began = time.perf_counter()
    wrong = daily_usage.discrepancies(session)
    check_ms = round((time.perf_counter() - began) * 1000, 1)
    goal_rows = len(usage(session, now - window, now, ["account", "day"]))
    return {
        "goal": {"query": GOAL, "rows_returned": goal_rows, "target_ms": 1000},
        "queries": results,
        # The seeded rollup against the request rows, every row: must be empty.
        "daily_usage_check": {"discrepancies": len(wrong), "ms": check_ms},
        "goal_plan": explain(session, now, window),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    now = datetime.now(UTC).replace(microsecond=0)
    with scratch_database(args.database_url, args.keep) as url:
        console.print(f"migrating and seeding {make_url(url).database} ...")
        upgrade(url)
        engine = create_engine(url)
        try:
            seeded = seed(engine, args, now)
            with Session(engine) as session:
                server = session.execute(text("SHOW server_version")).scalar_one()
                sizes = counts(session)
                measured = measure(session, args, now)
        finally:
            engine.dispose()
    return {
        "measured_at": now.isoformat(),
        "postgres": server,
        "parameters": {k: v for k, v in vars(args).items() if k not in ("database_url", "output")},
        "rows": sizes,
        "seed_seconds": {k: round(v, 1) for k, v in seeded.items()},
        **measured,
    }


def report(result: dict[str, Any]) -> None:
    table = Table(title=f"billing queries ({result['rows']})", title_justify="left")
    for column in ("query", "first ms", "min ms", "median ms", "max ms"):
        table.add_column(column, justify="left" if column == "query" else "right")
    for name, t in result["queries"].items():
        table.add_row(name, *(str(t[k]) for k in ("first_ms", "min_ms", "median_ms", "max_ms")))
    console.print(f"seeded in {result['seed_seconds']} s")
    console.print(table)
    check = result["daily_usage_check"]
    console.print(
        f"daily_usage vs requests: {check['discrepancies']} discrepancies ({check['ms']} ms)"
    )
    goal = result["queries"][GOAL]["median_ms"]
    verdict = "[green]meets[/]" if goal < 1000 else "[red]misses[/]"
    console.print(f"goal: {GOAL} median {goal} ms {verdict} the 1 s target")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    report(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    console.print(f"wrote {args.output}")
    return 0 if result["daily_usage_check"]["discrepancies"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

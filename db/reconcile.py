"""Reconcile: do the balances, the ledger, the requests and the daily rollup tell one story?

Four checks, each one SQL statement:
- every account's balance and reserve equal the sums of its ledger rows, and its reserve the
  holds of its open requests (`balances`);
- every ledger row's balance_after / reserved_after is the previous row's (by id, within the
  account) plus its amount, starting from 0 (`chain_breaks`): an amount or a running total
  changed after the fact shows up here even when the sums were made to agree;
- every request's reserve, release and charge rows match its hold and its charge: a reserve of
  its hold; once settled, a release of it and a charge row exactly when it was charged
  (`request_mismatches`);
- the daily_usage rollup equals the sums over the settled requests (`usage_mismatches`).
Each list holds at most `limit` rows. Functions take a session and never commit.
"""

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, func, select, text
from sqlalchemy.orm import Session

from db import daily_usage
from db.models import BALANCE_KINDS, RESERVATION_KINDS, Account, LedgerEntry, Request

# Rows reported per check: enough to act on, bounded when something is systematically wrong.
REPORT_LIMIT = 1000


@dataclass(frozen=True)
class Discrepancy:
    account_id: str
    balance: int
    ledger_balance: int
    reserved: int
    ledger_reserved: int
    open_reservations: int


@dataclass(frozen=True)
class ChainBreak:
    """A ledger row whose running totals do not follow from the row before it."""

    account_id: str
    entry_id: int
    kind: str
    amount: int
    balance_after: int
    expected_balance_after: int
    reserved_after: int
    expected_reserved_after: int


@dataclass(frozen=True)
class RequestMismatch:
    """A request whose ledger rows disagree with its hold or its charge (None: no such row)."""

    request_id: str
    account_id: str
    status: str
    credits_reserved: int
    credits_charged: int
    reserve_amount: int | None
    release_amount: int | None
    charge_amount: int | None


@dataclass(frozen=True)
class UsageMismatch:
    """A daily_usage row as the requests sum it (`requests`) or as stored (`rollup`)."""

    source: str
    day: str
    account_id: str
    api_key_id: str
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    credits_charged: int
    cost_usd: str
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


Finding = Discrepancy | ChainBreak | RequestMismatch | UsageMismatch


@dataclass(frozen=True)
class Reconciliation:
    accounts_checked: int
    balances: list[Discrepancy] = field(default_factory=list)
    chain_breaks: list[ChainBreak] = field(default_factory=list)
    request_mismatches: list[RequestMismatch] = field(default_factory=list)
    usage_mismatches: list[UsageMismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems()

    def problems(self) -> list[Finding]:
        """Every finding, of every check."""
        return [
            *self.balances,
            *self.chain_breaks,
            *self.request_mismatches,
            *self.usage_mismatches,
        ]


def reconcile(session: Session, limit: int = REPORT_LIMIT) -> Reconciliation:
    """Every check above, over every account."""
    checked = session.execute(select(func.count()).select_from(Account)).scalar_one()
    return Reconciliation(
        accounts_checked=int(checked),
        balances=balances(session)[:limit],
        chain_breaks=chain_breaks(session, limit),
        request_mismatches=request_mismatches(session, limit),
        usage_mismatches=usage_mismatches(session, limit),
    )


def balances(session: Session) -> list[Discrepancy]:
    """Accounts whose balance or reserve disagrees with the ledger or with open requests."""
    ledger = (
        select(
            LedgerEntry.account_id,
            func.coalesce(
                func.sum(LedgerEntry.amount).filter(LedgerEntry.kind.in_(BALANCE_KINDS)), 0
            ).label("bal"),
            func.coalesce(
                func.sum(LedgerEntry.amount).filter(LedgerEntry.kind.in_(RESERVATION_KINDS)), 0
            ).label("res"),
        )
        .group_by(LedgerEntry.account_id)
        .subquery()
    )
    open_reqs = (
        select(Request.account_id, func.sum(Request.credits_reserved).label("open"))
        .where(Request.status.in_(("queued", "running")))
        .group_by(Request.account_id)
        .subquery()
    )
    rows = session.execute(
        select(
            Account.id,
            Account.credit_balance,
            Account.reserved_credits,
            func.coalesce(ledger.c.bal, 0),
            func.coalesce(ledger.c.res, 0),
            func.coalesce(open_reqs.c.open, 0),
        )
        .outerjoin(ledger, ledger.c.account_id == Account.id)
        .outerjoin(open_reqs, open_reqs.c.account_id == Account.id)
    ).all()
    bad = []
    for acct_id, bal, res, lbal, lres, open_ in rows:
        if bal != lbal or res != lres or res != open_ or bal < 0 or res < 0:
            bad.append(Discrepancy(acct_id, bal, int(lbal), res, int(lres), int(open_)))
    return bad


def _kinds(kinds: tuple[str, ...]) -> str:
    return ", ".join(f"'{kind}'" for kind in kinds)


# Each row against the one before it in its account (ids follow the order in which rows were
# written under the account's row lock: every writer locks the account before it inserts).
_CHAIN = text(
    f"""
    SELECT account_id, id, kind, amount, balance_after, expected_balance_after,
           reserved_after, expected_reserved_after
    FROM (
        SELECT account_id, id, kind, amount, balance_after, reserved_after,
               coalesce(lag(balance_after) OVER running, 0)
                 + CASE WHEN kind IN ({_kinds(BALANCE_KINDS)}) THEN amount ELSE 0 END
                 AS expected_balance_after,
               coalesce(lag(reserved_after) OVER running, 0)
                 + CASE WHEN kind IN ({_kinds(RESERVATION_KINDS)}) THEN amount ELSE 0 END
                 AS expected_reserved_after
        FROM ledger_entry
        WINDOW running AS (PARTITION BY account_id ORDER BY id)
    ) AS followed
    WHERE balance_after <> expected_balance_after OR reserved_after <> expected_reserved_after
    ORDER BY account_id, id
    LIMIT :limit
    """
).bindparams(bindparam("limit"))


def chain_breaks(session: Session, limit: int = REPORT_LIMIT) -> list[ChainBreak]:
    return [ChainBreak(*row) for row in session.execute(_CHAIN, {"limit": limit})]


# A request's ledger rows, found by (request, account): rows filed under another account count
# as missing. The unique index allows one row per request and kind.
_REQUESTS = text(
    """
    SELECT r.id, r.account_id, r.status, r.credits_reserved, r.credits_charged,
           l.reserve, l.release, l.charge
    FROM request AS r
    LEFT JOIN (
        SELECT request_id, account_id,
               sum(amount) FILTER (WHERE kind = 'reserve') AS reserve,
               sum(amount) FILTER (WHERE kind = 'release') AS release,
               sum(amount) FILTER (WHERE kind = 'charge') AS charge
        FROM ledger_entry
        WHERE request_id IS NOT NULL
        GROUP BY request_id, account_id
    ) AS l ON l.request_id = r.id AND l.account_id = r.account_id
    WHERE l.reserve IS DISTINCT FROM r.credits_reserved
       OR (r.status IN ('queued', 'running') AND (l.release IS NOT NULL OR l.charge IS NOT NULL))
       OR (r.status NOT IN ('queued', 'running')
           AND (l.release IS DISTINCT FROM -r.credits_reserved
                OR coalesce(-l.charge, 0) <> r.credits_charged
                OR l.charge = 0))
    ORDER BY r.account_id, r.id
    LIMIT :limit
    """
).bindparams(bindparam("limit"))


def request_mismatches(session: Session, limit: int = REPORT_LIMIT) -> list[RequestMismatch]:
    rows = session.execute(_REQUESTS, {"limit": limit})
    return [RequestMismatch(*(_int_or_none(value) for value in row)) for row in rows]


def _int_or_none(value: Any) -> Any:
    # sum() over BIGINT is NUMERIC in PostgreSQL; the amounts are whole credits.
    return int(value) if value is not None and not isinstance(value, str) else value


def usage_mismatches(session: Session, limit: int = REPORT_LIMIT) -> list[UsageMismatch]:
    found = daily_usage.discrepancies(session)[:limit]
    return [_usage_mismatch(source, row) for source, row in found]


def _usage_mismatch(source: str, row: tuple[Any, ...]) -> UsageMismatch:
    day, account_id, api_key_id, model, requests, input_tokens, output_tokens, credits, cost = row[
        :9
    ]
    cache_read, cache_write = row[9:11]
    return UsageMismatch(
        source=source,
        day=day.isoformat(),
        account_id=account_id,
        api_key_id=api_key_id,
        model=model,
        requests=int(requests),
        input_tokens=int(input_tokens),
        output_tokens=int(output_tokens),
        credits_charged=int(credits),
        cost_usd=format(cost.normalize(), "f"),
        cache_read_input_tokens=int(cache_read),
        cache_creation_input_tokens=int(cache_write),
    )

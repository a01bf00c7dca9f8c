"""Credit movements. Every change to a balance or a reserve writes one ledger row in the
same transaction, with conditional updates (never read-then-write). Callers own the commit."""

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from db.daily_usage import SettledUsage, record_usage
from db.models import BALANCE_KINDS, RESERVATION_KINDS, Account, LedgerEntry, Request


class InsufficientCredits(Exception):
    def __init__(self, needed: int, available: int) -> None:
        super().__init__(f"needed {needed}, available {available}")
        self.needed = needed
        self.available = available


class AccountUnavailable(Exception):
    """The account does not exist or is disabled."""


def append_balance_entry(
    session: Session,
    account_id: str,
    kind: str,
    amount: int,
    *,
    reason: str | None = None,
    created_by: str | None = None,
    request_id: str | None = None,
) -> LedgerEntry:
    """Add `amount` (signed) to the balance; refuses to take it below the reserved credits."""
    assert kind in BALANCE_KINDS
    row = session.execute(
        update(Account)
        .where(
            Account.id == account_id, Account.credit_balance + amount >= Account.reserved_credits
        )
        .values(credit_balance=Account.credit_balance + amount)
        .returning(Account.credit_balance, Account.reserved_credits)
    ).first()
    if row is None:
        if session.get(Account, account_id) is None:
            raise AccountUnavailable(account_id)
        available = available_credits(session, account_id)
        raise InsufficientCredits(-amount, available)
    entry = LedgerEntry(
        account_id=account_id,
        request_id=request_id,
        kind=kind,
        amount=amount,
        balance_after=row.credit_balance,
        reserved_after=row.reserved_credits,
        reason=reason,
        created_by=created_by,
    )
    session.add(entry)
    session.flush()
    return entry


def available_credits(session: Session, account_id: str) -> int:
    row = session.execute(
        select(Account.credit_balance - Account.reserved_credits).where(Account.id == account_id)
    ).scalar_one_or_none()
    return int(row or 0)


@dataclass(frozen=True)
class NewRequest:
    id: str
    message_id: str
    account_id: str
    api_key_id: str | None
    model: str
    stream: bool
    max_tokens: int
    input_tokens: int
    credits_reserved: int


def open_request(session: Session, req: NewRequest) -> None:
    """Insert the request (queued) and reserve its worst-case credits, or raise."""
    session.add(
        Request(
            id=req.id,
            message_id=req.message_id,
            account_id=req.account_id,
            api_key_id=req.api_key_id,
            model=req.model,
            status="queued",
            stream=req.stream,
            max_tokens=req.max_tokens,
            input_tokens=req.input_tokens,
            credits_reserved=req.credits_reserved,
        )
    )
    session.flush()
    n = req.credits_reserved
    row = session.execute(
        update(Account)
        .where(
            Account.id == req.account_id,
            Account.disabled.is_(False),
            Account.credit_balance - Account.reserved_credits >= n,
        )
        .values(reserved_credits=Account.reserved_credits + n)
        .returning(Account.credit_balance, Account.reserved_credits)
    ).first()
    if row is None:
        account = session.get(Account, req.account_id)
        if account is None or account.disabled:
            raise AccountUnavailable(req.account_id)
        raise InsufficientCredits(n, account.credit_balance - account.reserved_credits)
    session.execute(
        insert(LedgerEntry).values(
            account_id=req.account_id,
            request_id=req.id,
            kind="reserve",
            amount=n,
            balance_after=row.credit_balance,
            reserved_after=row.reserved_credits,
        )
    )


def claim_request(session: Session, request_id: str, worker: str) -> bool:
    """queued -> running; False if another delivery already claimed or settled it."""
    result = session.execute(
        update(Request)
        .where(Request.id == request_id, Request.status == "queued")
        .values(status="running", worker=worker, started_at=datetime.now(UTC))
        .returning(Request.id)
    ).first()
    return result is not None


@dataclass(frozen=True)
class Settlement:
    status: str
    credits_charged: int
    remaining_credits: int
    cost_usd: Decimal
    already_settled: bool


@dataclass(frozen=True)
class Outcome:
    status: str  # succeeded | failed | cancelled
    output_tokens: int
    cost_usd: Decimal
    credits_charged: int
    stop_reason: str | None = None
    stop_sequence: str | None = None
    error: str | None = None


def settle_request(
    session: Session, request_id: str, outcome: Outcome, *, only_queued: bool = False
) -> Settlement:
    """Charge actual usage and release the reservation, once. A second call changes nothing.

    `only_queued` settles only a request no worker has claimed (the API giving up on it).
    """
    open_statuses = ("queued",) if only_queued else ("queued", "running")
    row = session.execute(
        update(Request)
        .where(Request.id == request_id, Request.status.in_(open_statuses))
        .values(
            status=outcome.status,
            output_tokens=outcome.output_tokens,
            cost_usd=outcome.cost_usd,
            credits_charged=outcome.credits_charged,
            stop_reason=outcome.stop_reason,
            stop_sequence=outcome.stop_sequence,
            error=outcome.error,
            finished_at=datetime.now(UTC),
        )
        .returning(
            Request.account_id,
            Request.credits_reserved,
            Request.created_at,
            Request.api_key_id,
            Request.model,
            Request.input_tokens,
        )
    ).first()
    if row is None:
        done = session.execute(select(Request).where(Request.id == request_id)).scalar_one()
        return Settlement(
            status=done.status,
            credits_charged=done.credits_charged,
            remaining_credits=available_credits(session, done.account_id),
            cost_usd=done.cost_usd,
            already_settled=True,
        )
    account_id, reserved = row.account_id, row.credits_reserved
    charge = outcome.credits_charged
    acct = session.execute(
        update(Account)
        .where(Account.id == account_id)
        .values(
            credit_balance=Account.credit_balance - charge,
            reserved_credits=Account.reserved_credits - reserved,
        )
        .returning(Account.credit_balance, Account.reserved_credits)
    ).one()
    entries = [
        {
            "kind": "release",
            "amount": -reserved,
            "balance_after": acct.credit_balance + charge,
            "reserved_after": acct.reserved_credits,
        }
    ]
    if charge:
        entries.append(
            {
                "kind": "charge",
                "amount": -charge,
                "balance_after": acct.credit_balance,
                "reserved_after": acct.reserved_credits,
            }
        )
    session.execute(
        insert(LedgerEntry),
        [{"account_id": account_id, "request_id": request_id, **e} for e in entries],
    )
    usage = SettledUsage(
        row.created_at,
        account_id,
        row.api_key_id,
        row.model,
        row.input_tokens,
        outcome.output_tokens,
        charge,
        outcome.cost_usd,
    )
    record_usage(session, usage)  # the daily_usage rollup, exactly once with the settlement
    return Settlement(
        status=outcome.status,
        credits_charged=charge,
        remaining_credits=acct.credit_balance - acct.reserved_credits,
        cost_usd=outcome.cost_usd,
        already_settled=False,
    )


@dataclass(frozen=True)
class Discrepancy:
    account_id: str
    balance: int
    ledger_balance: int
    reserved: int
    ledger_reserved: int
    open_reservations: int


def reconcile(session: Session) -> list[Discrepancy]:
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

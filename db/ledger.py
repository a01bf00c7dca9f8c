"""Credit movements. Every change to a balance or a reserve writes one ledger row in the
same transaction, with conditional updates (never read-then-write). Callers own the commit."""

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import Connection, Table, bindparam, func, insert, select, text, update
from sqlalchemy.orm import Session

from db.daily_usage import SettledUsage, record_usage
from db.models import BALANCE_KINDS, RESERVATION_KINDS, Account, LedgerEntry, Request

# The statements of a request's claim and settlement, built once: building them per call (and
# running them through the ORM's bulk-update path) cost ~3 ms of CPU per request, taken under
# the worker's GIL beside the engine's stepping thread (docs/benchmarks.md).
_REQUEST: Table = Request.__table__  # type: ignore[assignment]
_ACCOUNT: Table = Account.__table__  # type: ignore[assignment]
_CLAIM = (
    update(_REQUEST)
    .where(_REQUEST.c.id == bindparam("request_id"), _REQUEST.c.status == "queued")
    .values(status="running", worker=bindparam("claimed_by"), started_at=bindparam("claimed_at"))
    .returning(_REQUEST.c.id)
)
_SETTLE = (
    update(_REQUEST)
    .where(
        _REQUEST.c.id == bindparam("request_id"),
        _REQUEST.c.status.in_(bindparam("open_statuses", expanding=True)),
    )
    .values(
        status=bindparam("new_status"),
        output_tokens=bindparam("new_output_tokens"),
        cost_usd=bindparam("new_cost_usd"),
        credits_charged=bindparam("new_credits_charged"),
        stop_reason=bindparam("new_stop_reason"),
        stop_sequence=bindparam("new_stop_sequence"),
        error=bindparam("new_error"),
        finished_at=bindparam("new_finished_at"),
    )
    .returning(
        _REQUEST.c.account_id,
        _REQUEST.c.credits_reserved,
        _REQUEST.c.created_at,
        _REQUEST.c.api_key_id,
        _REQUEST.c.model,
        _REQUEST.c.input_tokens,
    )
)
_CHARGE = (
    update(_ACCOUNT)
    .where(_ACCOUNT.c.id == bindparam("account"))
    .values(
        credit_balance=_ACCOUNT.c.credit_balance - bindparam("charge"),
        reserved_credits=_ACCOUNT.c.reserved_credits - bindparam("reserved"),
    )
    .returning(_ACCOUNT.c.credit_balance, _ACCOUNT.c.reserved_credits)
)
_LEDGER_ROWS = insert(LedgerEntry.__table__)
# A settled request's outcome (Core: fresh from the database, never a stale ORM object).
_SETTLED = select(
    _REQUEST.c.status, _REQUEST.c.credits_charged, _REQUEST.c.cost_usd, _REQUEST.c.account_id
).where(_REQUEST.c.id == bindparam("request_id"))


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


def available_credits(session: Session | Connection, account_id: str) -> int:
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


def commit_without_flush_wait(session: Session | Connection) -> None:
    """This transaction's commit returns before its WAL reaches the disk (synchronous_commit
    off): one fsync less on a request's way to its first token. A crash of Postgres itself in
    the next ~0.2 s can lose it, atomically, and only steps that charged nothing use it (the
    reservation and the claim); any later synchronous commit (a settlement) flushes it too."""
    session.execute(text("SET LOCAL synchronous_commit TO OFF"))


# The request row, its reservation and the reservation's ledger row in one statement: the
# account update is conditional (never read-then-write), and the two inserts take their rows
# from it, so either all three happen or none. One round trip instead of five ORM statements
# (docs/benchmarks.md: 3.4 -> 1.2 ms per admission on an idle machine).
_OPEN = text(
    """
    WITH held AS (
        UPDATE account SET reserved_credits = reserved_credits + :n
        WHERE id = :account_id AND NOT disabled AND credit_balance - reserved_credits >= :n
        RETURNING credit_balance, reserved_credits
    ), opened AS (
        INSERT INTO request (id, message_id, account_id, api_key_id, model, status, stream,
                             max_tokens, input_tokens, output_tokens, credits_reserved,
                             credits_charged, cost_usd)
        SELECT :id, :message_id, :account_id, :api_key_id, :model, 'queued', :stream,
               :max_tokens, :input_tokens, 0, :n, 0, 0
        FROM held
        RETURNING id
    )
    INSERT INTO ledger_entry (account_id, request_id, kind, amount, balance_after, reserved_after)
    SELECT :account_id, opened.id, 'reserve', :n, held.credit_balance, held.reserved_credits
    FROM held, opened
    RETURNING id
    """
)
_ACCOUNT_STATE = select(
    _ACCOUNT.c.disabled, _ACCOUNT.c.credit_balance - _ACCOUNT.c.reserved_credits
).where(_ACCOUNT.c.id == bindparam("account_id"))


def open_request(session: Session | Connection, req: NewRequest) -> None:
    """Insert the request (queued) and reserve its worst-case credits, or raise."""
    commit_without_flush_wait(session)
    params = {
        "n": req.credits_reserved,
        "account_id": req.account_id,
        "id": req.id,
        "message_id": req.message_id,
        "api_key_id": req.api_key_id,
        "model": req.model,
        "stream": req.stream,
        "max_tokens": req.max_tokens,
        "input_tokens": req.input_tokens,
    }
    if session.execute(_OPEN, params).first() is not None:
        return
    state = session.execute(_ACCOUNT_STATE, {"account_id": req.account_id}).first()
    if state is None or state.disabled:
        raise AccountUnavailable(req.account_id)
    raise InsufficientCredits(req.credits_reserved, int(state[1]))


def claim_request(session: Session | Connection, request_id: str, worker: str) -> bool:
    """queued -> running; False if another delivery already claimed or settled it."""
    commit_without_flush_wait(session)
    params = {"request_id": request_id, "claimed_by": worker, "claimed_at": datetime.now(UTC)}
    return session.execute(_CLAIM, params).first() is not None


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
    session: Session | Connection, request_id: str, outcome: Outcome, *, only_queued: bool = False
) -> Settlement:
    """Charge actual usage and release the reservation, once. A second call changes nothing.

    `only_queued` settles only a request no worker has claimed (the API giving up on it).
    """
    open_statuses = ["queued"] if only_queued else ["queued", "running"]
    row = session.execute(
        _SETTLE,
        {
            "request_id": request_id,
            "open_statuses": open_statuses,
            "new_status": outcome.status,
            "new_output_tokens": outcome.output_tokens,
            "new_cost_usd": outcome.cost_usd,
            "new_credits_charged": outcome.credits_charged,
            "new_stop_reason": outcome.stop_reason,
            "new_stop_sequence": outcome.stop_sequence,
            "new_error": outcome.error,
            "new_finished_at": datetime.now(UTC),
        },
    ).first()
    if row is None:
        # populate_existing: the row changed under Core updates the session did not track.
        done = session.execute(_SETTLED, {"request_id": request_id}).one()
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
        _CHARGE, {"account": account_id, "charge": charge, "reserved": reserved}
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
        _LEDGER_ROWS,
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

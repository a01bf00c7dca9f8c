"""Credit movements. Every change to a balance or a reserve writes one ledger row in the
same transaction, with conditional updates (never read-then-write). Callers own the commit; the
hot paths run their one statement in autocommit (`db.session.in_autocommit`)."""

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import Connection, Table, bindparam, select, text, update
from sqlalchemy.orm import Session

from db.daily_usage import NO_KEY
from db.models import BALANCE_KINDS, Account, LedgerEntry, Request
from db.pricing import Prices

# The statements of a request's claim and settlement, built once: building them per call (and
# running them through the ORM's bulk-update path) cost ~3 ms of CPU per request, taken under
# the worker's GIL beside the engine's stepping thread (docs/benchmarks.md).
_REQUEST: Table = Request.__table__  # type: ignore[assignment]
_ACCOUNT: Table = Account.__table__  # type: ignore[assignment]
# Inside a statement, this makes its transaction's commit return before the WAL reaches the
# disk (like SET LOCAL synchronous_commit, which needs a transaction block): for the steps that
# charge nothing (the reservation and the claim), also when run alone in autocommit, which
# then costs one round trip and holds the account's row lock only inside the server. A crash
# of Postgres itself in the next ~0.2 s can lose such a step, atomically; any later synchronous
# commit (a settlement) flushes it too.
_ASYNC_COMMIT = "async_commit AS (SELECT set_config('synchronous_commit', 'off', true) AS v)"
_CLAIM = text(
    f"""
    WITH {_ASYNC_COMMIT}
    UPDATE request SET status = 'running', worker = :claimed_by, started_at = :claimed_at
    FROM async_commit
    WHERE id = :request_id AND status = 'queued'
    RETURNING id
    """
)
# What a request costs, from its own row: the prices stored at its admission, applied to its
# input tokens and the output tokens the settlement reports; nothing when it is not billable.
# Prompt tokens read from or written to the prompt cache (the worker's count) cost the input
# price times the multipliers stored at admission (db/pricing.py `Prices.cost`, the same sum).
# Rows admitted before prices were stored (revision 0004) have none and take the settling
# process's (`legacy_*`). NUMERIC throughout: nothing is rounded before the credits round up.
_COST = """CASE WHEN CAST(:billable AS boolean) THEN
        ((input_tokens - CAST(:cache_read AS bigint) - CAST(:cache_write AS bigint)
          + CAST(:cache_read AS bigint) * coalesce(cache_read_multiplier, 1)
          + CAST(:cache_write AS bigint) * coalesce(cache_write_multiplier, 1))
           * coalesce(input_price_per_mtok, CAST(:legacy_input AS numeric))
         + CAST(:output_tokens AS bigint)
           * coalesce(output_price_per_mtok, CAST(:legacy_output AS numeric)))
        * coalesce(batch_multiplier, 1) / 1000000
    ELSE 0 END"""
_CREDIT_PRICE = "coalesce(credit_price_usd, CAST(:legacy_credit_price AS numeric))"
# A settlement in one statement (one round trip): the request leaves queued/running (the
# condition that makes settlement happen once) with its charge computed from its row and capped
# at its hold, the account is charged and its hold released, the release and charge rows are
# appended, and the request is added to its UTC day's daily_usage row (db/daily_usage.py), all
# from the request row the first update returned. If the request was already settled,
# `settled` is empty and so is everything downstream of it.
_SETTLE = text(
    f"""
    WITH settled AS (
        UPDATE request
        SET status = :new_status, output_tokens = :output_tokens, cost_usd = {_COST},
            cache_read_input_tokens = :cache_read, cache_creation_input_tokens = :cache_write,
            credits_charged = CASE WHEN CAST(:billable AS boolean)
                THEN least(credits_reserved, CAST(ceil({_COST} / {_CREDIT_PRICE}) AS bigint))
                ELSE 0 END,
            stop_reason = :stop_reason, stop_sequence = :stop_sequence, error = :error,
            finished_at = :finished_at
        WHERE id = :request_id AND status = ANY(CAST(:open_statuses AS varchar[]))
        RETURNING account_id, credits_reserved, credits_charged, cost_usd, created_at,
                  api_key_id, model, input_tokens, cache_read_input_tokens,
                  cache_creation_input_tokens
    ), charged AS (
        UPDATE account
        SET credit_balance = account.credit_balance - settled.credits_charged,
            reserved_credits = account.reserved_credits - settled.credits_reserved
        FROM settled
        WHERE account.id = settled.account_id
        RETURNING account.id, account.credit_balance, account.reserved_credits,
                  settled.credits_reserved, settled.credits_charged
    ), entries AS (
        INSERT INTO ledger_entry
            (account_id, request_id, kind, amount, balance_after, reserved_after)
        SELECT id, :request_id, 'release', -credits_reserved, credit_balance + credits_charged,
               reserved_credits
        FROM charged
        UNION ALL
        SELECT id, :request_id, 'charge', -credits_charged, credit_balance, reserved_credits
        FROM charged WHERE credits_charged > 0
        RETURNING id
    ), usage AS (
        INSERT INTO daily_usage AS d
            (day, account_id, api_key_id, model, requests, input_tokens, output_tokens,
             credits_charged, cost_usd, cache_read_input_tokens, cache_creation_input_tokens)
        SELECT CAST(timezone('UTC', created_at) AS date), account_id,
               coalesce(api_key_id, :no_key), model, 1, input_tokens, :output_tokens,
               credits_charged, cost_usd, cache_read_input_tokens, cache_creation_input_tokens
        FROM settled
        ON CONFLICT (day, account_id, api_key_id, model) DO UPDATE
        SET requests = d.requests + 1,
            input_tokens = d.input_tokens + excluded.input_tokens,
            cache_read_input_tokens = d.cache_read_input_tokens
                + excluded.cache_read_input_tokens,
            cache_creation_input_tokens = d.cache_creation_input_tokens
                + excluded.cache_creation_input_tokens,
            output_tokens = d.output_tokens + excluded.output_tokens,
            credits_charged = d.credits_charged + excluded.credits_charged,
            cost_usd = d.cost_usd + excluded.cost_usd
        RETURNING 1
    )
    SELECT charged.credit_balance, charged.reserved_credits, charged.credits_charged,
           settled.cost_usd, (SELECT count(*) FROM entries) AS entries,
           (SELECT count(*) FROM usage) AS usage
    FROM charged, settled
    """
)
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
    # The prices in force now; settlement charges these, whoever settles it.
    prices: Prices
    # The Message Batch it runs an item of (None: interactive).
    batch_id: str | None = None


# The request row, its reservation and the reservation's ledger row in one statement: the
# account update is conditional (never read-then-write), and the two inserts take their rows
# from it, so either all three happen or none. One round trip instead of five ORM statements
# (docs/benchmarks.md: 3.4 -> 1.2 ms per admission on an idle machine).
_OPEN = text(
    f"""
    WITH {_ASYNC_COMMIT}, held AS (
        UPDATE account SET reserved_credits = reserved_credits + :n
        FROM async_commit
        WHERE id = :account_id AND NOT disabled AND credit_balance - reserved_credits >= :n
        RETURNING credit_balance, reserved_credits
    ), opened AS (
        INSERT INTO request (id, message_id, account_id, api_key_id, model, status, stream,
                             max_tokens, input_tokens, output_tokens, credits_reserved,
                             credits_charged, cost_usd, input_price_per_mtok,
                             output_price_per_mtok, credit_price_usd, batch_multiplier,
                             batch_id, cache_read_multiplier, cache_write_multiplier)
        SELECT :id, :message_id, :account_id, :api_key_id, :model, 'queued', :stream,
               :max_tokens, :input_tokens, 0, :n, 0, 0, :input_price, :output_price,
               :credit_price, :batch_multiplier, :batch_id, :cache_read_multiplier,
               :cache_write_multiplier
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
        "input_price": req.prices.input_per_mtok,
        "output_price": req.prices.output_per_mtok,
        "credit_price": req.prices.credit_price_usd,
        "batch_multiplier": req.prices.batch_multiplier,
        "batch_id": req.batch_id,
        "cache_read_multiplier": req.prices.cache_read_multiplier,
        "cache_write_multiplier": req.prices.cache_write_multiplier,
    }
    if session.execute(_OPEN, params).first() is not None:
        return
    state = session.execute(_ACCOUNT_STATE, {"account_id": req.account_id}).first()
    if state is None or state.disabled:
        raise AccountUnavailable(req.account_id)
    raise InsufficientCredits(req.credits_reserved, int(state[1]))


def claim_request(session: Session | Connection, request_id: str, worker: str) -> bool:
    """queued -> running; False if another delivery already claimed or settled it."""
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
    """How a request ended, as its settler saw it; the charge comes from the request's row."""

    status: str  # succeeded | failed | cancelled
    output_tokens: int
    # Charged for its input and output tokens: never when failed, nor when it ended before
    # any worker ran it.
    billable: bool
    stop_reason: str | None = None
    stop_sequence: str | None = None
    error: str | None = None
    # Of the prompt's tokens, those the worker read from its prompt cache and wrote to it.
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    @classmethod
    def unbilled(cls, status: str, error: str) -> "Outcome":
        """Ended by the platform: nothing produced, nothing charged, the hold released."""
        return cls(status, 0, billable=False, error=error)


def settle_request(
    session: Session | Connection,
    request_id: str,
    outcome: Outcome,
    *,
    only_queued: bool = False,
    legacy_prices: Prices | None = None,
) -> Settlement:
    """Charge actual usage at the request's own prices, capped at its hold, and release the
    hold, once. A second call changes nothing.

    `only_queued` settles only a request no worker has claimed (the API giving up on it).
    `legacy_prices` price a request admitted before prices were stored on its row.
    """
    open_statuses = ["queued"] if only_queued else ["queued", "running"]
    billable = outcome.billable and outcome.status != "failed"
    legacy = legacy_prices
    row = session.execute(
        _SETTLE,
        {
            "request_id": request_id,
            "open_statuses": open_statuses,
            "new_status": outcome.status,
            "output_tokens": outcome.output_tokens,
            "cache_read": outcome.cache_read_tokens if billable else 0,
            "cache_write": outcome.cache_write_tokens if billable else 0,
            "billable": billable,
            "legacy_input": legacy.input_per_mtok if legacy else None,
            "legacy_output": legacy.output_per_mtok if legacy else None,
            "legacy_credit_price": legacy.credit_price_usd if legacy else None,
            "stop_reason": outcome.stop_reason,
            "stop_sequence": outcome.stop_sequence,
            "error": outcome.error,
            "finished_at": datetime.now(UTC),
            "no_key": NO_KEY,
        },
    ).first()
    if row is None:
        done = session.execute(_SETTLED, {"request_id": request_id}).one()
        return Settlement(
            status=done.status,
            credits_charged=done.credits_charged,
            remaining_credits=available_credits(session, done.account_id),
            cost_usd=done.cost_usd,
            already_settled=True,
        )
    # Every part of the statement ran: the ledger rows and the day's usage row are written (the
    # statement guarantees it; in autocommit this checks what is already committed).
    charge = int(row.credits_charged)
    assert row.entries == (2 if charge else 1) and row.usage == 1, row
    return Settlement(
        status=outcome.status,
        credits_charged=charge,
        remaining_credits=row.credit_balance - row.reserved_credits,
        cost_usd=row.cost_usd,
        already_settled=False,
    )

"""Money on the real stack: no overspend under concurrency, settlement exactly once, cancelled
streams charged for what they produced, the sweeper freeing dead workers' holds, usage
reports that add up, and each account seeing only its own balance."""

import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from api.ids import new_message_id, new_request_id
from contract.keys import heartbeat_key
from db.ledger import NewRequest, Outcome, claim_request, open_request, settle_request
from db.models import Account, LedgerEntry, Request
from db.pricing import Prices, cost_usd, credits_for
from db.session import get_sessionmaker, transaction
from db.stuck_requests import sweep
from infra.launcher.stack import Stack
from tests.conftest import AccountFactory
from tests.support import STACK_MODEL, wait_for

pytestmark = pytest.mark.integration

MODEL = STACK_MODEL
PRICE_PER_MTOK = Decimal(5)
CREDIT_USD = Decimal("0.001")
# Requests opened here directly, at ten times the catalogue's price so charges are whole credits.
PRICES = Prices(Decimal(50), Decimal(50), CREDIT_USD)
INSUFFICIENT = re.compile(
    r"insufficient credits: this request may cost up to (\d+) credits, available (\d+)"
)


def reservation(input_tokens: int, max_tokens: int) -> int:
    """ceil((input + max_tokens) * $5/M / $0.001): what admission holds for a request."""
    return math.ceil((input_tokens + max_tokens) * PRICE_PER_MTOK / 1_000_000 / CREDIT_USD)


def credits_of(input_tokens: int, output_tokens: int) -> int:
    return credits_for(
        cost_usd(input_tokens, output_tokens, PRICE_PER_MTOK, PRICE_PER_MTOK), CREDIT_USD
    )


def fresh(db: Session, row_type: type[Any], key: str) -> Any:
    """The row as committed now, not as the session cached it."""
    db.rollback()
    return db.get(row_type, key, populate_existing=True)


def ledger(db: Session, *, account_id: str | None = None, request_id: str | None = None) -> list:
    db.rollback()
    query = select(LedgerEntry).order_by(LedgerEntry.id)
    if account_id is not None:
        query = query.where(LedgerEntry.account_id == account_id)
    if request_id is not None:
        query = query.where(LedgerEntry.request_id == request_id)
    return list(db.scalars(query))


def assert_books_straight(admin: httpx.Client, account_id: str) -> None:
    report = admin.get("/admin/reconcile")
    assert report.status_code == 200, report.text
    body = report.json()
    assert account_id not in {d["account_id"] for d in body["discrepancies"]}
    assert body["ok"], body["discrepancies"]


def key_client(stack: Stack, key: str, **kwargs: Any) -> httpx.Client:
    return httpx.Client(base_url=stack.base_url, headers={"x-api-key": key}, timeout=120, **kwargs)


# ---- concurrency -------------------------------------------------------------------------


def test_fifty_concurrent_requests_cannot_overspend(
    stack: Stack, make_account: AccountFactory, admin: httpx.Client, db: Session
) -> None:
    # A long prompt and few output tokens: each request costs nearly all it reserves, so an
    # account that can hold ten reservations can pay for about ten requests and no more.
    body = {
        "model": MODEL,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "the quick brown fox " * 180}],
    }
    probe = make_account(credits=0)
    with key_client(stack, probe.key) as http:
        counted = http.post("/v1/messages/count_tokens", json=body)
    assert counted.status_code == 200, counted.text
    input_tokens = counted.json()["input_tokens"]
    hold = reservation(input_tokens, 16)
    assert hold >= 4, "the prompt should make each request worth several credits"
    credits = 10 * hold
    account = make_account(credits=credits)

    barrier = threading.Barrier(50)
    limits = httpx.Limits(max_connections=60, max_keepalive_connections=60)
    with key_client(stack, account.key, limits=limits) as http:

        def send(_: int) -> httpx.Response:
            barrier.wait()
            return http.post("/v1/messages", json=body)

        with ThreadPoolExecutor(max_workers=50) as pool:
            responses = list(pool.map(send, range(50)))

    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 402]
    assert len(ok) + len(refused) == 50, [
        r.text for r in responses if r.status_code not in (200, 402)
    ]
    # Any refusal means ten holds were taken first; paying for all fifty is impossible.
    assert len(ok) >= 10 and refused
    for r in refused:
        error = r.json()["error"]
        assert error["type"] == "billing_error"
        match = INSUFFICIENT.fullmatch(error["message"])
        assert match, error["message"]
        assert int(match[1]) == hold and int(match[2]) < hold

    charged = sum(r.json()["estimated_credits_used"] for r in ok)
    assert charged <= credits
    wait_for(
        lambda: fresh(db, Account, account.id).reserved_credits == 0, 10, what="holds released"
    )
    row = fresh(db, Account, account.id)
    assert row.credit_balance == credits - charged >= 0
    requests = list(db.scalars(select(Request).where(Request.account_id == account.id)))
    assert len(requests) == len(ok)  # a refused request leaves no row behind
    assert {r.status for r in requests} == {"succeeded"}
    assert sum(r.credits_charged for r in requests) == charged
    for r in requests:
        assert r.credits_charged == credits_of(r.input_tokens, r.output_tokens)
    entries = ledger(db, account_id=account.id)
    assert all(0 <= e.reserved_after <= e.balance_after for e in entries)
    assert max(e.reserved_after for e in entries) <= credits
    assert min(e.balance_after for e in entries) >= 0
    assert_books_straight(admin, account.id)


# ---- settlement is idempotent ------------------------------------------------------------


def _open_claimed(database_url: str, account_id: str, hold: int, worker: str) -> str:
    request_id = new_request_id()
    with transaction(database_url) as session:
        open_request(session, _new_request(request_id, account_id, hold))
        assert claim_request(session, request_id, worker)
    return request_id


def _new_request(request_id: str, account_id: str, hold: int) -> NewRequest:
    return NewRequest(
        id=request_id,
        message_id=new_message_id(),
        account_id=account_id,
        api_key_id=None,
        model=MODEL,
        stream=False,
        max_tokens=100,
        input_tokens=20,
        credits_reserved=hold,
        prices=PRICES,
    )


def test_settling_a_real_request_again_changes_nothing(
    stack: Stack, make_account: AccountFactory, db: Session
) -> None:
    account = make_account(credits=1000)
    with key_client(stack, account.key) as http:
        body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
        response = http.post("/v1/messages", json=body)
    assert response.status_code == 200, response.text
    request_id = response.headers["request-id"]
    before = fresh(db, Request, request_id)
    assert before.status == "succeeded"
    charged, entries_before = before.credits_charged, ledger(db, request_id=request_id)

    assert stack.database_url is not None
    again = Outcome("succeeded", before.output_tokens + 50, billable=True)
    for _ in range(2):
        with transaction(stack.database_url) as session:
            settlement = settle_request(session, request_id, again)
        assert settlement.already_settled
        assert (settlement.status, settlement.credits_charged) == ("succeeded", charged)
    assert [e.id for e in ledger(db, request_id=request_id)] == [e.id for e in entries_before]
    row = fresh(db, Account, account.id)
    assert (row.credit_balance, row.reserved_credits) == (1000 - charged, 0)


def test_concurrent_settlements_charge_once(
    stack: Stack, make_account: AccountFactory, admin: httpx.Client, db: Session
) -> None:
    assert stack.database_url is not None
    database_url = stack.database_url
    account = make_account(credits=100)
    request_id = _open_claimed(database_url, account.id, 10, "test-settler")
    # (20 + 40) tokens at $50 per million: $0.003, three credits.
    outcome = Outcome("succeeded", 40, billable=True)
    barrier = threading.Barrier(4)

    def settle(_: int) -> bool:
        barrier.wait()
        with transaction(database_url) as session:
            return settle_request(session, request_id, outcome).already_settled

    with ThreadPoolExecutor(max_workers=4) as pool:
        already = list(pool.map(settle, range(4)))
    assert sorted(already) == [False, True, True, True]
    kinds = [(e.kind, e.amount) for e in ledger(db, request_id=request_id)]
    assert kinds == [("reserve", 10), ("release", -10), ("charge", -3)]
    row = fresh(db, Account, account.id)
    assert (row.credit_balance, row.reserved_credits) == (97, 0)
    assert_books_straight(admin, account.id)


# ---- cancellation ------------------------------------------------------------------------


def test_cancelled_stream_is_charged_for_what_it_produced(
    stack: Stack, make_account: AccountFactory, admin: httpx.Client, db: Session
) -> None:
    account = make_account(credits=10_000)
    body = {
        "model": MODEL,
        "max_tokens": 500,
        "temperature": 1.0,
        "stream": True,
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
    }
    received = 0
    with (
        key_client(stack, account.key) as http,
        http.stream("POST", "/v1/messages", json=body) as response,
    ):
        assert response.status_code == 200
        request_id = response.headers["request-id"]
        for line in response.iter_lines():
            if line == "event: content_block_delta":
                received += 1
            if received == 3:
                break
    # Leaving both blocks dropped the connection mid-stream: the client is gone.

    def settled() -> bool:
        return fresh(db, Request, request_id).status not in ("queued", "running")

    wait_for(settled, 30, what="the cancelled request to settle")
    row = fresh(db, Request, request_id)
    assert row.status == "cancelled"
    assert received <= row.output_tokens < 500
    exact = cost_usd(row.input_tokens, row.output_tokens, PRICE_PER_MTOK, PRICE_PER_MTOK)
    assert row.cost_usd == exact
    assert row.credits_charged == credits_of(row.input_tokens, row.output_tokens) > 0
    kinds = [(e.kind, e.amount) for e in ledger(db, request_id=request_id)]
    hold = row.credits_reserved
    assert kinds == [("reserve", hold), ("release", -hold), ("charge", -row.credits_charged)]
    acct = fresh(db, Account, account.id)
    assert (acct.credit_balance, acct.reserved_credits) == (10_000 - row.credits_charged, 0)
    assert_books_straight(admin, account.id)


# ---- the sweeper -------------------------------------------------------------------------


@pytest.fixture
def worker_alive(stack: Stack) -> Iterator[Callable[[str], bool]]:
    """Liveness as the sweeper in a worker sees it: the worker's heartbeat key exists."""
    client = redis.Redis.from_url(stack.redis_url or "")
    try:
        yield lambda name: bool(client.exists(heartbeat_key(name)))
    finally:
        client.close()


def live_worker(stack: Stack) -> str:
    client = redis.Redis.from_url(stack.redis_url or "")
    try:
        keys = client.keys(heartbeat_key("*"))
    finally:
        client.close()
    assert keys, "no worker heartbeat in Redis"
    return keys[0].decode().removeprefix(heartbeat_key(""))


def assert_swept(db: Session, request_id: str, account_id: str, credits: int, why: str) -> None:
    row = fresh(db, Request, request_id)
    assert (row.status, row.credits_charged, row.output_tokens) == ("failed", 0, 0)
    assert row.error is not None and row.error.startswith("swept:") and why in row.error
    kinds = [(e.kind, e.amount) for e in ledger(db, request_id=request_id)]
    assert kinds == [("reserve", row.credits_reserved), ("release", -row.credits_reserved)]
    acct = fresh(db, Account, account_id)
    assert (acct.credit_balance, acct.reserved_credits) == (credits, 0)


def test_sweeper_settles_a_request_whose_worker_died(
    stack: Stack,
    make_account: AccountFactory,
    admin: httpx.Client,
    db: Session,
    worker_alive: Callable[[str], bool],
) -> None:
    assert stack.database_url is not None
    account = make_account(credits=500)
    ghost = f"ghost-{new_request_id()}"  # a worker that claimed it and never heartbeats
    request_id = new_request_id()
    # One transaction: no other sweeper (the stack's worker runs one) can see it meanwhile.
    with transaction(stack.database_url) as session:
        open_request(session, _new_request(request_id, account.id, 40))
        assert claim_request(session, request_id, ghost)
        held = session.get(Account, account.id, populate_existing=True)
        assert held is not None and held.reserved_credits == 40
        swept = sweep(session, worker_alive, queued_timeout_s=3600, running_timeout_s=3600)
        assert request_id in swept
        assert sweep(session, worker_alive, queued_timeout_s=3600, running_timeout_s=3600) == []
    assert_swept(db, request_id, account.id, 500, f"worker {ghost} died")
    assert_books_straight(admin, account.id)


def test_sweeper_spares_live_workers_until_their_deadlines(
    stack: Stack, make_account: AccountFactory, db: Session, worker_alive: Callable[[str], bool]
) -> None:
    assert stack.database_url is not None
    account = make_account(credits=500)
    queued_id, running_id = new_request_id(), new_request_id()
    worker = live_worker(stack)
    with transaction(stack.database_url) as session:
        open_request(session, _new_request(queued_id, account.id, 10))
        open_request(session, _new_request(running_id, account.id, 20))
        assert claim_request(session, running_id, worker)
        now = session.execute(select(func.now())).scalar_one()
        timeouts = {"queued_timeout_s": 60, "running_timeout_s": 120}
        mine = {queued_id, running_id}
        assert mine.isdisjoint(sweep(session, worker_alive, now, **timeouts))
        later = now + timedelta(seconds=61)
        assert mine & set(sweep(session, worker_alive, later, **timeouts)) == {queued_id}
        later = now + timedelta(seconds=121)
        assert mine & set(sweep(session, worker_alive, later, **timeouts)) == {running_id}
    assert_swept(db, queued_id, account.id, 500, "queued for over 60s")
    assert_swept(db, running_id, account.id, 500, "running for over 120s")


def test_sweepers_skip_what_another_holds(
    stack: Stack, make_account: AccountFactory, db: Session
) -> None:
    assert stack.database_url is not None
    account = make_account(credits=500)
    request_id = _open_claimed(stack.database_url, account.id, 30, f"ghost-{new_request_id()}")
    dead: Callable[[str], bool] = lambda _: False  # noqa: E731
    timeouts = {"queued_timeout_s": 3600, "running_timeout_s": 3600}
    maker = get_sessionmaker(stack.database_url)
    with maker() as holder, maker() as other:
        holder.execute(select(Request).where(Request.id == request_id).with_for_update()).one()
        # Waiting for the lock would hang here: SKIP LOCKED passes over it at once.
        other.execute(text("SET LOCAL lock_timeout = '2s'"))
        started = time.monotonic()
        assert request_id not in sweep(other, dead, **timeouts)
        assert time.monotonic() - started < 2
        other.rollback()
        holder.rollback()
        assert request_id in sweep(other, dead, **timeouts)
        other.commit()
    assert_swept(db, request_id, account.id, 500, "died")


def test_the_workers_sweeper_frees_a_dead_workers_hold(
    stack: Stack, make_account: AccountFactory, admin: httpx.Client, db: Session
) -> None:
    """The sweeper thread the worker runtime starts, end to end: nobody calls sweep here."""
    assert stack.database_url is not None
    account = make_account(credits=500)
    ghost = f"ghost-{new_request_id()}"
    request_id = _open_claimed(stack.database_url, account.id, 25, ghost)
    assert fresh(db, Account, account.id).reserved_credits == 25
    # Passes every ~5 s; a worker counts as dead after its heartbeat TTL (6 s) on two passes.
    wait_for(lambda: fresh(db, Request, request_id).status == "failed", 60, what="the sweeper")
    assert_swept(db, request_id, account.id, 500, f"worker {ghost} died")
    assert_books_straight(admin, account.id)

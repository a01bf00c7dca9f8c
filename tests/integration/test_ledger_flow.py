"""A request's money on the real stack: reservation, charge, release, balance and reconcile."""

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Account, LedgerEntry, Request
from db.reconcile import reconcile
from tests.support import STACK_MODEL

MODEL = STACK_MODEL


def test_request_writes_reserve_release_and_charge(http: httpx.Client, db: Session) -> None:
    body = {"model": MODEL, "max_tokens": 20, "messages": [{"role": "user", "content": "Hi"}]}
    response = http.post("/v1/messages", json=body)
    assert response.status_code == 200, response.text
    message = response.json()
    request_id = response.headers["request-id"]

    request = db.get(Request, request_id)
    assert request is not None
    assert request.status == "succeeded"
    assert request.message_id == message["id"]
    assert request.input_tokens == message["usage"]["input_tokens"]
    assert request.output_tokens == message["usage"]["output_tokens"]
    assert request.credits_charged == message["estimated_credits_used"]
    assert request.worker and request.started_at and request.finished_at

    entries = db.execute(
        select(LedgerEntry.kind, LedgerEntry.amount)
        .where(LedgerEntry.request_id == request_id)
        .order_by(LedgerEntry.id)
    ).all()
    reserved = request.credits_reserved
    assert entries == [
        ("reserve", reserved),
        ("release", -reserved),
        ("charge", -request.credits_charged),
    ]
    account = db.get(Account, request.account_id)
    assert account is not None
    assert account.reserved_credits == 0
    assert account.credit_balance == 10_000 - request.credits_charged
    assert message["remaining_credits"] == account.credit_balance
    report = reconcile(db)
    assert report.ok, report.problems()


def test_seed_pricing_example_holds_for_real_requests(http: httpx.Client, db: Session) -> None:
    """$5 per million tokens each way at $0.001 a credit: cost and credits follow from usage."""
    body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Hey"}]}
    message = http.post("/v1/messages", json=body).json()
    tokens = message["usage"]["input_tokens"] + message["usage"]["output_tokens"]
    assert message["estimated_cost_usd"] == tokens * 5 / 1_000_000
    assert message["estimated_credits_used"] == 1  # well under $0.001 rounds up to one credit

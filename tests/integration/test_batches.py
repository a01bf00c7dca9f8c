"""Message Batches through the official SDK's `client.messages.batches`, on the real stack."""

import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import anthropic
import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.anthropic.batches import new_batch_id
from db.batch_steps import lock_dispatch, take_pending
from db.batches import NewItem, create_batch
from db.models import BatchRequest, MessageBatch, Request
from db.session import get_sessionmaker
from infra.launcher.stack import Stack
from tests.conftest import AccountFactory, ApiAccount
from tests.integration.test_money import assert_books_straight
from tests.support import STACK_MODEL, wait_for

MODEL = STACK_MODEL


def item(custom_id: str, text: str = "Hello", max_tokens: int = 4, **params: object) -> dict:
    return {
        "custom_id": custom_id,
        "params": {
            "model": MODEL,
            "max_tokens": max_tokens,
            "temperature": 0,
            "messages": [{"role": "user", "content": text}],
            **params,
        },
    }


def wait_ended(client: anthropic.Anthropic, batch_id: str, timeout: float = 120) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.messages.batches.retrieve(batch_id)
        if batch.processing_status == "ended":
            return batch
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} did not end: {batch}")


def test_create_run_results_list_delete(
    client: anthropic.Anthropic, account: ApiAccount, admin: httpx.Client, db: Session
) -> None:
    requests = [item(f"ok-{i}", f"Say {i}") for i in range(6)]
    requests.append(item("bad-model", model="no-such-model"))
    requests.append(item("bad-field", temperature=5))
    created = client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    assert created.id.startswith("msgbatch_") and created.type == "message_batch"
    assert created.processing_status == "in_progress"
    assert created.request_counts.processing == 6 and created.request_counts.errored == 2
    assert created.results_url is None
    assert created.expires_at > created.created_at

    ended = wait_ended(client, created.id)
    assert ended.request_counts.succeeded == 6  # type: ignore[attr-defined]
    assert ended.request_counts.errored == 2  # type: ignore[attr-defined]
    assert ended.request_counts.processing == 0  # type: ignore[attr-defined]
    assert ended.ended_at is not None  # type: ignore[attr-defined]
    assert ended.results_url.endswith(f"/v1/messages/batches/{created.id}/results")  # type: ignore[attr-defined]

    results = {r.custom_id: r.result for r in client.messages.batches.results(created.id)}
    assert set(results) == {r["custom_id"] for r in requests}
    for i in range(6):
        result = results[f"ok-{i}"]
        assert result.type == "succeeded"
        message = result.message
        assert message.id.startswith("msg_") and message.model == MODEL
        assert message.content[0].type == "text"
        assert 1 <= message.usage.output_tokens <= 4 and message.usage.input_tokens > 0
    bad_model = results["bad-model"]
    assert bad_model.type == "errored" and bad_model.error.error.type == "not_found_error"
    bad_field = results["bad-field"]
    assert bad_field.type == "errored"
    assert bad_field.error.error.type == "invalid_request_error"
    assert "temperature" in bad_field.error.error.message

    # Requests carry their batch id and its price: half of the model's, to the nano-dollar.
    db.rollback()
    rows = db.scalars(select(Request).where(Request.batch_id == created.id)).all()
    assert len(rows) == 6 and all(r.status == "succeeded" for r in rows)
    for row in rows:
        assert row.batch_multiplier == Decimal("0.5")
        full = (row.input_tokens + row.output_tokens) * Decimal(5) / 1_000_000
        assert row.cost_usd == full / 2
    listed = client.messages.batches.list(limit=10)
    assert created.id in [b.id for b in listed.data]
    # Usage by batch: the batch's requests in one row, apart from interactive ones.
    client.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "x"}])
    report = admin.get(
        "/admin/usage", params={"group_by": "batch", "account_id": account.id}
    ).json()
    by_batch = {row["batch_id"]: row for row in report["data"]}
    assert by_batch[created.id]["requests"] == 6 and by_batch[None]["requests"] == 1
    assert Decimal(by_batch[created.id]["cost_usd"]) == sum(r.cost_usd for r in rows)

    deleted = client.messages.batches.delete(created.id)
    assert deleted.id == created.id and deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(created.id)
    assert_books_straight(admin, account.id)


def test_batch_problems_are_400s(client: anthropic.Anthropic, http: httpx.Client) -> None:
    for body, words in (
        ({"requests": []}, "at least one"),
        ({"requests": [item("a"), item("a")]}, "unique"),
        ({"requests": [item("not ok!")]}, "custom_id"),
        ({"requests": [{"custom_id": "x"}]}, "params"),
        ({}, "requests"),
    ):
        response = http.post("/v1/messages/batches", json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and words in error["message"]


def test_only_the_owner_sees_a_batch(
    client: anthropic.Anthropic,
    stack: Stack,
    make_account: AccountFactory,
    account: ApiAccount,
    admin: httpx.Client,
) -> None:
    created = client.messages.batches.create(requests=[item("one")])  # type: ignore[list-item]
    other = make_account()
    stranger = anthropic.Anthropic(base_url=stack.base_url, api_key=other.key, max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        stranger.messages.batches.retrieve(created.id)
    assert created.id not in [b.id for b in stranger.messages.batches.list().data]
    with pytest.raises(anthropic.NotFoundError):
        stranger.messages.batches.cancel(created.id)
    with pytest.raises(anthropic.NotFoundError):
        stranger.messages.batches.delete(created.id)
    wait_ended(client, created.id)
    assert_books_straight(admin, account.id)


def test_list_pages(client: anthropic.Anthropic, account: ApiAccount, admin: httpx.Client) -> None:
    ids = [client.messages.batches.create(requests=[item("x")]).id for _ in range(3)]  # type: ignore[list-item]
    first = client.messages.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more
    assert first.first_id == ids[2] and first.last_id == ids[1]
    second = client.messages.batches.list(limit=2, after_id=first.last_id)
    assert [b.id for b in second.data] == [ids[0]] and not second.has_more
    back = client.messages.batches.list(limit=2, before_id=ids[0])
    assert [b.id for b in back.data] == [ids[2], ids[1]]
    for batch_id in ids:
        wait_ended(client, batch_id)
    assert_books_straight(admin, account.id)


def test_cancel_ends_pending_requests_canceled(
    client: anthropic.Anthropic, account: ApiAccount, admin: httpx.Client, db: Session
) -> None:
    requests = [item(f"c{i}", "Tell me a long story", max_tokens=200) for i in range(150)]
    created = client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    with pytest.raises(anthropic.BadRequestError, match="only an ended batch"):
        client.messages.batches.delete(created.id)
    canceling = client.messages.batches.cancel(created.id)
    assert canceling.processing_status in ("canceling", "ended")
    assert canceling.cancel_initiated_at is not None
    ended = wait_ended(client, created.id)
    counts = ended.request_counts  # type: ignore[attr-defined]
    assert counts.canceled >= 1 and counts.processing == 0
    assert counts.canceled + counts.succeeded == 150
    kinds = {r.result.type for r in client.messages.batches.results(created.id)}
    assert "canceled" in kinds and kinds <= {"canceled", "succeeded"}
    db.rollback()
    never_run = db.scalars(
        select(BatchRequest).where(
            BatchRequest.batch_id == created.id, BatchRequest.request_id.is_(None)
        )
    ).all()
    assert all(r.status == "canceled" for r in never_run)
    assert_books_straight(admin, account.id)


def test_no_credit_ends_a_request_with_a_billing_error(
    stack: Stack, make_account: AccountFactory, admin: httpx.Client
) -> None:
    poor = make_account(credits=1)
    client = anthropic.Anthropic(base_url=stack.base_url, api_key=poor.key, max_retries=0)
    created = client.messages.batches.create(
        requests=[item("big", max_tokens=1000)]  # type: ignore[list-item]
    )
    wait_ended(client, created.id)
    (line,) = list(client.messages.batches.results(created.id))
    assert line.result.type == "errored"
    assert line.result.error.error.type == "billing_error"  # type: ignore[union-attr]
    assert_books_straight(admin, poor.id)


def test_expired_then_archived(
    client: anthropic.Anthropic, account: ApiAccount, db: Session, admin: httpx.Client
) -> None:
    """Requests not run by the batch's expiry end `expired`; results are dropped once the
    retention is over (both shortened here by writing the times the dispatcher reads)."""
    batch_id = new_batch_id()
    items = [NewItem(f"e{i}", MODEL, item(f"e{i}")["params"]) for i in range(3)]  # type: ignore[arg-type]
    past = datetime.now(UTC) - timedelta(seconds=1)
    db.rollback()
    create_batch(
        db, batch_id=batch_id, account_id=account.id, api_key_id=None, items=items, expires_at=past
    )
    db.commit()
    ended = wait_ended(client, batch_id)
    assert ended.request_counts.expired == 3  # type: ignore[attr-defined]
    results = list(client.messages.batches.results(batch_id))
    assert {r.result.type for r in results} == {"expired"}
    db.execute(
        update(MessageBatch)
        .where(MessageBatch.id == batch_id)
        .values(ended_at=datetime.now(UTC) - timedelta(days=30))
    )
    db.commit()
    archived = wait_for(
        lambda: client.messages.batches.retrieve(batch_id).archived_at is not None, timeout=30
    )
    assert archived
    batch = client.messages.batches.retrieve(batch_id)
    assert batch.results_url is None and batch.request_counts.expired == 3
    assert_books_straight(admin, account.id)


def test_params_holding_nul_characters_are_stored(
    client: anthropic.Anthropic, account: ApiAccount, admin: httpx.Client
) -> None:
    """jsonb refuses \\u0000; the params are kept as JSON text, so such a request still runs."""
    odd = item("nul", "a\u0000b")
    odd["params"]["\u0000"] = None  # type: ignore[index]
    created = client.messages.batches.create(requests=[odd])  # type: ignore[list-item]
    wait_ended(client, created.id)
    (line,) = list(client.messages.batches.results(created.id))
    assert line.custom_id == "nul" and line.result.type == "succeeded"
    assert_books_straight(admin, account.id)


def test_dispatchers_of_several_replicas_never_take_the_same_request(
    stack: Stack, account: ApiAccount, client: anthropic.Anthropic, admin: httpx.Client
) -> None:
    """One dispatcher at a time counts and fills what is in flight (the advisory lock), and
    rows one transaction holds are skipped by another, never waited for."""
    assert stack.database_url is not None
    sessions = get_sessionmaker(stack.database_url)
    with sessions() as first, sessions() as second:
        assert lock_dispatch(first)  # the stack's own dispatcher now skips its passes too
        assert not lock_dispatch(second)
        batch_id = new_batch_id()
        with sessions() as creating:
            items = [
                NewItem(f"d{i}", MODEL, item(f"d{i}", max_tokens=2)["params"]) for i in range(6)
            ]  # type: ignore[arg-type]
            create_batch(
                creating,
                batch_id=batch_id,
                account_id=account.id,
                api_key_id=None,
                items=items,
                expires_at=datetime.now(UTC) + timedelta(hours=1),
            )
            creating.commit()
        taken = {(p.batch_id, p.position) for p in take_pending(first, 10_000)}
        also = {(p.batch_id, p.position) for p in take_pending(second, 10_000)}
        ours = {(batch_id, i) for i in range(6)}
        assert ours <= taken and not (also & taken)
        first.rollback()
        second.rollback()
    wait_ended(client, batch_id)
    assert {r.result.type for r in client.messages.batches.results(batch_id)} == {"succeeded"}
    assert_books_straight(admin, account.id)

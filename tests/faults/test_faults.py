"""Fault injection on real processes: dead workers, no workers, full queues, Redis and Postgres
restarts, SIGTERM. After each: every request terminal, holds released, the ledger reconciles.

One private stack for this module (two workers, short leases and timeouts), so the killing
never disturbs the session's stack. The tests run in file order; each leaves the stack whole.
"""

import json
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import httpx2
import pytest
import redis
from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from contract.jobs import TASK_GENERATE, GenerateJob, SamplingParams
from contract.queueing import interactive_lanes
from db.models import Account, BatchRequest, Request
from db.reconcile import reconcile
from db.session import get_sessionmaker
from infra.bench.observe import descendants
from infra.launcher.stack import Stack
from tests.support import STACK_MODEL, sse_events, wait_for

MODEL = STACK_MODEL
LANES = interactive_lanes(MODEL, 4)  # ABL_QUEUE_LANES
LONG = {
    "model": MODEL,
    "max_tokens": 1000,
    "temperature": 1.0,
    "stream": True,
    "messages": [{"role": "user", "content": "Write a very long story."}],
}
SHORT = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
QUEUE_TIMEOUT_S = 8


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {
        "ABL_WORKER_MODELS": STACK_MODEL,
        "ABL_WORKER_LEASE_S": "3",
        "ABL_HEARTBEAT_S": "1",
        "ABL_QUEUE_TIMEOUT_S": str(QUEUE_TIMEOUT_S),
        "ABL_LIVENESS_CHECK_S": "0.5",
        "ABL_SHUTDOWN_GRACE_S": "1",
        "ABL_MAX_QUEUED_PER_MODEL": "3",
        "ABL_JWT_SECRET": secrets.token_urlsafe(32),
    }
    data_dir: Path = tmp_path_factory.mktemp("abl-faults")
    with Stack(data_dir, workers=2, env=env) as stack:
        yield stack


@pytest.fixture(scope="module")
def key(fault_stack: Stack) -> str:
    admin = {"Authorization": f"Bearer {fault_stack.admin_token}"}
    account = httpx.post(
        f"{fault_stack.base_url}/admin/accounts",
        json={"name": "faults", "credits": 1_000_000},
        headers=admin,
    ).json()
    created = httpx.post(
        f"{fault_stack.base_url}/admin/accounts/{account['id']}/keys", json={}, headers=admin
    )
    return str(created.json()["key"])


@pytest.fixture
def db(fault_stack: Stack) -> Iterator[Session]:
    assert fault_stack.database_url
    with get_sessionmaker(fault_stack.database_url)() as session:
        yield session


def books_are_straight(stack: Stack) -> None:
    """No request left open, no hold left, and every account reconciles."""
    assert stack.database_url

    def settled() -> bool:
        with get_sessionmaker(stack.database_url)() as session:
            open_ = session.execute(
                select(func.count()).where(Request.status.in_(("queued", "running")))
            ).scalar_one()
            held = session.execute(select(func.sum(Account.reserved_credits))).scalar_one()
            return open_ == 0 and not held

    wait_for(settled, timeout=30)
    with get_sessionmaker(stack.database_url)() as session:
        report = reconcile(session)
        assert report.ok, report.problems()


def request_row(stack: Stack, request_id: str) -> Request:
    assert stack.database_url
    with get_sessionmaker(stack.database_url)() as session:
        row = session.get(Request, request_id)
        assert row is not None
        return row


def start_long_stream(stack: Stack, key: str) -> tuple[httpx.Client, httpx.Response, Iterator]:
    client = httpx.Client(base_url=stack.base_url, headers={"x-api-key": key}, timeout=60)
    response = client.send(client.build_request("POST", "/v1/messages", json=LONG), stream=True)
    assert response.status_code == 200, response.read()
    events = sse_events(response.iter_lines())
    for name, _ in events:
        if name == "content_block_delta":
            break
    return client, response, events


def ok_request(stack: Stack, key: str) -> httpx.Response:
    response = httpx.post(
        f"{stack.base_url}/v1/messages", json=SHORT, headers={"x-api-key": key}, timeout=60
    )
    assert response.status_code == 200, response.text
    return response


def test_worker_killed_mid_stream(fault_stack: Stack, key: str) -> None:
    client, response, events = start_long_stream(fault_stack, key)
    request_id = response.headers["request-id"]
    worker = request_row(fault_stack, request_id).worker
    assert worker is not None
    index = int(worker.split("-")[1])
    fault_stack.kill_worker(index, signal.SIGKILL)
    killed_at = time.monotonic()
    rest = [name for name, _ in events]
    elapsed = time.monotonic() - killed_at
    response.close()
    client.close()
    assert rest[-1] == "error" and "message_stop" not in rest
    assert elapsed < 30
    row = request_row(fault_stack, request_id)
    assert row.status == "failed" and row.credits_charged == 0
    # The other worker keeps serving while this one is down.
    ok_request(fault_stack, key)
    # A redelivered task for the failed request is refused by the claim: nothing runs twice.
    celery = Celery(broker=fault_stack.redis_url)
    job = GenerateJob(
        request_id=request_id,
        model=MODEL,
        input_ids=[1, 2, 3],
        sampling=SamplingParams(max_tokens=4),
    )
    celery.send_task(TASK_GENERATE, args=[job.model_dump()], queue=MODEL)
    time.sleep(2)
    again = request_row(fault_stack, request_id)
    assert (again.status, again.worker, again.output_tokens) == ("failed", worker, 0)
    fault_stack.start_worker(index)
    books_are_straight(fault_stack)


def test_worker_killed_mid_batch(fault_stack: Stack, key: str) -> None:
    """Batch requests whose worker died run again on the other: every one ends succeeded,
    none is charged twice, the books reconcile."""
    client = anthropic.Anthropic(base_url=fault_stack.base_url, api_key=key, max_retries=0)
    params = {"model": MODEL, "max_tokens": 32, "messages": [{"role": "user", "content": "Go"}]}
    requests = [{"custom_id": f"r{i}", "params": params} for i in range(24)]
    batch = client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    assert fault_stack.database_url

    def running_worker() -> str | None:
        with get_sessionmaker(fault_stack.database_url)() as session:
            return session.scalars(
                select(Request.worker).where(
                    Request.batch_id == batch.id, Request.status == "running"
                )
            ).first()

    worker = wait_for(running_worker, timeout=60, interval=0.05)
    index = int(worker.split("-")[1])
    fault_stack.kill_worker(index, signal.SIGKILL)
    deadline = time.monotonic() + 300
    while client.messages.batches.retrieve(batch.id).processing_status != "ended":
        assert time.monotonic() < deadline, _batch_state(fault_stack, batch.id)
        time.sleep(0.5)
    results = list(client.messages.batches.results(batch.id))
    assert sorted(r.custom_id for r in results) == sorted(f"r{i}" for i in range(24))
    assert {r.result.type for r in results} == {"succeeded"}
    with get_sessionmaker(fault_stack.database_url)() as session:
        rows = session.scalars(select(Request).where(Request.batch_id == batch.id)).all()
        items = session.scalars(select(BatchRequest).where(BatchRequest.batch_id == batch.id)).all()
    by_id = {r.id: r for r in rows}
    # Each request was answered by exactly one succeeded run, the one its result came from;
    # the dead worker's runs (and jobs it took but never claimed: no worker) failed and were
    # charged nothing.
    assert all(by_id[i.request_id].status == "succeeded" for i in items if i.request_id)
    assert sum(r.status == "succeeded" for r in rows) == 24
    failed = [r for r in rows if r.status == "failed"]
    assert failed and all(r.worker in (worker, None) and r.credits_charged == 0 for r in failed)
    assert any(r.worker == worker for r in failed)
    assert max(i.attempts for i in items) >= 1
    fault_stack.start_worker(index)
    fault_stack.wait_ready(min_workers=2)
    books_are_straight(fault_stack)


def _batch_state(stack: Stack, batch_id: str) -> str:
    assert stack.database_url
    with get_sessionmaker(stack.database_url)() as session:
        items = session.execute(
            select(BatchRequest.status, func.count())
            .where(BatchRequest.batch_id == batch_id)
            .group_by(BatchRequest.status)
        ).all()
        requests = session.execute(
            select(Request.status, Request.worker, Request.error, func.count())
            .where(Request.batch_id == batch_id)
            .group_by(Request.status, Request.worker, Request.error)
        ).all()
    return f"the batch did not end: items {items}, requests {requests}"


def _stop_all_workers(stack: Stack) -> None:
    for i in range(len(stack.workers)):
        if stack.workers[i].alive:
            stack.kill_worker(i, signal.SIGTERM)


def _restart_workers(stack: Stack) -> None:
    for i in range(len(stack.workers)):
        if not stack.workers[i].alive:
            stack.start_worker(i)
    stack.wait_ready()


def test_no_worker_means_529_and_released_hold(fault_stack: Stack, key: str) -> None:
    _stop_all_workers(fault_stack)
    r = redis.Redis.from_url(fault_stack.redis_url or "")
    wait_for(lambda: not r.keys("abl:worker:*"), timeout=15)
    started = time.monotonic()
    response = httpx.post(
        f"{fault_stack.base_url}/v1/messages", json=SHORT, headers={"x-api-key": key}, timeout=60
    )
    waited = time.monotonic() - started
    assert response.status_code == 529, response.text
    assert response.json()["error"]["type"] == "overloaded_error"
    assert int(response.headers["retry-after"]) >= 1
    assert QUEUE_TIMEOUT_S - 0.5 <= waited < QUEUE_TIMEOUT_S + 10
    row = request_row(fault_stack, response.headers["request-id"])
    assert row.status == "failed" and row.credits_charged == 0
    books_are_straight(fault_stack)


def jobs_waiting(r: redis.Redis) -> int:
    """Jobs waiting in every lane of the model's queue."""
    return sum(r.llen(lane) for lane in LANES)


def test_full_queue_is_refused_at_once(fault_stack: Stack, key: str) -> None:
    """Workers still down: three requests fill the queue, the fourth gets 529 immediately."""
    r = redis.Redis.from_url(fault_stack.redis_url or "")
    r.delete(*LANES)  # the jobs left over from the previous test
    statuses: list[int] = []

    def send() -> None:
        statuses.append(
            httpx.post(
                f"{fault_stack.base_url}/v1/messages",
                json=SHORT,
                headers={"x-api-key": key},
                timeout=60,
            ).status_code
        )

    waiting = [threading.Thread(target=send) for _ in range(3)]
    for thread in waiting:
        thread.start()
    wait_for(lambda: jobs_waiting(r) >= 3, timeout=10)
    started = time.monotonic()
    refused = httpx.post(
        f"{fault_stack.base_url}/v1/messages", json=SHORT, headers={"x-api-key": key}, timeout=60
    )
    assert refused.status_code == 529 and time.monotonic() - started < QUEUE_TIMEOUT_S / 2
    for thread in waiting:
        thread.join()
    assert statuses == [529, 529, 529]
    # Workers come back, find the queued jobs already settled, and skip them.
    _restart_workers(fault_stack)
    wait_for(lambda: jobs_waiting(r) == 0, timeout=30)
    ok_request(fault_stack, key)
    books_are_straight(fault_stack)


def test_a_stream_no_worker_took_is_a_529_that_the_sdk_retries(
    fault_stack: Stack, key: str
) -> None:
    """Nothing is sent before a worker claims the request: a stream that times out in the queue
    gets a real 529 with retry-after (not a 200 and an error event, which no SDK retries), and
    the SDK's retry succeeds once a worker is back."""
    _stop_all_workers(fault_stack)
    r = redis.Redis.from_url(fault_stack.redis_url or "")
    wait_for(lambda: not r.keys("abl:worker:*"), timeout=15)
    r.delete(MODEL)
    body = {**SHORT, "stream": True}
    headers = {"x-api-key": key}
    started = time.monotonic()
    with httpx.stream(
        "POST", f"{fault_stack.base_url}/v1/messages", json=body, headers=headers, timeout=60
    ) as response:
        waited = time.monotonic() - started
        error = json.loads(response.read())
    assert response.status_code == 529, error
    assert error["error"]["type"] == "overloaded_error"
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers.get("x-should-retry") != "false"
    assert waited >= QUEUE_TIMEOUT_S - 0.5  # the status line waited for a worker, in vain
    row = request_row(fault_stack, response.headers["request-id"])
    assert row.status == "failed" and row.credits_charged == 0

    statuses: list[int] = []

    def workers_back_on_the_first_529(answer: httpx2.Response) -> None:
        statuses.append(answer.status_code)
        if statuses == [529]:
            for i, worker in enumerate(fault_stack.workers):
                if not worker.alive:
                    fault_stack.start_worker(i)

    sdk = anthropic.Anthropic(
        base_url=fault_stack.base_url,
        api_key=key,
        max_retries=8,
        http_client=httpx2.Client(
            event_hooks={"response": [workers_back_on_the_first_529]}, timeout=60
        ),
    )
    stream = sdk.messages.create(
        model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    events = [event.type for event in stream]
    assert statuses[0] == 529 and statuses[-1] == 200
    assert set(statuses[:-1]) == {529}  # every try before the last was a retryable 529
    assert events[0] == "message_start" and events[-1] == "message_stop"
    fault_stack.wait_ready(min_workers=len(fault_stack.workers))
    books_are_straight(fault_stack)


def test_worker_sigterm_ends_streams_with_an_error(fault_stack: Stack, key: str) -> None:
    client, response, events = start_long_stream(fault_stack, key)
    request_id = response.headers["request-id"]
    worker = request_row(fault_stack, request_id).worker
    assert worker is not None
    index = int(worker.split("-")[1])
    fault_stack.kill_worker(index, signal.SIGTERM, timeout=None)
    rest = list(events)
    response.close()
    client.close()
    assert rest[-1][0] == "error"
    assert rest[-1][1]["error"]["type"] == "overloaded_error"
    assert fault_stack.workers[index].wait(30) is not None  # it exits, within the grace
    assert request_row(fault_stack, request_id).status == "failed"
    _restart_workers(fault_stack)
    books_are_straight(fault_stack)


def test_engine_process_killed_mid_stream(fault_stack: Stack, key: str) -> None:
    """The engine runs in a child of the worker: if it dies, its requests fail with a typed
    error and nothing charged, and the worker exits rather than take jobs it cannot run."""
    client, response, events = start_long_stream(fault_stack, key)
    request_id = response.headers["request-id"]
    worker = request_row(fault_stack, request_id).worker
    assert worker is not None
    index = int(worker.split("-")[1])
    worker_pid = fault_stack.workers[index].pid
    assert worker_pid is not None
    (engine_pid,) = descendants(worker_pid)
    os.kill(engine_pid, signal.SIGKILL)
    rest = list(events)
    response.close()
    client.close()
    assert rest[-1][0] == "error"
    assert rest[-1][1]["error"]["type"] == "api_error"
    assert fault_stack.workers[index].wait(30) is not None
    row = request_row(fault_stack, request_id)
    assert row.status == "failed" and row.credits_charged == 0
    _restart_workers(fault_stack)
    ok_request(fault_stack, key)
    books_are_straight(fault_stack)


def test_redis_restart(fault_stack: Stack, key: str) -> None:
    redis_service = fault_stack.redis_service
    assert redis_service is not None
    client, response, events = start_long_stream(fault_stack, key)
    request_id = response.headers["request-id"]
    redis_service.stop()
    started = time.monotonic()
    rest = list(events)
    response.close()
    client.close()
    assert rest[-1][0] == "error" and time.monotonic() - started < 15
    started = time.monotonic()
    down = httpx.post(
        f"{fault_stack.base_url}/v1/messages", json=SHORT, headers={"x-api-key": key}, timeout=60
    )
    assert down.status_code >= 500 and down.json()["type"] == "error"
    assert time.monotonic() - started < 10
    redis_service.start()
    fault_stack.wait_ready(timeout=60)
    wait_for(lambda: request_row(fault_stack, request_id).status == "failed", timeout=30)
    ok_request(fault_stack, key)
    books_are_straight(fault_stack)


def test_postgres_restart(fault_stack: Stack, key: str) -> None:
    postgres = fault_stack.postgres_service
    assert postgres is not None
    postgres.stop()
    started = time.monotonic()
    down = httpx.post(
        f"{fault_stack.base_url}/v1/messages", json=SHORT, headers={"x-api-key": key}, timeout=60
    )
    assert down.status_code == 500 and down.json()["error"]["type"] == "api_error"
    assert time.monotonic() - started < 10
    postgres.start()
    fault_stack.wait_ready(timeout=60)
    ok_request(fault_stack, key)
    books_are_straight(fault_stack)


def test_api_sigterm_ends_open_streams_with_an_error(fault_stack: Stack, key: str) -> None:
    client, response, events = start_long_stream(fault_stack, key)
    assert fault_stack.api is not None
    fault_stack.api.send_signal(signal.SIGTERM)
    rest = list(events)
    response.close()
    client.close()
    assert rest[-1][0] == "error"
    assert fault_stack.api.wait(30) is not None
    books_are_straight(fault_stack)


def test_a_batch_survives_restarts_of_the_api_and_the_workers(fault_stack: Stack, key: str) -> None:
    """Everything a batch is lives in Postgres: the API (its dispatcher) and both workers are
    SIGKILLed mid-batch and started again, and every request still ends succeeded, once."""
    assert fault_stack.api is not None and fault_stack.database_url
    if not fault_stack.api.alive:  # the test before this one stops it
        fault_stack.api.start()
    fault_stack.wait_ready(min_workers=2)
    client = anthropic.Anthropic(base_url=fault_stack.base_url, api_key=key, max_retries=2)
    params = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "Go"}]}
    requests = [{"custom_id": f"s{i}", "params": params} for i in range(120)]
    batch = client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    wait_for(
        lambda: client.messages.batches.retrieve(batch.id).request_counts.succeeded > 0,
        timeout=60,
        interval=0.1,
    )
    fault_stack.api.send_signal(signal.SIGKILL)
    fault_stack.api.wait(30)
    for i in range(len(fault_stack.workers)):
        fault_stack.kill_worker(i, signal.SIGKILL)
    with get_sessionmaker(fault_stack.database_url)() as session:
        open_ = session.scalar(
            select(func.count()).where(
                BatchRequest.batch_id == batch.id,
                BatchRequest.status.in_(("pending", "dispatched")),
            )
        )
    assert open_, "the batch ended before the processes were killed"
    fault_stack.api.start()
    _restart_workers(fault_stack)
    deadline = time.monotonic() + 300
    while client.messages.batches.retrieve(batch.id).processing_status != "ended":
        assert time.monotonic() < deadline, _batch_state(fault_stack, batch.id)
        time.sleep(0.5)
    results = list(client.messages.batches.results(batch.id))
    assert len(results) == 120 and {r.result.type for r in results} == {"succeeded"}
    with get_sessionmaker(fault_stack.database_url)() as session:
        succeeded = session.scalar(
            select(func.count()).where(Request.batch_id == batch.id, Request.status == "succeeded")
        )
    assert succeeded == 120
    books_are_straight(fault_stack)

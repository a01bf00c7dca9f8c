"""The worker runtime behind the engine seam, with the `EchoBackend` in this process: real
Postgres and Redis (the session stack's), no model. Jobs go in through `dispatch` as Celery's
consumer hands them over; the tests read what a client would (the request's events) and what the
broker would (acknowledgements and requeues)."""

import json
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from api.ids import new_message_id, new_request_id
from contract.events import ClaimedEvent, DoneEvent, WorkerEvent, parse_event
from contract.jobs import GenerateJob, SamplingParams
from contract.keys import cancel_key, events_channel
from db.ledger import NewRequest, open_request
from db.models import LedgerEntry, Request
from db.pricing import Prices
from db.session import in_autocommit, transaction
from infra.launcher.stack import Stack
from tests.conftest import AccountFactory
from tests.support import wait_for
from workers.backends.echo import EchoBackend
from workers.backends.seam import BackendOptions
from workers.runtime import Delivery, WorkerRuntime
from workers.settings import WorkerSettings

pytestmark = pytest.mark.integration

MODEL = "echo-model"


class Broker:
    """What the broker learns about each job: acknowledged or requeued, and how often."""

    def __init__(self) -> None:
        self.acks: dict[str, int] = {}
        self.requeues: list[str] = []
        self._lock = threading.Lock()

    def delivery(self, request_id: str) -> Delivery:
        def ack() -> None:
            with self._lock:
                self.acks[request_id] = self.acks.get(request_id, 0) + 1

        return Delivery(ack=ack, requeue=lambda: self.requeues.append(request_id))


@pytest.fixture(scope="module")
def runtime(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerRuntime]:
    folder = tmp_path_factory.mktemp("echo-catalogue")
    catalogue = folder / "models.json"
    entry = {
        "id": MODEL,
        "display_name": "Echo",
        "folder": str(folder),
        "context_window": 4096,
        "max_output_tokens": 512,
        "input_price_per_mtok": "5",
        "output_price_per_mtok": "5",
        "queue": MODEL,
        "backend": "echo",
    }
    catalogue.write_text(json.dumps([entry]))
    settings = WorkerSettings(
        database_url=stack.database_url,
        redis_url=stack.redis_url,
        models_file=Path(catalogue),
        worker_models=MODEL,
        worker_name="runtime-test",
        metrics_port=0,
        sweep_interval_s=0,
        delta_interval_ms=0,
        request_threads=4,
    )
    # Slow steps: 300 requests of 100 tokens all stay in flight together for a few seconds.
    engine = EchoBackend(BackendOptions(max_batch=512), step_s=0.04)
    running = WorkerRuntime(settings, engines={MODEL: engine})
    running.start()
    yield running
    running.stop()


def new_job(stack: Stack, account_id: str, prompt: list[int], max_tokens: int = 64) -> GenerateJob:
    request_id = new_request_id()
    opened = NewRequest(
        id=request_id,
        message_id=new_message_id(),
        account_id=account_id,
        api_key_id=None,
        model=MODEL,
        stream=True,
        max_tokens=max_tokens,
        input_tokens=len(prompt),
        credits_reserved=1,
        prices=Prices(Decimal(5), Decimal(5), Decimal("0.001")),
    )
    assert stack.database_url is not None
    in_autocommit(stack.database_url, lambda conn: open_request(conn, opened))
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0)
    return GenerateJob(request_id=request_id, model=MODEL, input_ids=prompt, sampling=sampling)


class Listener:
    """Every event published for some requests, subscribed before they are dispatched."""

    def __init__(self, redis_url: str, request_ids: list[str]) -> None:
        self.events: dict[str, list[WorkerEvent]] = {r: [] for r in request_ids}
        self._pubsub = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(*(events_channel(r) for r in request_ids))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for message in self._pubsub.listen():
                event = parse_event(message["data"])
                request_id = message["channel"].decode().split(":")[2]
                self.events[request_id].append(event)
        except redis.ConnectionError:
            return  # the stack stopped

    def ended(self) -> bool:
        return all(e and e[-1].type in ("done", "error") for e in self.events.values())

    def text(self, request_id: str) -> str:
        return "".join(e.text for e in self.events[request_id] if e.type == "delta")


def test_hundreds_of_requests_in_flight_on_a_few_threads(
    stack: Stack, make_account: AccountFactory, runtime: WorkerRuntime
) -> None:
    account = make_account(credits=10_000)
    jobs = [new_job(stack, account.id, [i, i + 1] * 50, max_tokens=100) for i in range(300)]
    assert stack.redis_url is not None
    listener = Listener(stack.redis_url, [j.request_id for j in jobs])
    broker = Broker()
    threads_before = threading.active_count()
    for job in jobs:
        runtime.dispatch(job, broker.delivery(job.request_id))
    wait_for(lambda: runtime.engines[MODEL].stats.active >= 250, timeout=30, what="250 at once")
    # The request threads, the listener and the pump: nothing grows with the requests.
    assert threading.active_count() <= threads_before + runtime.settings.request_threads
    wait_for(listener.ended, timeout=60, what="every request to end")
    # Each message is acknowledged once its request is settled and its end published.
    wait_for(lambda: len(broker.acks) == len(jobs), timeout=10, what="every acknowledgement")
    assert broker.acks == {j.request_id: 1 for j in jobs}
    for job in jobs:
        done = listener.events[job.request_id][-1]
        assert isinstance(done, DoneEvent) and done.status == "succeeded"
        assert done.stop_reason == "end_turn" and done.output_tokens == 100
        kinds = [e.type for e in listener.events[job.request_id]]
        assert kinds[:2] == ["claimed", "block_start"] and kinds[-2:] == ["block_stop", "done"]
        assert set(kinds[2:-2]) == {"delta"}
        assert [e.index for e in listener.events[job.request_id]] == list(
            range(len(listener.events[job.request_id]))
        )
        assert listener.text(job.request_id) == "".join(f"{t} " for t in job.input_ids)
    assert stack.database_url is not None
    with transaction(stack.database_url) as session:
        statuses = session.scalars(
            select(Request.status).where(Request.id.in_([j.request_id for j in jobs]))
        ).all()
    assert set(statuses) == {"succeeded"}
    assert runtime.drain(5)


def test_a_redelivered_job_runs_once_and_both_messages_are_acknowledged(
    stack: Stack, make_account: AccountFactory, runtime: WorkerRuntime
) -> None:
    account = make_account(credits=100)
    job = new_job(stack, account.id, [7, 8, 9], max_tokens=3)
    assert stack.redis_url is not None and stack.database_url is not None
    listener = Listener(stack.redis_url, [job.request_id])
    broker = Broker()
    runtime.dispatch(job, broker.delivery(job.request_id))
    wait_for(lambda: job.request_id in runtime._active or broker.acks, timeout=10)
    runtime.dispatch(job, broker.delivery(job.request_id))  # the broker redelivers it
    wait_for(lambda: broker.acks.get(job.request_id) == 2, timeout=30, what="both acks")
    wait_for(listener.ended, timeout=10)
    assert listener.text(job.request_id) == "7 8 9 "
    assert sum(e.type == "done" for e in listener.events[job.request_id]) == 1
    with transaction(stack.database_url) as session:
        kinds = session.scalars(
            select(LedgerEntry.kind).where(LedgerEntry.request_id == job.request_id)
        ).all()
    assert sorted(kinds) == ["charge", "release", "reserve"]


def test_a_request_cancelled_before_its_claim_is_settled_without_running(
    stack: Stack, make_account: AccountFactory, runtime: WorkerRuntime
) -> None:
    account = make_account(credits=100)
    job = new_job(stack, account.id, [1, 2, 3], max_tokens=3)
    assert stack.redis_url is not None and stack.database_url is not None
    redis.Redis.from_url(stack.redis_url).set(cancel_key(job.request_id), b"1", ex=60)
    listener = Listener(stack.redis_url, [job.request_id])
    broker = Broker()
    runtime.dispatch(job, broker.delivery(job.request_id))
    wait_for(listener.ended, timeout=30)
    claimed, done = listener.events[job.request_id]
    assert isinstance(claimed, ClaimedEvent) and claimed.worker == "runtime-test"
    assert isinstance(done, DoneEvent) and done.status == "cancelled"
    assert done.output_tokens == 0
    wait_for(lambda: broker.acks == {job.request_id: 1}, timeout=10, what="the acknowledgement")


def test_a_draining_worker_puts_new_jobs_back_and_waits_for_its_running_ones(
    stack: Stack, make_account: AccountFactory, runtime: WorkerRuntime
) -> None:
    """Runs last in this module: the runtime takes no job after it."""
    account = make_account(credits=100)
    running = new_job(stack, account.id, list(range(1, 200)), max_tokens=150)
    late = new_job(stack, account.id, [1, 2], max_tokens=2)
    broker = Broker()
    runtime.dispatch(running, broker.delivery(running.request_id))
    wait_for(lambda: running.request_id in runtime._active, timeout=10)
    runtime.begin_shutdown(grace_s=60)
    runtime.dispatch(late, broker.delivery(late.request_id))
    assert broker.requeues == [late.request_id]
    assert runtime.drain(30)
    assert broker.acks == {running.request_id: 1}

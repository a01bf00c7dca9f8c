"""A request is charged the prices in force when it was admitted, whoever settles it.

The worker runtime runs in this process with the `EchoBackend` and a catalogue whose prices
differ from the ones the request was admitted at (what a rolling config change produces);
real Postgres and Redis. Admission is `open_request`, the statement the API runs.
"""

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import select

from api.ids import new_message_id, new_request_id
from contract.events import DoneEvent
from contract.jobs import GenerateJob, SamplingParams
from db.ledger import NewRequest, Outcome, open_request, settle_request
from db.models import Account, LedgerEntry, Request
from db.pricing import Prices
from db.session import in_autocommit, transaction
from infra.launcher.stack import Stack
from tests.conftest import AccountFactory
from tests.integration.test_runtime import Broker, Listener
from tests.support import wait_for
from workers.backends.echo import EchoBackend
from workers.runtime import WorkerRuntime
from workers.settings import WorkerSettings

pytestmark = pytest.mark.integration

MODEL = "echo-priced"
# What the API admitted at: $5 per million tokens each way, one credit per micro-dollar.
ADMITTED = Prices(Decimal(5), Decimal(5), Decimal("0.000001"))
PROMPT = list(range(1, 101))  # echoed back: 100 output tokens
MAX_TOKENS = 150


def _catalogue(folder: Path, input_price: str, output_price: str) -> Path:
    entry = {
        "id": MODEL,
        "display_name": "Echo, priced",
        "folder": str(folder),
        "context_window": 4096,
        "max_output_tokens": 512,
        "input_price_per_mtok": input_price,
        "output_price_per_mtok": output_price,
        "queue": MODEL,
        "backend": "echo",
    }
    path = folder / "models.json"
    path.write_text(json.dumps([entry]))
    return path


@pytest.fixture(
    params=[
        # Cheaper than admission: the worker would charge 16 credits instead of 1000.
        ("7", "9", "0.0001"),
        # Dearer: the worker's charge (10,000) would exceed the hold (1,250).
        ("50", "50", "0.000001"),
    ],
    ids=["cheaper-worker", "dearer-worker"],
)
def repriced_runtime(
    request: pytest.FixtureRequest, stack: Stack, tmp_path: Path
) -> Iterator[WorkerRuntime]:
    input_price, output_price, credit_price = request.param
    settings = WorkerSettings(
        database_url=stack.database_url,
        redis_url=stack.redis_url,
        models_file=_catalogue(tmp_path, input_price, output_price),
        credit_price_usd=credit_price,
        worker_models=MODEL,
        worker_name=f"repriced-{request.node.callspec.id}",
        metrics_port=0,
        sweep_interval_s=0,
        delta_interval_ms=0,
    )
    runtime = WorkerRuntime(settings, engines={MODEL: EchoBackend()})
    runtime.start()
    yield runtime
    runtime.stop()


def _admit(database_url: str, account_id: str) -> GenerateJob:
    request_id = new_request_id()
    new = NewRequest(
        id=request_id,
        message_id=new_message_id(),
        account_id=account_id,
        api_key_id=None,
        model=MODEL,
        stream=True,
        max_tokens=MAX_TOKENS,
        input_tokens=len(PROMPT),
        credits_reserved=ADMITTED.credits(len(PROMPT), MAX_TOKENS),
        prices=ADMITTED,
    )
    in_autocommit(database_url, lambda conn: open_request(conn, new))
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    return GenerateJob(request_id=request_id, model=MODEL, input_ids=PROMPT, sampling=sampling)


def test_a_worker_with_other_prices_charges_the_admission_price(
    stack: Stack, make_account: AccountFactory, repriced_runtime: WorkerRuntime
) -> None:
    assert stack.database_url is not None and stack.redis_url is not None
    account = make_account(credits=10_000)
    job = _admit(stack.database_url, account.id)
    listener = Listener(stack.redis_url, [job.request_id])
    broker = Broker()
    repriced_runtime.dispatch(job, broker.delivery(job.request_id))
    wait_for(listener.ended, timeout=30, what="the request to end")
    done = listener.events[job.request_id][-1]
    # (100 + 100) tokens at $5 per million = $0.001 = 1000 credits; the hold was 1250.
    assert isinstance(done, DoneEvent), done
    assert (done.status, done.output_tokens, done.credits_charged) == ("succeeded", 100, 1000)
    assert Decimal(done.cost_usd) == Decimal("0.001")
    assert done.remaining_credits == 9000
    with transaction(stack.database_url) as session:
        row = session.get(Request, job.request_id)
        assert row is not None
        assert (row.credits_reserved, row.credits_charged) == (1250, 1000)
        assert (row.input_price_per_mtok, row.output_price_per_mtok) == (5, 5)
        assert row.credit_price_usd == Decimal("0.000001")
        charge = session.scalars(
            select(LedgerEntry.amount).where(
                LedgerEntry.request_id == job.request_id, LedgerEntry.kind == "charge"
            )
        ).one()
        assert charge == -1000


def test_a_charge_never_exceeds_the_hold(stack: Stack, make_account: AccountFactory) -> None:
    """A settler reporting more output than max_tokens (a bug) still settles the request,
    charged exactly its hold; cost_usd keeps what the tokens cost."""
    assert stack.database_url is not None
    account = make_account(credits=10_000)
    job = _admit(stack.database_url, account.id)
    outcome = Outcome("succeeded", 1000, billable=True)
    with transaction(stack.database_url) as session:
        settlement = settle_request(session, job.request_id, outcome)
    assert (settlement.status, settlement.credits_charged) == ("succeeded", 1250)
    assert settlement.cost_usd == Decimal("0.0055")  # 1100 tokens at $5 per million
    with transaction(stack.database_url) as session:
        balance = session.get(Account, account.id)
        assert balance is not None
        assert (balance.credit_balance, balance.reserved_credits) == (10_000 - 1250, 0)

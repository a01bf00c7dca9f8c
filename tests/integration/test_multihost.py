"""Horizontal scaling: workers on three "hosts" (network namespaces) against one Postgres and Redis.

Postgres and Redis listen only on this machine's address on a private bridge; each worker runs
in its own namespace behind its own link into that bridge (tests/netns.py), so it reaches them
over the network exactly as a worker on another machine would. Requests spread over all three;
unplugging one host's link fails its in-flight requests cleanly (the API sees their leases
expire) while the others go on.
"""

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import httpx
import pytest
from sqlalchemy import select, text

from db.models import Account, Request
from db.reconcile import reconcile
from db.session import get_sessionmaker
from infra.launcher.stack import Stack
from tests.netns import VirtualHosts, netns_unavailable
from tests.scrape import Samples, scrape
from tests.support import STACK_MODEL, wait_for

pytestmark = pytest.mark.integration

MODEL = STACK_MODEL
HOSTS = 3
MAX_BATCH = 2  # so that 6 requests in flight must occupy every worker
LEASE_S = 3
LONG = {
    "model": MODEL,
    "max_tokens": 1000,
    "temperature": 0,
    "stream": True,
    "messages": [{"role": "user", "content": "Write a very long story."}],
}
SHORT = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
T = TypeVar("T")


@pytest.fixture(scope="module")
def hosts() -> Iterator[VirtualHosts]:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    virtual = VirtualHosts(HOSTS)
    try:
        virtual.create()
        yield virtual
    finally:
        virtual.remove()


@pytest.fixture(scope="module")
def cluster(hosts: VirtualHosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {
        "ABL_WORKER_MODELS": STACK_MODEL,
        "ABL_MAX_BATCH": str(MAX_BATCH),
        "ABL_WORKER_LEASE_S": str(LEASE_S),
        "ABL_HEARTBEAT_S": "1",
        "ABL_LIVENESS_CHECK_S": "0.5",
        "ABL_SHUTDOWN_GRACE_S": "1",
        # Inside its namespace a worker's only interfaces are loopback and its link.
        "ABL_METRICS_HOST": "0.0.0.0",
        # Three engines share this machine's cores.
        "OMP_NUM_THREADS": "1",
    }
    stack = Stack(
        tmp_path_factory.mktemp("abl-multihost"),
        workers=HOSTS,
        env=env,
        listen_host=hosts.service_address,
        clients=hosts.cidr,
        worker_prefix=hosts.exec_prefix,
    )
    with stack:
        # Heartbeats start before Celery consumes; wait until every worker takes jobs.
        for worker in stack.workers:
            wait_for(lambda w=worker: " ready." in w.log_path.read_text(errors="replace"))
        yield stack


@pytest.fixture(scope="module")
def key(cluster: Stack) -> str:
    with httpx.Client(
        base_url=cluster.base_url, headers={"Authorization": f"Bearer {cluster.admin_token}"}
    ) as admin:
        account = admin.post("/admin/accounts", json={"name": "multihost", "credits": 1_000_000})
        created = admin.post(f"/admin/accounts/{account.json()['id']}/keys", json={})
        return str(created.json()["key"])


@dataclass
class Stream:
    """One streaming request run by a thread: its id, event names, and error type if any."""

    url: str
    key: str
    request_id: str | None = None
    events: list[str] = field(default_factory=list)
    error_type: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> "Stream":
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        headers = {"x-api-key": self.key}
        url = f"{self.url}/v1/messages"
        with (
            httpx.Client(timeout=120, trust_env=False) as client,
            client.stream("POST", url, json=LONG, headers=headers) as response,
        ):
            self.request_id = response.headers.get("request-id")
            name = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                    self.events.append(name)
                elif line.startswith("data: ") and name == "error":
                    self.error_type = json.loads(line[6:])["error"]["type"]
                if self.stop.is_set():
                    return  # closing the stream: the API cancels the request

    def deltas(self) -> int:
        return self.events.count("content_block_delta")

    def close(self, timeout: float = 60) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.request_id} did not end"


def rows(stack: Stack, request_ids: list[str]) -> dict[str, Request]:
    assert stack.database_url
    with get_sessionmaker(stack.database_url)() as session:
        found = session.scalars(select(Request).where(Request.id.in_(request_ids))).all()
        return {row.id: row for row in found}


def all_running(stack: Stack, streams: list[Stream]) -> dict[str, Request] | None:
    """The streams' rows once every one is running and has streamed text; None before."""
    ids = [s.request_id for s in streams if s.request_id]
    if len(ids) < len(streams) or any(s.deltas() == 0 for s in streams):
        return None
    found = rows(stack, ids)
    return found if all(r.status == "running" for r in found.values()) else None


def worker_metrics(stack: Stack, hosts: VirtualHosts, i: int) -> Samples:
    """Scraped at the worker's own address inside its namespace."""
    return scrape(f"http://{hosts.address(i)}:{stack.workers[i].env['ABL_METRICS_PORT']}/metrics")


def books_are_straight(stack: Stack) -> None:
    assert stack.database_url
    sessions = get_sessionmaker(stack.database_url)

    def settled() -> bool:
        with sessions() as session:
            open_ = session.scalars(
                select(Request.id).where(Request.status.in_(("queued", "running")))
            ).all()
            held = session.scalars(select(Account.reserved_credits)).all()
            return not open_ and not any(held)

    wait_for(settled, timeout=60)
    with sessions() as session:
        report = reconcile(session)
        assert report.ok, report.problems()


def test_workers_reach_the_services_from_their_own_hosts(
    cluster: Stack, hosts: VirtualHosts
) -> None:
    assert cluster.database_url and hosts.service_address in cluster.database_url
    with get_sessionmaker(cluster.database_url)() as session:
        clients = session.execute(
            text(
                "SELECT DISTINCT host(client_addr) FROM pg_stat_activity"
                " WHERE client_addr IS NOT NULL"
            )
        ).scalars()
        assert {hosts.address(i) for i in range(HOSTS)} <= set(clients)
    for i in range(HOSTS):
        assert worker_metrics(cluster, hosts, i).get("abl_worker_info", worker=f"worker-{i}") == 1


def test_requests_spread_over_all_hosts(cluster: Stack, hosts: VirtualHosts, key: str) -> None:
    streams = [Stream(cluster.base_url, key).start() for _ in range(HOSTS * MAX_BATCH)]
    try:
        found = wait_for(lambda: all_running(cluster, streams), timeout=120)
        by_worker = Counter(row.worker for row in found.values())
        assert by_worker == {f"worker-{i}": MAX_BATCH for i in range(HOSTS)}
        for i in range(HOSTS):
            busy = worker_metrics(cluster, hosts, i)
            assert busy.get("abl_worker_batch_size", model=MODEL) == MAX_BATCH
    finally:
        for stream in streams:
            stream.close()
    books_are_straight(cluster)


def test_unplugged_host_fails_its_requests_and_the_others_go_on(
    cluster: Stack, hosts: VirtualHosts, key: str
) -> None:
    streams = [Stream(cluster.base_url, key).start() for _ in range(HOSTS * MAX_BATCH)]
    try:
        found = wait_for(lambda: all_running(cluster, streams), timeout=120)
        cut = [s for s in streams if found[s.request_id or ""].worker == "worker-0"]
        others = [s for s in streams if s not in cut]
        assert len(cut) == MAX_BATCH
        hosts.cut(0)
        cut_at = time.monotonic()
        try:
            _check_unplugged(cluster, cut, others, cut_at)
        finally:
            hosts.restore(0)
    finally:
        for stream in streams:
            stream.close()
    books_are_straight(cluster)
    balances = _balances(cluster)
    # Plugged back in, the worker rejoins; what it still settles was settled: no new charge.
    wait_for(lambda: _ready_workers(cluster) == HOSTS, timeout=60)
    assert worker_metrics(cluster, hosts, 0).get("abl_worker_batch_size", model=MODEL) == 0
    assert _balances(cluster) == balances
    books_are_straight(cluster)


def _check_unplugged(
    cluster: Stack, cut: list[Stream], others: list[Stream], cut_at: float
) -> None:
    for stream in cut:
        assert stream.thread is not None
        stream.thread.join(timeout=60)
        assert not stream.thread.is_alive(), "the unplugged host's stream never ended"
        assert stream.events[-1] == "error" and "message_stop" not in stream.events
        assert stream.error_type == "api_error"
    # The lease expires, then the next liveness check notices (every 0.5 s).
    assert time.monotonic() - cut_at < LEASE_S + 20
    for row in rows(cluster, [s.request_id or "" for s in cut]).values():
        assert (row.status, row.credits_charged, row.worker) == ("failed", 0, "worker-0")
    # The other hosts' streams keep flowing, and new requests are served by them.
    progress = {s.request_id: s.deltas() for s in others}
    wait_for(lambda: all(s.deltas() >= progress[s.request_id] + 5 for s in others))
    assert all("error" not in s.events for s in others)
    with httpx.Client(base_url=cluster.base_url, headers={"x-api-key": others[0].key}) as client:
        answered = [client.post("/v1/messages", json=SHORT, timeout=120) for _ in range(2)]
    assert all(r.status_code == 200 for r in answered), [r.text for r in answered]
    served = rows(cluster, [r.headers["request-id"] for r in answered])
    assert {row.worker for row in served.values()} <= {"worker-1", "worker-2"}
    ready = wait_for(lambda: _ready_workers(cluster) == HOSTS - 1, timeout=30)
    assert ready


def _ready_workers(cluster: Stack) -> int:
    response = httpx.get(f"{cluster.base_url}/readyz", timeout=10, trust_env=False)
    assert response.status_code == 200, response.text
    return int(response.json()["checks"]["workers"]["count"])


def _balances(cluster: Stack) -> dict[str, int]:
    assert cluster.database_url
    with get_sessionmaker(cluster.database_url)() as session:
        return {a.id: a.credit_balance for a in session.scalars(select(Account)).all()}

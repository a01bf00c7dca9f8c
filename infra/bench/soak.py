"""`abl soak`: mixed load with random worker kills and restarts, then check the books.

Streaming and non-streaming requests (some abandoned mid-stream) run against a stack of its
own while a chaos loop SIGKILLs or SIGTERMs a random worker and restarts it. Every request
must end in a success or a typed Anthropic error; afterwards no request may be left open, no
credit left reserved, and the ledger must reconcile. Not part of `make test`.
"""

import argparse
import asyncio
import json
import random
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from contract.catalog import TEST_MODEL_ID
from db.models import Account, Request
from db.reconcile import reconcile
from db.session import get_sessionmaker
from infra.launcher.stack import Stack

MODEL = TEST_MODEL_ID
console = Console()


@dataclass
class Tally:
    sent: int = 0
    succeeded: int = 0
    typed_errors: Counter[str] = field(default_factory=Counter)
    untyped_failures: list[str] = field(default_factory=list)
    abandoned: int = 0
    latencies: list[float] = field(default_factory=list)
    kills: Counter[str] = field(default_factory=Counter)


def body(rng: random.Random, stream: bool) -> dict[str, object]:
    return {
        "model": MODEL,
        "max_tokens": rng.choice([8, 32, 64, 128, 256]),
        "temperature": rng.choice([0, 0.7, 1.0]),
        "stream": stream,
        "messages": [{"role": "user", "content": f"Tell me about {rng.randrange(10**6)}"}],
    }


async def one_request(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    stream = rng.random() < 0.6
    abandon = stream and rng.random() < 0.15
    tally.sent += 1
    started = time.monotonic()
    try:
        if not stream:
            response = await client.post("/v1/messages", json=body(rng, False))
            if response.status_code == 200:
                tally.succeeded += 1
            else:
                _typed(response.json(), tally, f"HTTP {response.status_code}")
        else:
            async with client.stream("POST", "/v1/messages", json=body(rng, True)) as response:
                if response.status_code != 200:
                    _typed(json.loads(await response.aread()), tally, "stream")
                    return
                await _consume(response, abandon, tally)
        tally.latencies.append(time.monotonic() - started)
    except (httpx.HTTPError, ValueError) as exc:
        tally.untyped_failures.append(f"{type(exc).__name__}: {exc}")


async def _consume(response: httpx.Response, abandon: bool, tally: Tally) -> None:
    last_event, deltas = None, 0
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            last_event = line[7:]
            deltas += last_event == "content_block_delta"
            if abandon and deltas >= 3:
                tally.abandoned += 1
                return
        elif line.startswith("data: ") and last_event == "error":
            _typed(json.loads(line[6:]), tally, "stream error event")
            return
    if last_event == "message_stop":
        tally.succeeded += 1
    else:
        tally.untyped_failures.append(f"stream ended after {last_event!r}")


def _typed(payload: dict[str, object], tally: Tally, where: str) -> None:
    error = payload.get("error") if payload.get("type") == "error" else None
    if isinstance(error, dict) and error.get("type"):
        tally.typed_errors[str(error["type"])] += 1
    else:
        tally.untyped_failures.append(f"{where}: {str(payload)[:200]}")


async def load(base_url: str, key: str, clients: int, until: float, tally: Tally) -> None:
    async def client_loop(seed: int) -> None:
        rng = random.Random(seed)
        headers = {"x-api-key": key}
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=120) as client:
            while time.monotonic() < until:
                await one_request(client, rng, tally)

    await asyncio.gather(*(client_loop(i) for i in range(clients)))


def chaos(stack: Stack, until: float, tally: Tally, every: tuple[float, float]) -> None:
    rng = random.Random(7)
    while time.monotonic() + every[1] < until:
        time.sleep(rng.uniform(*every))
        i = rng.randrange(len(stack.workers))
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        tally.kills[signal.Signals(sig).name] += 1
        stack.kill_worker(i, sig, timeout=40)
        time.sleep(rng.uniform(1, 5))
        stack.start_worker(i)


def check_books(database_url: str, timeout: float = 60) -> dict[str, object]:
    """Wait for every request to end, then prove the invariants."""
    maker = get_sessionmaker(database_url)
    deadline = time.monotonic() + timeout
    while True:
        with maker() as session:
            open_ = session.execute(
                select(func.count()).where(Request.status.in_(("queued", "running")))
            ).scalar_one()
            held = session.execute(select(func.sum(Account.reserved_credits))).scalar_one() or 0
            if (open_ == 0 and held == 0) or time.monotonic() > deadline:
                statuses = dict(
                    session.execute(select(Request.status, func.count()).group_by(Request.status))
                    .tuples()
                    .all()
                )
                bad = reconcile(session).problems()
                return {
                    "open_requests": open_,
                    "reserved_credits": int(held),
                    "statuses": statuses,
                    "reconcile_discrepancies": [asdict(d) for d in bad],
                }
        time.sleep(1)


def report(tally: Tally, books: dict[str, object], seconds: float, out: Path) -> int:
    p99 = statistics.quantiles(tally.latencies, n=100)[98] if len(tally.latencies) > 2 else 0.0
    summary = {
        "seconds": round(seconds, 1),
        "sent": tally.sent,
        "succeeded": tally.succeeded,
        "abandoned_by_client": tally.abandoned,
        "typed_errors": dict(tally.typed_errors),
        "untyped_failures": len(tally.untyped_failures),
        "untyped_examples": tally.untyped_failures[:10],
        "p99_latency_s": round(p99, 3),
        "worker_kills": dict(tally.kills),
        "books": books,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str))
    table = Table(title="abl soak")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in summary.items():
        if name != "untyped_examples":
            table.add_row(name, json.dumps(value, default=str))
    console.print(table)
    console.print(f"saved {out}")
    ok = not tally.untyped_failures and not books["reconcile_discrepancies"]
    return 0 if ok and books["open_requests"] == 0 and books["reserved_credits"] == 0 else 1


def run(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="abl-soak-"))
    with Stack(
        data_dir, workers=args.workers, env={"ABL_WORKER_LEASE_S": "5", "ABL_WORKER_MODELS": MODEL}
    ) as stack:
        admin = httpx.Client(
            base_url=stack.base_url, headers={"Authorization": f"Bearer {stack.admin_token}"}
        )
        account = admin.post("/admin/accounts", json={"name": "soak", "credits": 10**9}).json()
        key = admin.post(f"/admin/accounts/{account['id']}/keys", json={}).json()["key"]
        tally = Tally()
        started = time.monotonic()
        until = started + args.seconds
        chaos_thread = threading.Thread(
            target=chaos, args=(stack, until, tally, (args.kill_min, args.kill_max)), daemon=True
        )
        chaos_thread.start()
        console.print(f"soak: {args.clients} clients for {args.seconds:.0f}s on {stack.base_url}")
        asyncio.run(load(stack.base_url, key, args.clients, until, tally))
        chaos_thread.join()
        for i, worker in enumerate(stack.workers):
            if not worker.alive:
                stack.start_worker(i)
        assert stack.database_url
        books = check_books(stack.database_url)
        return report(tally, books, time.monotonic() - started, Path(args.out))


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    soak = subparsers.add_parser("soak", help="chaos soak: mixed load with random worker kills")
    soak.add_argument("--seconds", type=float, default=600)
    soak.add_argument("--clients", type=int, default=8)
    soak.add_argument("--workers", type=int, default=2)
    soak.add_argument("--kill-min", type=float, default=10)
    soak.add_argument("--kill-max", type=float, default=30)
    soak.add_argument("--data-dir", default=None)
    soak.add_argument("--out", default="bench-results/soak.json")
    soak.set_defaults(func=run)

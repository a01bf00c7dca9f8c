"""Message Batches: throughput, interactive latency beside a batch, a worker killed mid-batch.

`python -m infra.bench.batch` (`make bench-batch`) starts a stack of its own in a temporary
folder (one worker), then, in the same run:
1. interactive throughput: 16 concurrent clients (`--concurrency`) send `--interactive`
   short streamed requests in all: requests/s and output tok/s;
2. interactive TTFT, idle: 4 clients (`--probe-concurrency`) send `--probe` requests;
3. a batch of `--batch` requests of the same shape, nothing else running at first: items/s and
   output tok/s from creation to its end, against (1) (target >= 0.8x); a few seconds in, the
   same TTFT probe as (2) runs beside it (target: p50 <= 1.5x idle);
4. a batch of `--fault-batch` requests during which the worker is SIGKILLed and restarted:
   every request must end succeeded, none charged twice, and reconcile must be clean.
Prints the figures and saves bench-results/batch-<timestamp>.json (docs/batches.md).
"""

import argparse
import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from db.models import Request
from db.session import get_sessionmaker
from infra.bench.fairness import new_key, ttft_ms
from infra.bench.load import Target, message_body, run_async, run_clients
from infra.launcher.stack import Stack

DEFAULT_OUTPUT = Path("bench-results")
PROMPT = "Say something short."


def batch_requests(model: str, count: int, max_tokens: int) -> list[dict[str, Any]]:
    params = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    return [{"custom_id": f"r{i}", "params": params} for i in range(count)]


def http(target: Target) -> httpx.Client:
    headers = {"x-api-key": target.api_key}
    return httpx.Client(base_url=target.base_url, headers=headers, timeout=300, trust_env=False)


def wait_ended(client: httpx.Client, batch_id: str, interval: float = 0.25) -> dict[str, Any]:
    while True:
        batch: dict[str, Any] = client.get(f"/v1/messages/batches/{batch_id}").json()
        if batch["processing_status"] == "ended":
            return batch
        time.sleep(interval)


def results(client: httpx.Client, batch_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/messages/batches/{batch_id}/results")
    response.raise_for_status()
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def output_tokens(lines: list[dict[str, Any]]) -> int:
    return sum(
        int(line["result"]["message"]["usage"]["output_tokens"])
        for line in lines
        if line["result"]["type"] == "succeeded"
    )


def interactive(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    body = message_body(args.model, PROMPT, args.max_tokens)
    per_client = max(1, args.interactive // args.concurrency)
    records, wall = run_async(run_clients(target, body, args.concurrency, per_client))
    ok = [r for r in records if r.ok]
    return {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "requests_per_s": round(len(ok) / wall, 2),
        "output_tok_per_s": round(sum(r.tokens for r in ok) / wall, 1),
    }


def probe(target: Target, args: argparse.Namespace) -> list[Any]:
    body = message_body(args.model, PROMPT, args.max_tokens)
    per_client = max(1, args.probe // args.probe_concurrency)
    records, _ = run_async(
        run_clients(target, body, args.probe_concurrency, per_client, warmup=False)
    )
    return records


def batch_beside_probe(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    with http(target) as client:
        started = time.perf_counter()
        created = client.post(
            "/v1/messages/batches",
            json={"requests": batch_requests(args.model, args.batch, args.max_tokens)},
        )
        created.raise_for_status()
        batch_id = created.json()["id"]
        time.sleep(args.probe_delay)  # the batch fills its share of the engine first
        probes = probe(target, args)
        probe_done = time.perf_counter() - started
        still_running = client.get(f"/v1/messages/batches/{batch_id}").json()
        batch = wait_ended(client, batch_id)
        wall = time.perf_counter() - started
        lines = results(client, batch_id)
    succeeded = sum(1 for line in lines if line["result"]["type"] == "succeeded")
    return {
        "batch_id": batch_id,
        "requests": args.batch,
        "succeeded": succeeded,
        "counts": batch["request_counts"],
        "wall_s": round(wall, 1),
        "items_per_s": round(succeeded / wall, 2),
        "output_tok_per_s": round(output_tokens(lines) / wall, 1),
        "probe_ended_at_s": round(probe_done, 1),
        "probe_beside_batch": still_running["processing_status"] != "ended",
        "probe": probes,
    }


def killed_mid_batch(stack: Stack, target: Target, args: argparse.Namespace) -> dict[str, Any]:
    assert stack.database_url is not None
    sessions = get_sessionmaker(stack.database_url)
    with http(target) as client:
        created = client.post(
            "/v1/messages/batches",
            json={"requests": batch_requests(args.model, args.fault_batch, args.max_tokens)},
        ).json()
        batch_id = created["id"]

        def running() -> int:
            with sessions() as session:
                return int(
                    session.scalar(
                        select(func.count()).where(
                            Request.batch_id == batch_id, Request.status == "running"
                        )
                    )
                    or 0
                )

        while running() == 0:
            time.sleep(0.05)
        stack.kill_worker(0, signal.SIGKILL)
        stack.start_worker(0)
        batch = wait_ended(client, batch_id)
        lines = results(client, batch_id)
    with sessions() as session:
        rows = session.execute(
            select(Request.status, func.count(), func.sum(Request.credits_charged))
            .where(Request.batch_id == batch_id)
            .group_by(Request.status)
        ).all()
    by_status = {status: {"requests": n, "credits": int(c or 0)} for status, n, c in rows}
    admin = {"Authorization": f"Bearer {stack.admin_token}"}
    reconcile = httpx.get(f"{stack.base_url}/admin/reconcile", headers=admin, timeout=120).json()
    return {
        "requests": args.fault_batch,
        "counts": batch["request_counts"],
        "all_succeeded": all(line["result"]["type"] == "succeeded" for line in lines)
        and len(lines) == args.fault_batch,
        "request_rows": by_status,
        "charged_once": by_status.get("succeeded", {}).get("requests") == args.fault_batch
        and by_status.get("failed", {}).get("credits", 0) == 0,
        "reconcile_ok": reconcile["ok"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--batch", type=int, default=2000, help="requests in the batch")
    parser.add_argument("--interactive", type=int, default=320, help="interactive requests")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--probe", type=int, default=40, help="TTFT probe requests")
    parser.add_argument("--probe-concurrency", type=int, default=4)
    parser.add_argument("--probe-delay", type=float, default=3.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--fault-batch", type=int, default=200)
    parser.add_argument("--model", default=os.environ.get("ABL_BENCH_MODEL", "abl-tiny"))
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="abl-batch-") as tmp, Stack(Path(tmp)) as stack:
        target = Target(stack.base_url, new_key(stack.base_url, stack.admin_token, "batch"))
        started = time.time()
        load_before = os.getloadavg()[0]
        inter = interactive(target, args)
        idle = probe(target, args)
        beside = batch_beside_probe(target, args)
        fault = killed_mid_batch(stack, target, args)
    busy = beside.pop("probe")
    idle_p50, busy_p50 = ttft_ms(idle, 50), ttft_ms(busy, 50)
    result = {
        "at": started,
        "load_avg_1m_before": round(load_before, 2),
        "config": vars(args) | {"output_dir": str(args.output_dir)},
        "interactive": inter,
        "batch": beside,
        "batch_vs_interactive_tok_per_s": round(
            beside["output_tok_per_s"] / inter["output_tok_per_s"], 2
        ),
        "ttft_ms_idle": {"p50": idle_p50, "p90": ttft_ms(idle, 90)},
        "ttft_ms_beside_batch": {"p50": busy_p50, "p90": ttft_ms(busy, 90)},
        "ttft_ratio_p50": round(busy_p50 / idle_p50, 2) if idle_p50 and busy_p50 else None,
        "probe_failures": sum(1 for r in busy if not r.ok),
        "worker_killed_mid_batch": fault,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"batch-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Fair sharing between accounts: account B's time to first token while account A floods.

`python -m infra.bench.fairness` (`make bench-fairness`) starts a stack of its own in a temporary
folder (one worker), then, in the same run:
1. idle: account B sends `--b-requests` streaming requests one after another;
2. flood: account A opens `--flood` concurrent streams (`--flood-tokens` each, as fast as the
   API accepts them; A may get 529s once it holds its share of the queue), and while they run,
   B sends the same requests again.
It prints B's TTFT p50/p90 idle and under the flood, their ratio (target: <= 2x), B's
failures (target: none), what A got, and saves bench-results/fairness-<timestamp>.json.
"""

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from contract.catalog import TEST_MODEL_ID
from infra.bench.load import Target, client_for, message_body, run_async, stream_once
from infra.bench.stats import RequestRecord, percentile
from infra.launcher.stack import Stack

DEFAULT_OUTPUT = Path("bench-results")


def new_key(base_url: str, admin_token: str, name: str) -> str:
    headers = {"Authorization": f"Bearer {admin_token}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30, trust_env=False) as admin:
        account = admin.post("/admin/accounts", json={"name": name, "credits": 10_000_000})
        account.raise_for_status()
        key = admin.post(f"/admin/accounts/{account.json()['id']}/keys", json={"name": name})
        key.raise_for_status()
        return str(key.json()["key"])


async def sequential(target: Target, body: dict[str, Any], count: int) -> list[RequestRecord]:
    async with client_for(target, 1) as client:
        await stream_once(client, {**body, "max_tokens": 2})  # the connection, warm
        return [await stream_once(client, body) for _ in range(count)]


async def flood_and_probe(
    flood: Target, probe: Target, args: argparse.Namespace, model: str
) -> tuple[list[RequestRecord], list[RequestRecord]]:
    flood_body = message_body(model, "Tell me a long story.", args.flood_tokens)
    probe_body = message_body(model, "Say hello.", args.b_tokens)
    async with client_for(flood, args.flood) as client:
        streams = [asyncio.create_task(stream_once(client, flood_body)) for _ in range(args.flood)]
        await asyncio.sleep(args.probe_delay)  # the flood is queued before B asks
        probes = await sequential(probe, probe_body, args.b_requests)
        flooded = await asyncio.gather(*streams)
    return probes, list(flooded)


def ttft_ms(records: list[RequestRecord], pct: float) -> float | None:
    value = percentile([r.ttft for r in records if r.ok and r.ttft is not None], pct)
    return None if value is None else round(value * 1000, 1)


def report(
    idle: list[RequestRecord], probes: list[RequestRecord], flood: list[RequestRecord]
) -> dict[str, Any]:
    idle_p50, busy_p50 = ttft_ms(idle, 50), ttft_ms(probes, 50)
    return {
        "b_idle_ttft_ms": {"p50": idle_p50, "p90": ttft_ms(idle, 90)},
        "b_flood_ttft_ms": {"p50": busy_p50, "p90": ttft_ms(probes, 90)},
        "b_ttft_ratio_p50": round(busy_p50 / idle_p50, 2) if idle_p50 and busy_p50 else None,
        "b_failures": [r.error for r in probes if not r.ok],
        "a_outcomes": dict(Counter("ok" if r.ok else (r.error or "?")[:40] for r in flood)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--flood", type=int, default=300, help="account A's concurrent streams")
    parser.add_argument("--flood-tokens", type=int, default=128)
    parser.add_argument("--b-requests", type=int, default=20)
    parser.add_argument("--b-tokens", type=int, default=16)
    parser.add_argument("--probe-delay", type=float, default=1.5)
    parser.add_argument("--model", default=os.environ.get("ABL_BENCH_MODEL", TEST_MODEL_ID))
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="abl-fairness-") as tmp,
        Stack(Path(tmp), env={"ABL_WORKER_MODELS": args.model}) as stack,
    ):
        flood = Target(stack.base_url, new_key(stack.base_url, stack.admin_token, "flood"))
        probe = Target(stack.base_url, new_key(stack.base_url, stack.admin_token, "probe"))
        body = message_body(args.model, "Say hello.", args.b_tokens)
        started = time.time()
        load_before = os.getloadavg()[0]
        idle = run_async(sequential(probe, body, args.b_requests))
        probes, flooded = run_async(flood_and_probe(flood, probe, args, args.model))
        result = {
            "at": started,
            "load_avg_1m_before": round(load_before, 2),
            "config": vars(args) | {"output_dir": str(args.output_dir)},
            **report(idle, probes, flooded),
        }
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"fairness-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

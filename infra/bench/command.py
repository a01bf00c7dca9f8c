"""The `abl bench` subcommand: its options, and the run from parsed arguments to saved JSON."""

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console

from infra.bench.report import print_report, save
from infra.bench.runner import BenchConfig, run_bench

DEFAULT_OUTPUT = Path("bench-results")


def _levels(text: str) -> list[int]:
    try:
        levels = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels are integers >= 1")
    return levels


def register_bench(subparsers: Any) -> None:
    """Adds `abl bench` to the `abl` parser's subcommands."""
    bench = subparsers.add_parser(
        "bench",
        help="benchmark serving: HTTP streaming load vs generate and the engine alone",
        description=(
            "Starts its own stack in a temporary folder (or uses --url), runs concurrent "
            "streaming clients and the in-process baselines, measures cancellation, prints a "
            "table and writes bench-results/bench-<timestamp>.json and latest.json."
        ),
    )
    bench.add_argument(
        "--scenario",
        choices=["load", "agent"],
        default="load",
        help="load: the serving benchmark; agent: prompt caching under an agent's multi-turn"
        " replay (infra/bench/agent.py, docs/caching.md)",
    )
    bench.add_argument("--concurrency", type=_levels, default=[1, 16], help="e.g. 1,16")
    bench.add_argument("--requests-per-client", type=int, default=8)
    bench.add_argument("--max-tokens", type=int, default=64)
    bench.add_argument("--repeat", type=int, default=1, help="repeat the phases N times")
    bench.add_argument("--workers", type=int, default=1, help="workers of the own stack")
    bench.add_argument(
        "--worker-threads",
        type=int,
        help="torch threads per worker and baseline engine (default: the engine's policy)",
    )
    mode = bench.add_mutually_exclusive_group()
    mode.add_argument("--cancel", action="store_true", help="only the cancellation phase")
    mode.add_argument("--no-cancel", action="store_true", help="skip the cancellation phase")
    bench.add_argument("--cancel-streams", type=int, default=16)
    bench.add_argument("--cancel-rounds", type=int, default=2)
    bench.add_argument("--url", help="bench a running platform instead of starting one")
    bench.add_argument("--api-key", help="with --url: the key to send")
    bench.add_argument("--admin-token", help="with --url: to read request rows (orphans)")
    bench.add_argument("--redis-url", help="with --url: to read worker heartbeats")
    bench.add_argument(
        "--worker-pid", type=int, action="append", default=[], help="with --url: sample its RSS"
    )
    bench.add_argument("--model-path", type=Path, help="with --url: the model, for baselines")
    bench.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.scenario == "agent":
        from infra.bench import agent

        return agent.main(
            [
                *("--workers", str(max(2, args.workers))),
                *("--output-dir", str(args.output_dir)),
            ]
        )
    config = BenchConfig(
        concurrency=args.concurrency,
        requests_per_client=args.requests_per_client,
        max_tokens=args.max_tokens,
        repeat=args.repeat,
        workers=args.workers,
        worker_threads=args.worker_threads,
        throughput=not args.cancel,
        cancel=not args.no_cancel,
        cancel_streams=args.cancel_streams,
        cancel_rounds=args.cancel_rounds,
        url=args.url,
        api_key=args.api_key,
        admin_token=args.admin_token,
        redis_url=args.redis_url,
        worker_pids=args.worker_pid,
        model_path=args.model_path,
    )
    console = Console()
    result = run_bench(config)
    print_report(result, console)
    path = save(result, args.output_dir)
    console.print(f"saved {path} and {args.output_dir / 'latest.json'}")
    return 0

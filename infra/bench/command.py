"""The `abl bench` subcommand: its options, and the run from parsed arguments to saved JSON."""

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from contract.catalog import DEFAULT_MODEL_ID, TEST_MODEL_ID
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
    bench.add_argument(
        "--no-tools", action="store_true", help="skip the forced-tool-call phase (vs plain)"
    )
    bench.add_argument("--url", help="bench a running platform instead of starting one")
    bench.add_argument("--api-key", help="with --url: the key to send")
    bench.add_argument("--admin-token", help="with --url: to read request rows (orphans)")
    bench.add_argument("--redis-url", help="with --url: to read worker heartbeats")
    bench.add_argument(
        "--worker-pid", type=int, action="append", default=[], help="with --url: sample its RSS"
    )
    bench.add_argument("--model-path", type=Path, help="with --url: the model, for baselines")
    bench.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    bench.add_argument(
        "--model", default=TEST_MODEL_ID, help="the model measured (default: the test model)"
    )
    bench.add_argument(
        "--default-model-tokens",
        type=int,
        default=32,
        help="max_tokens of the throughput run on the default model beside it (0: no such run)",
    )
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
        tools=not args.no_tools,
        cancel=not args.no_cancel,
        cancel_streams=args.cancel_streams,
        cancel_rounds=args.cancel_rounds,
        url=args.url,
        api_key=args.api_key,
        admin_token=args.admin_token,
        redis_url=args.redis_url,
        worker_pids=args.worker_pid,
        model_path=args.model_path,
        model=args.model,
    )
    console = Console()
    result = run_bench(config)
    print_report(result, console)
    # Beside the platform's overhead, what the default model serves on its own stack.
    beside_it = config.throughput and not config.url and config.model != DEFAULT_MODEL_ID
    if args.default_model_tokens and beside_it:
        beside = replace(
            config, model=DEFAULT_MODEL_ID, max_tokens=args.default_model_tokens, cancel=False
        )
        result["default_model"] = run_bench(beside)
        console.print(f"[bold]{DEFAULT_MODEL_ID}[/bold] (the default model), beside it:")
        print_report(result["default_model"], console)
    path = save(result, args.output_dir)
    console.print(f"saved {path} and {args.output_dir / 'latest.json'}")
    return 0

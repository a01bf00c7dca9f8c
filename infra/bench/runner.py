"""One `abl bench` run: a stack (its own, or a given one), the phases, the figures."""

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from contract.catalog import TEST_MODEL_ID
from infra.bench.cancel import measure_cancel
from infra.bench.load import Target, message_body, run_async, run_clients
from infra.bench.observe import RssSampler, engine_stats, heartbeats, rss_mb
from infra.bench.stats import RequestRecord, spread, summarize
from infra.bench.tools import tool_phase
from infra.launcher.stack import Stack
from workers.models.fetch import MACHINE_CACHE_DIR

if TYPE_CHECKING:  # it imports torch: loaded only when the baselines run
    from infra.bench.baselines import Baselines

PROMPT = "Tell me about sorting lists in Python."
# The worker's default batch capacity (WorkerSettings.max_batch); the engine baseline uses it too.
MAX_BATCH = 16
BENCH_CREDITS = 100_000_000


@dataclass
class BenchConfig:
    concurrency: list[int] = field(default_factory=lambda: [1, 16])
    requests_per_client: int = 8
    max_tokens: int = 64
    repeat: int = 1
    workers: int = 1
    worker_threads: int | None = None  # torch threads per worker (ABL_TORCH_THREADS)
    throughput: bool = True
    tools: bool = True  # the forced-tool-call phase (infra/bench/tools.py)
    cancel: bool = True
    cancel_streams: int = 16
    cancel_rounds: int = 2
    url: str | None = None
    api_key: str | None = None
    admin_token: str | None = None
    redis_url: str | None = None
    worker_pids: list[int] = field(default_factory=list)
    model_path: Path | None = None
    # The test model: what the platform itself costs, with a model that costs little.
    model: str = TEST_MODEL_ID
    prompt: str = PROMPT


@dataclass
class Running:
    """What the phases need to know about the platform under test."""

    target: Target
    worker_pids: list[int]
    model_path: Path
    stack: Stack | None = None


def _bench_key(base_url: str, admin_token: str) -> str:
    """A fresh account with plenty of credits, and its key."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30, trust_env=False) as admin:
        account = admin.post("/admin/accounts", json={"name": "bench", "credits": BENCH_CREDITS})
        account.raise_for_status()
        key = admin.post(f"/admin/accounts/{account.json()['id']}/keys", json={"name": "bench"})
        key.raise_for_status()
        return str(key.json()["key"])


@contextlib.contextmanager
def platform(config: BenchConfig) -> Iterator[Running]:
    """The given platform, or a fresh local stack in a temporary folder (stopped afterwards)."""
    if config.url:
        if not config.api_key:
            raise SystemExit("--url needs --api-key")
        target = Target(config.url, config.api_key, config.admin_token, config.redis_url)
        with tempfile.TemporaryDirectory(prefix="abl-bench-model-") as tmp:
            model_path = config.model_path
            if model_path is None:
                if config.model != TEST_MODEL_ID:
                    raise SystemExit(f"--url with --model {config.model} needs --model-path")
                from workers.models.tiny import build_tiny_model

                # The build is reproducible: byte-identical to the model the platform serves.
                model_path = build_tiny_model(Path(tmp) / TEST_MODEL_ID)
            yield Running(target, list(config.worker_pids), model_path)
        return
    # A fast heartbeat: the cancellation phase reads the workers' recent cancels from it.
    env = {
        "ABL_HEARTBEAT_S": "0.2",
        "ABL_MAX_BATCH": str(MAX_BATCH),
        "ABL_WORKER_MODELS": config.model,
        # One conversion of the default model per machine, not one per run.
        "ABL_MODEL_CACHE_DIR": os.environ.get("ABL_MODEL_CACHE_DIR", str(MACHINE_CACHE_DIR)),
    }
    if config.worker_threads:
        env["ABL_TORCH_THREADS"] = str(config.worker_threads)
    with tempfile.TemporaryDirectory(prefix="abl-bench-") as tmp:
        stack = Stack(Path(tmp), workers=config.workers, env=env)
        with stack:
            assert stack.redis_url is not None
            key = _bench_key(stack.base_url, stack.admin_token)
            target = Target(stack.base_url, key, stack.admin_token, stack.redis_url)
            pids = [w.pid for w in stack.workers if w.pid is not None]
            yield Running(target, pids, stack.model_path(config.model), stack)


# Each phase sends at least this many requests (clients x requests per client).
MIN_REQUESTS_PER_PHASE = 32


def _platform_phase(
    running: Running, body: dict[str, Any], c: int, rpc: int, on_done: Callable[[], None]
) -> tuple[list[RequestRecord], float]:
    return run_async(run_clients(running.target, body, c, rpc, on_done))


def _one_repeat(
    config: BenchConfig,
    running: Running,
    baselines: "Baselines",
    progress: Progress,
    rss: RssSampler,
    reference: str,
) -> dict[str, Any]:
    rpc, max_tokens = config.requests_per_client, config.max_tokens
    body = message_body(config.model, config.prompt, max_tokens)
    # Other work on the host skews every figure: say how busy it was.
    out: dict[str, Any] = {"load_avg_1m_before": round(os.getloadavg()[0], 2), "levels": {}}
    task = progress.add_task("sequential generate", total=None)
    out["sequential"] = baselines.sequential(max(8, rpc), max_tokens)
    progress.update(task, total=1, completed=1)
    for c in config.concurrency:
        level: dict[str, Any] = {}
        # Enough requests at low concurrency that a median is not one of a handful.
        n = max(rpc, -(-MIN_REQUESTS_PER_PHASE // c))
        task = progress.add_task(f"engine alone, concurrency {c}", total=c * n)
        records, wall = baselines.clients(c, n, max_tokens, partial(progress.advance, task))
        level["engine"] = summarize(records, wall)
        task = progress.add_task(f"platform over HTTP, concurrency {c}", total=c * n)
        rss.sample()
        records, wall = _platform_phase(running, body, c, n, partial(progress.advance, task))
        level["platform"] = summarize(records, wall)
        # Greedy, identical prompts: every answer must be the engine's answer alone.
        level["platform"]["outputs_match_engine"] = all(
            r.text == reference for r in records if r.ok
        )
        out["levels"][str(c)] = level
    out["ratios"] = ratios(out, config.concurrency)
    if config.tools:
        c = max(config.concurrency)
        task = progress.add_task(f"forced tool calls vs plain, concurrency {c}", total=3 * c * rpc)
        out["tools"] = tool_phase(
            running.target,
            config.model,
            config.prompt,
            c,
            rpc,
            max_tokens,
            partial(progress.advance, task),
        )
        out["ratios"]["forced_tool_vs_plain"] = out["tools"]["forced_vs_plain"]
    out["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    return out


def ratios(run: dict[str, Any], levels: list[int]) -> dict[str, float | None]:
    """The issue's targets: throughput at the highest concurrency, TTFT overhead at the lowest."""
    high, low = str(max(levels)), str(min(levels))
    platform = run["levels"][high]["platform"]["output_tokens_per_s"]
    engine = run["levels"][high]["engine"]["output_tokens_per_s"]
    sequential = run["sequential"]["output_tokens_per_s"]
    ttft_p = run["levels"][low]["platform"]["ttft_ms_p50"]
    ttft_e = run["levels"][low]["engine"]["ttft_ms_p50"]
    return {
        # Issue 15, item 11: the most that holding the stream until `claimed` adds to TTFT.
        "claim_wait_ttft_cost_ms": run["levels"][low]["platform"]["status_to_message_start_ms_p50"],
        "concurrency_high": int(high),
        "concurrency_low": int(low),
        "platform_vs_sequential": round(platform / sequential, 2) if platform else None,
        "platform_vs_engine": round(platform / engine, 2) if platform and engine else None,
        "ttft_p50_platform_minus_engine_ms": (
            round(ttft_p - ttft_e, 1) if ttft_p is not None and ttft_e is not None else None
        ),
    }


def _throughput(config: BenchConfig, running: Running, progress: Progress) -> dict[str, Any]:
    from infra.bench.baselines import Baselines  # torch: only now

    warm = progress.add_task("loading the baseline engine and warming up", total=None)
    baselines = Baselines(running.model_path, config.prompt, MAX_BATCH, config.worker_threads)
    try:
        reference = baselines.generate_once(config.max_tokens).text
        baselines.clients(max(config.concurrency), 1, 8)
        body = message_body(config.model, config.prompt, 8)
        _platform_phase(running, body, max(config.concurrency), 1, lambda: None)
        progress.update(warm, total=1, completed=1)
        runs = []
        with RssSampler(running.worker_pids) as rss:
            for _ in range(config.repeat):
                runs.append(_one_repeat(config, running, baselines, progress, rss, reference))
        baseline_rss = rss_mb(os.getpid())
    finally:
        baselines.close()
    keys = (
        "platform_vs_sequential",
        "platform_vs_engine",
        "ttft_p50_platform_minus_engine_ms",
        "claim_wait_ttft_cost_ms",
        "forced_tool_vs_plain",
    )
    return {
        "runs": runs,
        "ratios": {k: spread([r["ratios"].get(k) for r in runs]) for k in keys},
        "worker_rss_mb_peak": {str(pid): round(mb, 1) for pid, mb in rss.peak_mb.items()},
        "bench_process_rss_mb": round(baseline_rss, 1) if baseline_rss else None,
    }


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Everything `abl bench` measures, as one JSON-ready dict."""
    result: dict[str, Any] = {"config": _config_json(config), "host": _host()}
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
    )
    start_task = progress.add_task("starting the platform", total=None)
    with progress, platform(config) as running:
        progress.update(start_task, total=1, completed=1)
        if running.stack is not None:
            result["stack_start_s"] = {k: round(v, 2) for k, v in running.stack.timings.items()}
        if config.throughput:
            result["throughput"] = _throughput(config, running, progress)
        if config.cancel:
            total = config.cancel_streams * config.cancel_rounds
            task = progress.add_task("cancellation (streams that disconnect)", total=total)
            result["cancel"] = measure_cancel(
                running.target,
                config.model,
                config.prompt,
                config.cancel_streams,
                config.cancel_rounds,
                lambda: progress.advance(task),
            )
        if running.target.redis_url:
            result["engines"] = engine_stats(heartbeats(running.target.redis_url))
    return result


def _config_json(config: BenchConfig) -> dict[str, Any]:
    hidden = {"api_key", "admin_token"}
    return {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in config.__dict__.items()
        if k not in hidden
    }


def _host() -> dict[str, Any]:
    import torch

    return {
        "cpus": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_threads_bench_process": torch.get_num_threads(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }

"""The end of a bench run: a table on the terminal, and the figures saved as JSON."""

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# The targets (docs/benchmarks.md).
MIN_VS_SEQUENTIAL = 5.0
MIN_VS_ENGINE = 0.8
MAX_TTFT_OVERHEAD_MS = 15.0
MAX_CLAIM_WAIT_MS = 2.0
MAX_WORKER_RSS_MB = 1024.0
MIN_FORCED_TOOL_VS_PLAIN = 0.7


def save(result: dict[str, Any], output_dir: Path) -> Path:
    """Writes `bench-<timestamp>.json` and `latest.json` under `output_dir`; returns the first."""
    output_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2)
    path = output_dir / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(text)
    (output_dir / "latest.json").write_text(text)
    return path


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def phase_table(run: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    columns = (
        "phase",
        "tok/s",
        "req/s",
        "status p50",
        "TTFT p50/p99",
        "ITL p50/p99",
        "TPOT p50",
        "E2E p50/p99",
    )
    for name in columns:
        table.add_column(name, justify="left" if name == "phase" else "right")
    table.add_column("failed", justify="right")
    seq = run["sequential"]
    table.add_row(
        "sequential model.generate",
        _fmt(seq["output_tokens_per_s"]),
        _fmt(seq["requests_per_s"]),
        "",
        "",
        "",
        "",
        "",
        "",
    )
    for level, phases in run["levels"].items():
        for name in ("engine", "platform"):
            s = phases[name]
            label = f"{'engine alone' if name == 'engine' else 'platform (HTTP)'}, c={level}"
            table.add_row(
                label,
                _fmt(s["output_tokens_per_s"]),
                _fmt(s["requests_per_s"]),
                _fmt(s.get("status_ms_p50")),
                f"{_fmt(s['ttft_ms_p50'])} / {_fmt(s['ttft_ms_p99'])}",
                f"{_fmt(s['itl_ms_p50'])} / {_fmt(s['itl_ms_p99'])}",
                _fmt(s["tpot_ms_p50"]),
                f"{_fmt(s['e2e_ms_p50'])} / {_fmt(s['e2e_ms_p99'])}",
                _fmt(s["failed"]),
            )
    tools: dict[str, Any] = run.get("tools") or {}
    c, tokens = tools.get("concurrency"), tools.get("max_tokens")
    labels = {
        "forced_tool": f"forced tool call, c={c}, max {tokens}",
        "plain_same_prompt": f"same without grammar, c={c}, max {tools.get('matched_max_tokens')}",
        "plain_no_tools": f"plain, no tools, c={c}, max {tokens}",
    }
    for name in labels if tools else ():
        s = tools[name]
        label = labels[name]
        if name == "forced_tool":
            label += f" ({s['valid_calls']} valid)"
        table.add_row(
            label,
            _fmt(s["output_tokens_per_s"]),
            _fmt(s["requests_per_s"]),
            _fmt(s.get("status_ms_p50")),
            f"{_fmt(s['ttft_ms_p50'])} / {_fmt(s['ttft_ms_p99'])}",
            f"{_fmt(s['itl_ms_p50'])} / {_fmt(s['itl_ms_p99'])}",
            _fmt(s["tpot_ms_p50"]),
            f"{_fmt(s['e2e_ms_p50'])} / {_fmt(s['e2e_ms_p99'])}",
            _fmt(s["failed"]),
        )
    return table


def targets_table(throughput: dict[str, Any]) -> Table:
    ratios = throughput["ratios"]
    runs = throughput["runs"]
    high = runs[0]["ratios"]["concurrency_high"]
    low = runs[0]["ratios"]["concurrency_low"]
    peak = max(throughput["worker_rss_mb_peak"].values(), default=None)
    rows = [
        (
            f"platform / sequential tok/s, c={high}",
            ratios["platform_vs_sequential"],
            f">= {MIN_VS_SEQUENTIAL}",
            lambda v: v >= MIN_VS_SEQUENTIAL,
        ),
        (
            f"platform / engine alone tok/s, c={high}",
            ratios["platform_vs_engine"],
            f">= {MIN_VS_ENGINE}",
            lambda v: v >= MIN_VS_ENGINE,
        ),
        (
            f"TTFT p50 platform - engine, c={low} (ms)",
            ratios["ttft_p50_platform_minus_engine_ms"],
            f"<= {MAX_TTFT_OVERHEAD_MS}",
            lambda v: v <= MAX_TTFT_OVERHEAD_MS,
        ),
        (
            f"TTFT cost of waiting for `claimed` p50, c={low} (ms)",
            ratios["claim_wait_ttft_cost_ms"],
            f"<= {MAX_CLAIM_WAIT_MS}",
            lambda v: v <= MAX_CLAIM_WAIT_MS,
        ),
    ]
    if ratios.get("forced_tool_vs_plain", {}).get("median") is not None:
        rows.append(
            (
                f"forced tool calls / plain tok/s, c={high}",
                ratios["forced_tool_vs_plain"],
                f">= {MIN_FORCED_TOOL_VS_PLAIN}",
                lambda v: v >= MIN_FORCED_TOOL_VS_PLAIN,
            )
        )
    table = Table(title=f"targets ({len(runs)} repeat(s): median [min, max])")
    for name in ("figure", "measured", "target", "met (median)"):
        table.add_column(name)
    for name, stat, goal, ok in rows:
        median = stat["median"]
        shown = f"{_fmt(median)} [{_fmt(stat['min'])}, {_fmt(stat['max'])}]"
        table.add_row(name, shown, goal, "-" if median is None else ("yes" if ok(median) else "NO"))
    if peak is not None:
        met = "yes" if peak < MAX_WORKER_RSS_MB else "NO"
        table.add_row("worker RSS peak under load (MiB)", f"{peak}", f"< {MAX_WORKER_RSS_MB}", met)
    return table


def cancel_table(cancel: dict[str, Any]) -> Table:
    table = Table(title="cancellation (clients that disconnect mid-stream)", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("streams disconnected", _fmt(cancel["disconnected"]))
    table.add_row("statuses of those requests", _fmt(cancel.get("statuses_of_disconnected")))
    table.add_row("orphaned (ran to the end unheard; goal 0)", _fmt(cancel.get("orphaned")))
    for key, label in (
        ("disconnect_to_worker_ms", "disconnect -> cancel at the worker (ms)"),
        ("disconnect_to_left_batch_ms", "disconnect -> sequence left the batch (ms)"),
    ):
        s = cancel.get(key)
        if s:
            table.add_row(
                label, f"p50 {_fmt(s['p50'])}, p99 {_fmt(s['p99'])}, max {_fmt(s['max'])}"
            )
    table.add_row(
        "output tokens charged, p50 / max",
        _fmt(cancel.get("output_tokens_charged_p50"))
        + " / "
        + _fmt(cancel.get("output_tokens_charged_max")),
    )
    table.add_row("engines afterwards", _fmt(cancel.get("engines_after")))
    return table


def print_report(result: dict[str, Any], console: Console) -> None:
    throughput = result.get("throughput")
    if throughput:
        tokens = result["config"]["max_tokens"]
        for i, run in enumerate(throughput["runs"]):
            load = f"load average {run['load_avg_1m_before']} -> {run['load_avg_1m_after']}"
            title = f"repeat {i + 1}: max {tokens} tokens per request, ms; {load}"
            console.print(phase_table(run, title))
        console.print(targets_table(throughput))
    if result.get("cancel"):
        console.print(cancel_table(result["cancel"]))

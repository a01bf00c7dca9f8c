"""Prompt caching under an agent's replay: `abl bench --scenario agent` (docs/caching.md).

Starts a stack of its own (two workers) in a temporary folder, then replays conversations as
agents send them: a system prompt and tool list shared by every conversation (about
`--prefix-tokens` tokens), each turn adding a user message of a few hundred tokens and the
model's answer, with `cache_control` breakpoints on the system prompt, the tools and the last
user message. Streaming, greedy, one request at a time, so each time to first token is the
request's own.

1. cached: `--conversations` conversations of `--turns` turns, with the breakpoints;
2. uncached: `--baseline-conversations` conversations of the same shape, without breakpoints
   (nothing is read from or written to the cache), on another system prompt;
3. routing: `--routing-conversations` conversations with breakpoints through the stack's API
   (cache-aware routing on) and through a second API process with routing off
   (`ABL_PREFIX_ROUTE_MAX_QUEUED=0`: the shared lanes, whichever worker takes the job), each on
   a system prompt of its own.

It prints the TTFT p50 of turns 2..N cached against uncached (target <= 0.25x), the prefix hit
rate of turns 2..N with and without routing (a turn hits when it reads at least the whole prefix
its conversation's previous turn cached; target >= 90%), and the prompt cache's bytes against
its budget on every worker (sampled after every turn). Then the engine alone, in process, with a
shared prefix of `--engine-prefix-tokens` (16,000 by default; infra/bench/agent_engine.py): the
same TTFT ratio where the prefix, not the platform's fixed per-request cost, dominates. Saves
bench-results/agent-<timestamp>.json.
"""

import argparse
import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from infra.bench.fairness import new_key
from infra.bench.stats import percentile
from infra.launcher.services import free_port
from infra.launcher.stack import Stack, api_argv

DEFAULT_OUTPUT = Path("bench-results")
WORDS = [
    "parcel",
    "customs",
    "tracking",
    "depot",
    "courier",
    "invoice",
    "pallet",
    "freight",
    "manifest",
    "route",
    "weekday",
    "signature",
    "locker",
    "warehouse",
    "express",
    "returns",
    "label",
    "weight",
    "volume",
    "tariff",
    "border",
    "scanner",
    "dispatch",
    "ledger",
    "contract",
    "carrier",
    "insurance",
    "damage",
    "refund",
]
MARK = {"type": "ephemeral"}


# Tokens per word of the model's tokenizer: measured once per run (`calibrate`).
TOKENS_PER_WORD = [1.3]


def calibrate(http: httpx.Client, model: str) -> float:
    """Tokens per word of `text_of`'s text, from /v1/messages/count_tokens."""

    def count(words: int) -> int:
        text = " ".join(WORDS[(i * 7 + i // 5) % len(WORDS)] for i in range(words))
        body = {"model": model, "messages": [{"role": "user", "content": text}]}
        response = http.post("/v1/messages/count_tokens", json=body)
        response.raise_for_status()
        return int(response.json()["input_tokens"])

    TOKENS_PER_WORD[0] = (count(600) - count(100)) / 500
    return TOKENS_PER_WORD[0]


def text_of(tokens: int, seed: int) -> str:
    """Varied rule text of roughly `tokens` tokens."""
    words = int(tokens / TOKENS_PER_WORD[0])
    return " ".join(WORDS[(i * 7 + seed * 13 + i // 5) % len(WORDS)] for i in range(words))


@dataclass
class Turn:
    conversation: int
    turn: int
    ttft_s: float | None = None
    input_tokens: int = 0
    cache_read: int = 0
    cache_creation: int = 0
    error: str | None = None
    answer: str = ""

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.cache_read + self.cache_creation


@dataclass
class Replay:
    name: str
    turns: list[Turn] = field(default_factory=list)
    cache_bytes: list[list[int]] = field(default_factory=list)  # per sample, per worker


def stream_turn(http: httpx.Client, body: dict[str, Any], record: Turn) -> None:
    start = time.perf_counter()
    with http.stream("POST", "/v1/messages", json={**body, "stream": True}) as response:
        if response.status_code != 200:
            response.read()
            record.error = f"HTTP {response.status_code}: {response.text[:200]}"
            return
        event = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
                continue
            if not line.startswith("data: "):
                continue
            data = json.loads(line[6:])
            if event == "message_start":
                usage = data["message"]["usage"]
                record.input_tokens = usage["input_tokens"]
                record.cache_read = usage["cache_read_input_tokens"]
                record.cache_creation = usage["cache_creation_input_tokens"]
            elif event in ("content_block_delta", "message_delta") and record.ttft_s is None:
                # The first generated token (or the end, for an answer with no text).
                record.ttft_s = time.perf_counter() - start
            if event == "content_block_delta":
                record.answer += data["delta"].get("text", "")


def replay(
    name: str,
    http: httpx.Client,
    args: argparse.Namespace,
    *,
    conversations: int,
    seed: int,
    marked: bool,
    metrics_urls: list[str],
) -> Replay:
    system = text_of(args.prefix_tokens, seed)
    tools = [
        {
            "name": f"tool_{seed}_{i}",
            "description": text_of(40, seed + i),
            "input_schema": {"type": "object", "properties": {"id": {"type": "string"}}},
        }
        for i in range(3)
    ]
    if marked:
        tools[-1]["cache_control"] = MARK
    histories: list[list[dict[str, Any]]] = [[] for _ in range(conversations)]
    result = Replay(name)
    for turn in range(args.turns):  # turn by turn across conversations, as agents interleave
        for c in range(conversations):
            question = f"Conversation {c}, turn {turn}: " + text_of(
                args.turn_tokens, seed + 100 * c + turn
            )
            user: dict[str, Any] = {"type": "text", "text": question}
            if marked:
                user["cache_control"] = MARK
            # Earlier user turns lose their breakpoint, as agents move it to the newest turn.
            history = [
                {
                    **m,
                    "content": [
                        {k: v for k, v in b.items() if k != "cache_control"} for b in m["content"]
                    ],
                }
                for m in histories[c]
            ]
            messages = [*history, {"role": "user", "content": [user]}]
            body: dict[str, Any] = {
                "model": args.model,
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "system": [
                    {"type": "text", "text": system, **({"cache_control": MARK} if marked else {})}
                ],
                "tools": tools,
                "tool_choice": {"type": "none"},
                "messages": messages,
            }
            record = Turn(c, turn + 1)
            stream_turn(http, body, record)
            result.turns.append(record)
            answer = record.answer.strip() or "ok"
            histories[c] = [
                *messages,
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ]
        result.cache_bytes.append([cache_bytes(url) for url in metrics_urls])
    return result


def cache_bytes(url: str) -> int:
    try:
        text = httpx.get(url, timeout=5, trust_env=False).text
    except httpx.HTTPError:
        return -1
    return sum(
        int(float(line.split()[-1]))
        for line in text.splitlines()
        if line.startswith("abl_worker_prefix_cache_bytes{")
    )


def later_ttft_ms(result: Replay, pct: float) -> float | None:
    values = [t.ttft_s for t in result.turns if t.turn >= 2 and t.ttft_s is not None]
    value = percentile(values, pct)
    return None if value is None else round(value * 1000, 1)


def hit_rate(result: Replay) -> float | None:
    """Turns 2..N that read at least the whole prefix their conversation's previous turn cached."""
    previous: dict[int, Turn] = {}
    hits = total = 0
    for t in result.turns:
        before = previous.get(t.conversation)
        previous[t.conversation] = t
        if before is None or t.error:
            continue
        total += 1
        hits += t.cache_read >= before.cache_read + before.cache_creation > 0
    return round(hits / total, 3) if total else None


@contextlib.contextmanager
def second_api(stack: Stack, env: dict[str, str]) -> Iterator[str]:
    port = free_port("127.0.0.1")
    full_env = {**stack.env_for_api(), "ABL_PORT": str(port), **env}
    proc = subprocess.Popen(
        api_argv("127.0.0.1", port),
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1, trust_env=False).status_code == 200:
                    break
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


def summary(result: Replay, budget: int) -> dict[str, Any]:
    peaks = [max(s[i] for s in result.cache_bytes) for i in range(len(result.cache_bytes[0]))]
    return {
        "turns": len(result.turns),
        "errors": [t.error for t in result.turns if t.error],
        "ttft_ms_turns_2_plus": {
            "p50": later_ttft_ms(result, 50),
            "p90": later_ttft_ms(result, 90),
        },
        "ttft_ms_turn_1_p50": (
            None
            if not (first := [t.ttft_s for t in result.turns if t.turn == 1 and t.ttft_s])
            else round((percentile(first, 50) or 0) * 1000, 1)
        ),
        "prompt_tokens_mean": round(
            sum(t.prompt_tokens for t in result.turns) / max(1, len(result.turns))
        ),
        "cache_read_tokens": sum(t.cache_read for t in result.turns),
        "cache_creation_tokens": sum(t.cache_creation for t in result.turns),
        "prefix_hit_rate_turns_2_plus": hit_rate(result),
        "cache_bytes_peak_per_worker": peaks,
        "cache_budget_bytes": budget,
        "within_budget": all(0 <= p <= budget for p in peaks),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("ABL_BENCH_MODEL", "abliterated-model"))
    # Defaults fit the 2,048-token window of the tiny default model over four turns.
    parser.add_argument("--prefix-tokens", type=int, default=900, help="system prompt + tools")
    parser.add_argument("--turn-tokens", type=int, default=100, help="each user message")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--baseline-conversations", type=int, default=2)
    # Odd: one request at a time alternates between two idle workers, which an even count
    # would turn into a fixed worker per conversation even without routing.
    parser.add_argument("--routing-conversations", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache-mib", type=int, default=16, help="each worker's cache budget")
    parser.add_argument(
        "--engine-prefix-tokens",
        type=int,
        default=16000,
        help="the in-process engine phase's shared prefix (infra/bench/agent_engine.py); 0: skip",
    )
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    budget = args.cache_mib * 1024 * 1024
    env = {"ABL_PREFIX_CACHE_BYTES": str(budget)}
    started = time.time()
    with (
        tempfile.TemporaryDirectory(prefix="abl-agent-") as tmp,
        Stack(Path(tmp), workers=args.workers, env=env) as stack,
    ):
        key = new_key(stack.base_url, stack.admin_token, "agent")
        metrics = [
            f"http://{w.env['ABL_METRICS_HOST']}:{w.env['ABL_METRICS_PORT']}/metrics"
            for w in stack.workers
        ]
        headers = {"x-api-key": key}
        phases: dict[str, Replay] = {}
        with httpx.Client(
            base_url=stack.base_url, headers=headers, timeout=300, trust_env=False
        ) as http:
            calibrate(http, args.model)
            stream_turn(
                http,
                {
                    "model": args.model,
                    "max_tokens": 2,
                    "messages": [{"role": "user", "content": "hi"}],
                },
                Turn(0, 0),
            )
            phases["cached"] = replay(
                "cached",
                http,
                args,
                conversations=args.conversations,
                seed=1,
                marked=True,
                metrics_urls=metrics,
            )
            phases["uncached"] = replay(
                "uncached",
                http,
                args,
                conversations=args.baseline_conversations,
                seed=2,
                marked=False,
                metrics_urls=metrics,
            )
            phases["routed"] = replay(
                "routed",
                http,
                args,
                conversations=args.routing_conversations,
                seed=3,
                marked=True,
                metrics_urls=metrics,
            )
        with (
            second_api(stack, {"ABL_PREFIX_ROUTE_MAX_QUEUED": "0"}) as url,
            httpx.Client(base_url=url, headers=headers, timeout=300, trust_env=False) as http,
        ):
            phases["random"] = replay(
                "random",
                http,
                args,
                conversations=args.routing_conversations,
                seed=4,
                marked=True,
                metrics_urls=metrics,
            )
        engine_phase = None
        if args.engine_prefix_tokens:
            from infra.bench import agent_engine

            engine_phase = agent_engine.run(
                stack.model_dir,
                prefix_tokens=args.engine_prefix_tokens,
                turn_tokens=300,
                turns=args.turns,
                conversations=args.conversations,
                baseline_conversations=args.baseline_conversations,
                cache_mib=max(args.cache_mib, 256),
            )
    summaries = {name: summary(r, budget) for name, r in phases.items()}
    cached_p50 = summaries["cached"]["ttft_ms_turns_2_plus"]["p50"]
    uncached_p50 = summaries["uncached"]["ttft_ms_turns_2_plus"]["p50"]
    result = {
        "at": started,
        "seconds": round(time.time() - started, 1),
        "tokens_per_word": round(TOKENS_PER_WORD[0], 3),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "config": vars(args) | {"output_dir": str(args.output_dir)},
        "ttft_ratio_cached_vs_uncached_p50": (
            round(cached_p50 / uncached_p50, 3) if cached_p50 and uncached_p50 else None
        ),
        "hit_rate_routed": summaries["routed"]["prefix_hit_rate_turns_2_plus"],
        "hit_rate_random": summaries["random"]["prefix_hit_rate_turns_2_plus"],
        "phases": summaries,
        "engine": engine_phase,
        "turns": {name: [asdict(t) for t in r.turns] for name, r in phases.items()},
    }
    shown = {k: v for k, v in result.items() if k not in ("config", "turns", "engine")}
    if engine_phase is not None:
        shown["engine"] = {k: v for k, v in engine_phase.items() if k != "rows"}
    print(json.dumps(shown, indent=2))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"agent-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

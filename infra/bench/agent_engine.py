"""The engine alone under an agent's replay with a long shared prefix (docs/caching.md).

In process, no HTTP: the default model's engine with room for `--prefix-tokens` of shared
prefix plus the turns (its rotary positions go past the catalogue's 2,048-token window; the
timings, not the text, are the point). Conversations share a prefix of random token ids; each
turn appends `--turn-tokens` more and asks for one token, so the time from submit to the end
is the prefill: with the prompt cache (the whole prompt cacheable) against without.
"""

import random
import time
from pathlib import Path
from typing import Any

from contract.jobs import SamplingParams
from infra.bench.stats import percentile
from workers.backends.seam import Submission
from workers.backends.transformers.engine import TransformersEngine


def _ttft(
    engine: TransformersEngine, rid: str, ids: list[int], cacheable: int
) -> tuple[float, int]:
    start = time.perf_counter()
    generation = engine.submit(
        Submission(
            rid, ids, SamplingParams(max_tokens=1, temperature=0.0), cache_prefix_tokens=cacheable
        )
    )
    list(generation.events(timeout=600))
    read = generation.cache_use.read_tokens if generation.cache_use else 0
    return time.perf_counter() - start, read


def run(
    model_dir: Path,
    *,
    prefix_tokens: int,
    turn_tokens: int,
    turns: int,
    conversations: int,
    baseline_conversations: int,
    cache_mib: int,
) -> dict[str, Any]:
    rng = random.Random(0)
    room = prefix_tokens + turns * turn_tokens + 64
    engine = TransformersEngine.load(
        model_dir, max_batch=4, max_context=room, prefix_cache_bytes=cache_mib * 1024 * 1024
    )
    try:
        vocab = engine.vocab_size
        ids = [rng.randrange(8, vocab) for _ in range(prefix_tokens)]
        phases: dict[str, list[tuple[int, float, int]]] = {}
        for name, count, marked in (
            ("cached", conversations, True),
            ("uncached", baseline_conversations, False),
        ):
            rows: list[tuple[int, float, int]] = []
            prompts = [list(ids) for _ in range(count)]
            for turn in range(1, turns + 1):
                for c, prompt in enumerate(prompts):
                    prompt += [rng.randrange(8, vocab) for _ in range(turn_tokens)]
                    took, read = _ttft(
                        engine, f"{name}-{c}-{turn}", prompt, len(prompt) if marked else 0
                    )
                    rows.append((turn, took, read))
            phases[name] = rows
        stats = engine.stats
    finally:
        engine.stop()

    def p50_ms(rows: list[tuple[int, float, int]]) -> float | None:
        value = percentile([t for turn, t, _ in rows if turn >= 2], 50)
        return None if value is None else round(value * 1000, 1)

    cached_ms, uncached_ms = p50_ms(phases["cached"]), p50_ms(phases["uncached"])
    return {
        "prefix_tokens": prefix_tokens,
        "turn_tokens": turn_tokens,
        "ttft_ms_turns_2_plus_p50": {"cached": cached_ms, "uncached": uncached_ms},
        "ttft_ratio_cached_vs_uncached_p50": (
            round(cached_ms / uncached_ms, 3) if cached_ms and uncached_ms else None
        ),
        "cache_read_tokens": sum(r for _, _, r in phases["cached"]),
        "cache_bytes": stats.prefix_bytes,
        "cache_budget_bytes": stats.prefix_budget_bytes,
        "cache_evictions": stats.prefix_evictions,
        "rows": {k: [list(r) for r in v] for k, v in phases.items()},
    }

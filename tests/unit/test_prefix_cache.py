"""Prompt caching in the engine: prefix KV reused across requests changes no output."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from contract.jobs import SamplingParams
from contract.prefix_routing import block_keys
from workers.backends.seam import Finished, Generation, Submission, TextChunk
from workers.backends.transformers.engine import TransformersEngine
from workers.backends.transformers.prefix_cache import PrefixCache

SYSTEM = (
    "You are a careful assistant for a shipping company. Answer with the tracking rules, the "
    "customs forms and the delivery windows that apply, and never guess a date. "
) * 6
TURNS = [
    "Where is parcel 4471?",
    "And when will it arrive in Lyon, given the strike on Thursday?",
    "Please list the customs forms again, numbered.",
]
BLOCK = 16


def greedy(n: int = 64) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0)


def run(engine: TransformersEngine, rid: str, ids: list[int], cacheable: int) -> Generation:
    generation = engine.submit(Submission(rid, ids, greedy(), cache_prefix_tokens=cacheable))
    events = list(generation.events(timeout=120))
    assert isinstance(events[-1], Finished), events[-1]
    assert all(isinstance(e, TextChunk) for e in events[:-1])
    return generation


def conversation(engine: TransformersEngine, turns: int) -> list[int]:
    messages = [("user", t) for t in TURNS[:turns]]
    return engine.renderer.encode(engine.renderer.render(SYSTEM, messages))


@pytest.fixture(scope="module")
def plain(tiny_model_dir: Path) -> Iterator[TransformersEngine]:
    engine = TransformersEngine.load(tiny_model_dir, max_batch=4)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def cached(tiny_model_dir: Path) -> Iterator[TransformersEngine]:
    engine = TransformersEngine.load(
        tiny_model_dir, max_batch=4, prefix_cache_bytes=64 << 20, prefix_block_tokens=BLOCK
    )
    yield engine
    engine.stop()


def test_block_keys_chain_the_whole_prefix() -> None:
    a = block_keys(list(range(100)), 100, 16)
    b = block_keys([*range(40), 999, *range(41, 100)], 100, 16)
    assert len(a) == 6  # full blocks only
    assert a[:2] == b[:2] and all(x != y for x, y in zip(a[2:], b[2:], strict=True))
    assert block_keys(list(range(100)), 50, 16) == a[:3]


def test_greedy_outputs_are_identical_with_and_without_the_cache(
    plain: TransformersEngine, cached: TransformersEngine
) -> None:
    prompts = [conversation(plain, n) for n in (1, 2, 3)]
    assert len(prompts[0]) > 4 * BLOCK
    expected = [run(plain, f"p{i}", ids, 0).token_ids for i, ids in enumerate(prompts)]
    reads = []
    for i, ids in enumerate(prompts):
        generation = run(cached, f"c{i}", ids, len(ids))
        assert generation.token_ids == expected[i], f"turn {i + 1} differs"
        assert len(generation.token_ids) == 64
        assert generation.cache_use is not None
        reads.append(generation.cache_use.read_tokens)
    # Turn 1 stores its prompt; turns 2 and 3 start with it and reuse it.
    assert reads[0] == 0
    assert reads[1] >= (len(prompts[0]) - 1) // BLOCK * BLOCK - BLOCK
    assert reads[2] >= reads[1]
    stats = cached.stats
    assert stats.prefix_hits >= 2 and stats.prefix_read_tokens == sum(reads)


def test_hits_and_misses_together_in_one_batch(
    plain: TransformersEngine, cached: TransformersEngine
) -> None:
    ids = conversation(plain, 3)
    others = [
        plain.renderer.encode(plain.renderer.render(None, [("user", f"Count to {n}")]))
        for n in (3, 7)
    ]
    expected = [run(plain, f"pb{i}", p, 0).token_ids for i, p in enumerate([ids, *others])]
    run(cached, "warm", ids, len(ids))
    generations = [
        cached.submit(Submission(f"cb{i}", p, greedy(), cache_prefix_tokens=len(p)))
        for i, p in enumerate([ids, *others])
    ]
    for generation in generations:
        list(generation.events(timeout=120))
    assert [g.token_ids for g in generations] == expected
    assert generations[0].cache_use is not None and generations[0].cache_use.read_tokens > 0


def test_nothing_is_read_or_stored_without_a_cacheable_prefix(
    cached: TransformersEngine,
) -> None:
    ids = [5, 6, 7] * 40
    before = cached.stats.prefix_stored_tokens
    generation = run(cached, "none", ids, 0)
    assert generation.cache_use is not None
    assert (generation.cache_use.read_tokens, generation.cache_use.write_tokens) == (0, 0)
    assert cached.stats.prefix_stored_tokens == before


def _layers(length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(1, 2, length, 4), torch.randn(1, 2, length, 4)) for _ in range(2)]


def test_eviction_is_least_recently_used_and_spares_pinned_blocks() -> None:
    per_token = 2 * 2 * 2 * 4 * 4  # layers x (k, v) x kv_heads x head_dim x float32
    cache = PrefixCache(budget_bytes=4 * 8 * per_token, bytes_per_token=per_token, block_tokens=8)
    a, b, c = ([n] * 17 for n in (1, 2, 3))  # two blocks each (one token left to prefill)
    for ids in (a, b):
        plan = cache.plan(ids, 17)
        assert plan.write_tokens == 16
        cache.store(plan, _layers(17), 0)
    assert cache.stats().blocks == 4
    reader = cache.plan(a, 17)  # `a` is now the most recently used, and pinned
    assert reader.read_tokens == 16
    plan = cache.plan(c, 17)
    assert plan.write_tokens == 16  # room: b's blocks may go
    cache.store(plan, _layers(17), 0)
    stats = cache.stats()
    assert stats.evictions == 2 and stats.blocks == 4 and stats.bytes <= stats.budget_bytes
    assert cache.plan(b, 17).read_tokens == 0
    # Everything is pinned now (a by `reader`, c by a new reader): nothing more is planned.
    pinned_c = cache.plan(c, 17)
    assert pinned_c.read_tokens == 16
    assert cache.plan([4] * 17, 17).write_tokens == 0
    cache.release(reader)
    cache.release(pinned_c)
    assert cache.plan([4] * 17, 17).write_tokens == 16

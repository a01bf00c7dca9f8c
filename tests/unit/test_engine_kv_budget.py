"""Memory-aware admission: the engine takes sequences while the padded KV cache fits its budget.

The tiny model's cache takes 4 layers x 2 (keys, values) x 2 heads x 64 x 4 bytes = 4 KiB a
token. Requests are submitted before the stepping thread starts, so the first admission sees
them all and the batch sizes below are exact.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from contract.jobs import SamplingParams
from tests.unit.test_engine import Result, collect, greedy, prompt_ids
from workers.backends.seam import EngineStats, Submission
from workers.backends.transformers.engine import TransformersEngine
from workers.engine_process import EngineProcess

TOKEN_BYTES = 4 * 2 * 2 * 64 * 4


@dataclass
class Budgeted:
    """An engine with a KV budget, not yet stepping, and its stats after every step."""

    engine: TransformersEngine
    seen: list[EngineStats] = field(default_factory=list)

    def run(self, requests: list[tuple[str, list[int], SamplingParams]]) -> list[Result]:
        """Submits every request, then starts stepping; their results."""
        generations = [
            self.engine.submit(Submission(rid, ids, params)) for rid, ids, params in requests
        ]
        self.engine.start()
        return [collect(g) for g in generations]


Factory = Callable[..., Budgeted]


@pytest.fixture
def budgeted(tiny_model_dir: Path) -> Iterator[Factory]:
    made: list[Budgeted] = []

    def make(budget_tokens: int, max_batch: int = 64) -> Budgeted:
        engine = TransformersEngine(
            tiny_model_dir, max_batch=max_batch, kv_budget_bytes=budget_tokens * TOKEN_BYTES
        )
        harness = Budgeted(engine)
        engine.on_events = lambda: harness.seen.append(engine.stats)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.engine.stop()


def test_bytes_per_token_is_what_a_prefill_really_caches(tiny_model_dir: Path) -> None:
    engine = TransformersEngine(tiny_model_dir, kv_budget_bytes=100 * TOKEN_BYTES)
    ids = torch.tensor([prompt_ids(engine, "Hello there, how are you?")])
    cache = DynamicCache()
    with torch.inference_mode():
        engine.model(input_ids=ids, cache=cache, use_cache=True)
    cached = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert engine.kv_bytes_per_token == TOKEN_BYTES == cached // ids.shape[1]
    stats = engine.stats
    assert (stats.kv_bytes_per_token, stats.kv_budget_tokens) == (TOKEN_BYTES, 100)
    assert stats.kv_capacity_tokens == 100  # the budget, below max_batch x context


def test_the_budget_caps_the_batch_and_the_rest_wait(budgeted: Factory) -> None:
    harness = budgeted(budget_tokens=3 * 60)
    engine = harness.engine
    ids = prompt_ids(engine, "What is 2 + 2?")
    reserve = len(ids) + 12
    assert reserve <= 60
    # Each request reserves its prompt + max_tokens: three fit in the budget, five were sent.
    requests = [(f"r{i}", ids, greedy(60 - len(ids))) for i in range(5)]
    results = harness.run(requests)
    seen = harness.seen
    assert max(s.active for s in seen) == 3
    assert seen[0].waiting == 2
    assert max(s.kv_reserved_tokens for s in seen) <= 3 * 60
    assert all(s.kv_allocated_tokens <= s.kv_reserved_tokens for s in seen)
    assert engine.stats.max_batch_seen == 3
    assert len({tuple(r.ids) for r in results}) == 1  # same prompt, same greedy output


def test_short_sequences_batch_past_sixteen(budgeted: Factory) -> None:
    probe = budgeted(budget_tokens=1)
    ids = prompt_ids(probe.engine, "x")
    # Room for exactly 40 rows of prompt + 4 new tokens; 50 are sent.
    harness = budgeted(budget_tokens=40 * (len(ids) + 4), max_batch=64)
    harness.run([(f"s{i}", ids, greedy(4)) for i in range(50)])
    assert harness.engine.stats.max_batch_seen == 40


def test_padding_counts_a_long_row_against_every_short_one(budgeted: Factory) -> None:
    harness = budgeted(budget_tokens=2 * 200)
    engine = harness.engine
    long_ids = prompt_ids(engine, "Tell me about time zones and leap seconds. " * 6)
    short_ids = prompt_ids(engine, "x")
    long_max = 200 - len(long_ids)
    assert long_max > 0
    # Reserves: 200, then 3 x ~20. By real tokens all four fit in 400; padded to the long
    # row's width, only one short one does (2 x 200), the others wait for the long one.
    requests = [("long", long_ids, greedy(long_max))]
    requests += [(f"short{i}", short_ids, greedy(8)) for i in range(3)]
    harness.run(requests)
    seen = harness.seen
    assert seen[0].active == 2 and seen[0].waiting == 2
    assert max(s.kv_reserved_tokens for s in seen) <= 400


def test_a_request_larger_than_the_budget_runs_alone(budgeted: Factory) -> None:
    harness = budgeted(budget_tokens=10)
    ids = prompt_ids(harness.engine, "Hello there, how are you?")
    results = harness.run([("big", ids, greedy(6)), ("next", ids, greedy(6))])
    assert harness.engine.stats.max_batch_seen == 1
    assert results[0].ids == results[1].ids and len(results[0].ids) == 6


def test_the_engine_process_takes_the_budget_and_reports_it(tiny_model_dir: Path) -> None:
    engine = EngineProcess.load(tiny_model_dir, kv_budget_bytes=100 * TOKEN_BYTES)
    try:
        stats = engine.stats
        assert (stats.kv_budget_tokens, stats.kv_bytes_per_token) == (100, TOKEN_BYTES)
        assert stats.kv_capacity_tokens == 100
    finally:
        engine.stop()

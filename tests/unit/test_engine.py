import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from contract.jobs import SamplingParams
from workers.backends.seam import Failed, Finished, Generation, Submission, TextChunk
from workers.backends.transformers.engine import TransformersEngine
from workers.backends.transformers.kv_batch import BatchCache

PROMPTS = [
    "Hello there, how are you?",
    "Write a function that sorts a list of numbers in Python, please.",
    "x",
    "Tell me about time zones, daylight saving, and leap seconds in great detail. " * 4,
    "What is 2 + 2?",
    "import os\nimport sys\n\ndef main():\n",
]


@dataclass
class Result:
    text: str
    final: Finished | Failed
    chunks: list[TextChunk]
    ids: list[int]


def collect(generation: Generation) -> Result:
    events = list(generation.events(timeout=60))
    chunks = [e for e in events if isinstance(e, TextChunk)]
    final = events[-1]
    assert isinstance(final, Finished | Failed)
    counts = [c.output_tokens for c in chunks]
    assert counts == sorted(counts)
    return Result("".join(c.text for c in chunks), final, chunks, list(generation.token_ids))


def greedy(max_tokens: int = 24, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[TransformersEngine]:
    engine = TransformersEngine.load(tiny_model_dir, max_batch=8)
    yield engine
    engine.stop()


def prompt_ids(engine: TransformersEngine, text: str) -> list[int]:
    return engine.renderer.encode(engine.renderer.render(None, [("user", text)]))


def alone(engine: TransformersEngine, text: str, params: SamplingParams, rid: str) -> Result:
    return collect(engine.submit(Submission(rid, prompt_ids(engine, text), params)))


def wait_idle(engine: TransformersEngine) -> None:
    deadline = time.monotonic() + 10
    while engine.stats.active or engine.stats.waiting:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_greedy_alone_equals_transformers_generate(engine: TransformersEngine) -> None:
    ids = prompt_ids(engine, PROMPTS[1])
    with torch.inference_mode():
        out = engine.model.generate(
            torch.tensor([ids]), max_new_tokens=24, do_sample=False, min_new_tokens=24
        )
    expected = out[0, len(ids) :].tolist()
    result = collect(engine.submit(Submission("hf", ids, greedy(24))))
    assert result.ids == expected
    assert result.text == engine.renderer.decode(expected)


def test_concurrent_requests_share_a_batch_and_get_their_own_text(
    engine: TransformersEngine,
) -> None:
    solo = [alone(engine, p, greedy(), f"solo-{i}") for i, p in enumerate(PROMPTS)]
    assert len({r.text for r in solo}) > 1  # the prompts lead to different outputs
    before = engine.stats
    generations = [
        engine.submit(Submission(f"batch-{i}", prompt_ids(engine, p), greedy()))
        for i, p in enumerate(PROMPTS)
    ]
    batched = [collect(g) for g in generations]
    assert engine.stats.max_batch_seen > 1
    assert engine.stats.finished - before.finished == len(PROMPTS)
    for one, many in zip(solo, batched, strict=True):
        assert many.ids == one.ids
        assert many.text == one.text
        assert many.final == one.final == Finished("max_tokens", None, 24, False)


def test_requests_joining_and_leaving_mid_batch_match_greedy_alone(
    engine: TransformersEngine,
) -> None:
    # Long enough that the shared cache outgrows its spare room while rows come and go.
    plans = [(PROMPTS[3], 100), (PROMPTS[2], 12), (PROMPTS[5], 80), (PROMPTS[0], 20)]
    solo = [alone(engine, p, greedy(n), f"ref-{i}") for i, (p, n) in enumerate(plans)]
    generations: list[Generation] = []
    results: list[Result] = []
    first = engine.submit(
        Submission("late-0", prompt_ids(engine, plans[0][0]), greedy(plans[0][1]))
    )
    generations.append(first)
    # Let the first decode a while before each newcomer arrives, so they join a running batch.
    seen: list[TextChunk] = []
    for i, (text, n) in enumerate(plans[1:], start=1):
        while not seen or seen[-1].output_tokens < 4 * i:
            event = first.get(timeout=30)
            assert isinstance(event, TextChunk)
            seen.append(event)
        generations.append(
            engine.submit(Submission(f"late-{i}", prompt_ids(engine, text), greedy(n)))
        )
    results = [collect(g) for g in generations]
    results[0].text = "".join(e.text for e in seen) + results[0].text
    assert engine.stats.max_batch_seen >= 3
    for one, many in zip(solo, results, strict=True):
        assert many.ids == one.ids
        assert many.text == one.text
    wait_idle(engine)


def test_max_tokens_stop_reason_and_count(engine: TransformersEngine) -> None:
    result = alone(engine, PROMPTS[0], greedy(5), "max")
    assert result.final == Finished("max_tokens", None, 5, False)
    assert len(result.ids) == 5
    assert result.chunks[-1].output_tokens <= 5


def test_stop_sequence_cuts_text_and_reports_it(engine: TransformersEngine) -> None:
    full = alone(engine, PROMPTS[1], greedy(40), "full")
    stop = full.text[12:16]
    assert stop.strip()
    cut = alone(engine, PROMPTS[1], greedy(40, stop_sequences=["never-there", stop]), "cut")
    assert cut.text == full.text[: full.text.index(stop)]
    assert isinstance(cut.final, Finished)
    assert (cut.final.stop_reason, cut.final.stop_sequence) == ("stop_sequence", stop)
    assert cut.final.output_tokens == len(cut.ids) < 40
    assert cut.ids == full.ids[: len(cut.ids)]


def test_end_of_turn_token_ends_the_request(engine: TransformersEngine) -> None:
    reference = alone(engine, PROMPTS[4], greedy(30), "eos-ref")
    # Pretend the 6th generated token is the model's end-of-turn token.
    eos = reference.ids[5]
    saved = engine.eos_token_ids
    engine.eos_token_ids = frozenset({eos})
    try:
        result = alone(engine, PROMPTS[4], greedy(30), "eos")
    finally:
        engine.eos_token_ids = saved
    n = reference.ids.index(eos) + 1
    assert result.final == Finished("end_turn", None, n, False)  # eos counts as output
    assert result.text == engine.renderer.decode(reference.ids[: n - 1])  # but is not text


def test_cancel_frees_the_slot(engine: TransformersEngine) -> None:
    generation = engine.submit(
        Submission("cancel-me", prompt_ids(engine, PROMPTS[0]), greedy(1500))
    )
    first = generation.get(timeout=30)
    assert isinstance(first, TextChunk)
    assert engine.cancel("cancel-me")
    events = list(generation.events(timeout=30))
    final = events[-1]
    assert isinstance(final, Finished)
    assert final.cancelled and final.stop_reason is None
    assert 0 < final.output_tokens < 1500
    assert final.output_tokens == len(generation.token_ids)
    assert engine.stats.active == 0
    assert not engine.cancel("cancel-me")  # already gone
    assert not engine.cancel("never-submitted")


def test_cancel_while_waiting(tiny_model_dir: Path) -> None:
    engine = TransformersEngine(tiny_model_dir, max_batch=1)  # not started: requests stay queued
    try:
        generation = engine.submit(Submission("queued", [1, 2, 3], greedy(5)))
        assert engine.stats.waiting == 1
        assert engine.cancel("queued")
        engine.start()
        assert collect(generation).final == Finished(None, None, 0, True)
        assert engine.stats.cancelled == 1
    finally:
        engine.stop()


def test_sampling_varies_while_greedy_is_deterministic(engine: TransformersEngine) -> None:
    sampled = SamplingParams(max_tokens=16, temperature=1.0)
    a = alone(engine, PROMPTS[0], sampled, "t1-a")
    b = alone(engine, PROMPTS[0], sampled, "t1-b")
    assert a.ids != b.ids
    g1 = alone(engine, PROMPTS[0], greedy(16), "t0-a")
    g2 = alone(engine, PROMPTS[0], greedy(16), "t0-b")
    assert g1.ids == g2.ids and g1.text == g2.text


def test_top_k_1_equals_greedy(engine: TransformersEngine) -> None:
    reference = alone(engine, PROMPTS[5], greedy(16), "k-ref")
    params = SamplingParams(max_tokens=16, temperature=1.5, top_k=1)
    assert alone(engine, PROMPTS[5], params, "k1").ids == reference.ids
    tiny_p = SamplingParams(max_tokens=16, temperature=1.0, top_p=1e-6)
    assert alone(engine, PROMPTS[5], tiny_p, "p0").ids == reference.ids


@pytest.mark.parametrize(
    ("ids", "message"),
    [([], "empty"), ([1] * 70_000, "context window"), ([1, 99_999], "vocabulary")],
)
def test_bad_prompts_fail_without_running(
    engine: TransformersEngine, ids: list[int], message: str
) -> None:
    result = collect(engine.submit(Submission("bad", ids, greedy(4))))
    assert isinstance(result.final, Failed)
    assert message in result.final.message


def test_duplicate_request_id_is_refused(engine: TransformersEngine) -> None:
    generation = engine.submit(Submission("dup", prompt_ids(engine, PROMPTS[0]), greedy(200)))
    with pytest.raises(ValueError, match="already"):
        engine.submit(Submission("dup", prompt_ids(engine, PROMPTS[0]), greedy(4)))
    engine.cancel("dup")
    assert isinstance(collect(generation).final, Finished)


def test_drain_returns_queued_events_without_blocking(engine: TransformersEngine) -> None:
    generation = engine.submit(Submission("drain", prompt_ids(engine, PROMPTS[0]), greedy(8)))
    events: list[object] = []
    deadline = time.monotonic() + 30
    while not events or not isinstance(events[-1], Finished):
        assert time.monotonic() < deadline
        events += generation.drain()
        time.sleep(0.005)
    assert generation.drain() == []
    assert generation.get(timeout=0.01) is None
    assert sum(isinstance(e, Finished) for e in events) == 1


def test_a_failing_forward_fails_its_requests_and_the_engine_goes_on(
    engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_forward = engine._forward
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] in (1, 3):  # the first prefill, then a decode step
            raise RuntimeError("boom")
        return real_forward(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "_forward", flaky)
    prefill_fails = collect(
        engine.submit(Submission("f1", prompt_ids(engine, PROMPTS[0]), greedy(8)))
    )
    assert isinstance(prefill_fails.final, Failed) and "boom" in prefill_fails.final.message
    decode_fails = collect(
        engine.submit(Submission("f2", prompt_ids(engine, PROMPTS[0]), greedy(8)))
    )
    assert isinstance(decode_fails.final, Failed) and "boom" in decode_fails.final.message
    monkeypatch.setattr(engine, "_forward", real_forward)
    assert collect(
        engine.submit(Submission("f3", prompt_ids(engine, PROMPTS[0]), greedy(8)))
    ).final == (Finished("max_tokens", None, 8, False))
    assert engine.stats.active == 0


def test_batch_cache_pads_new_rows_and_trims_after_leaving() -> None:
    def prefill_cache(length: int, fill: float) -> DynamicCache:
        cache = DynamicCache()
        cache.update(torch.full((1, 2, length, 4), fill), torch.full((1, 2, length, 4), -fill), 0)
        return cache

    kv = BatchCache()
    kv.join([prefill_cache(3, 1.0)])
    kv.join([prefill_cache(5, 2.0), prefill_cache(2, 3.0)])
    assert (len(kv), kv.width, kv.lengths) == (3, 5, [3, 5, 2])
    assert kv.mask is not None and kv.mask.tolist() == [
        [0, 0, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1],
    ]
    mask, positions = kv.step_inputs()
    assert positions.tolist() == [[3], [5], [2]]
    assert kv.cache is not None
    kv.cache.update(torch.zeros(3, 2, 1, 4), torch.zeros(3, 2, 1, 4), 0)
    kv.advance(mask)
    assert (kv.width, kv.lengths) == (6, [4, 6, 3])
    kv.keep([0, 2])  # the longest row leaves: two all-padding columns go with it
    assert (kv.width, kv.lengths) == (4, [4, 3])
    assert kv.mask is not None and kv.mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    keys = kv.cache.layers[0].keys
    assert keys.shape == (2, 2, 4, 4)
    assert keys[0, 0, :, 0].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert keys[1, 0, 1:, 0].tolist() == [3.0, 3.0, 0.0]
    kv.keep([])
    assert (len(kv), kv.width, kv.cache) == (0, 0, None)


def _spy_batched_prefills(engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the size of every batched prefill (the real one runs)."""
    sizes: list[int] = []
    real = engine._prefill_batch

    def spy(prompts: list[list[int]]) -> object:
        sizes.append(len(prompts))
        return real(prompts)

    monkeypatch.setattr(engine, "_prefill_batch", spy)
    return sizes


def test_newcomers_prefilled_together_match_greedy_alone(
    engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prompts of different lengths, so the batched prefill pads some rows; one of them ends at
    # its first token (max_tokens 1) and must leave before the others join the batch.
    plans = [
        (PROMPTS[0], 30),
        (PROMPTS[3], 20),
        (PROMPTS[2], 1),
        (PROMPTS[4], 25),
        (PROMPTS[1], 20),
    ]
    solo = [alone(engine, p, greedy(n), f"pb-solo-{i}") for i, (p, n) in enumerate(plans)]
    sizes = _spy_batched_prefills(engine, monkeypatch)
    # A running request keeps the stepping thread busy; the rest arrive during one of its
    # steps, wait together, and are admitted together at the next.
    first = engine.submit(Submission("pb-0", prompt_ids(engine, plans[0][0]), greedy(plans[0][1])))
    assert isinstance(first.get(timeout=30), TextChunk)
    rest = [
        engine.submit(Submission(f"pb-{i}", prompt_ids(engine, p), greedy(n)))
        for i, (p, n) in enumerate(plans[1:], start=1)
    ]
    results = [collect(g) for g in rest]
    assert sizes and max(sizes) >= 2
    for one, many in zip(solo[1:], results, strict=True):
        assert (many.ids, many.text, many.final) == (one.ids, one.text, one.final)
    collect(first)
    wait_idle(engine)


def test_a_failing_batched_prefill_retries_each_alone(
    engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[int] = []

    def broken(prompts: list[list[int]]) -> object:
        attempts.append(len(prompts))
        raise RuntimeError("batched prefill failed")

    monkeypatch.setattr(engine, "_prefill_batch", broken)
    solo = [alone(engine, p, greedy(12), f"fb-solo-{i}") for i, p in enumerate(PROMPTS[:4])]
    first = engine.submit(Submission("fb-first", prompt_ids(engine, PROMPTS[5]), greedy(40)))
    assert isinstance(first.get(timeout=30), TextChunk)
    rest = [
        engine.submit(Submission(f"fb-{i}", prompt_ids(engine, p), greedy(12)))
        for i, p in enumerate(PROMPTS[:4])
    ]
    for one, many in zip(solo, [collect(g) for g in rest], strict=True):
        assert (many.ids, many.final) == (one.ids, one.final)
    assert attempts and max(attempts) >= 2
    collect(first)
    wait_idle(engine)


def test_batch_cache_joins_rows_of_a_padded_prefill() -> None:
    kv = BatchCache()
    one = DynamicCache()
    one.update(torch.full((1, 2, 2, 4), 9.0), torch.full((1, 2, 2, 4), -9.0), 0)
    kv.join([one])
    # Three rows of a batched prefill, width 4; row 1 is the longest and does not join, so
    # one column that is padding in both joining rows goes.
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])
    keys = torch.arange(3 * 2 * 4 * 4, dtype=torch.float32).reshape(3, 2, 4, 4) + 1
    kv.join_padded([(keys, -keys)], mask, [0, 2])
    assert (len(kv), kv.width, kv.lengths) == (3, 3, [2, 3, 2])
    assert kv.mask is not None and kv.mask.tolist() == [[0, 1, 1], [1, 1, 1], [0, 1, 1]]
    assert kv.cache is not None
    joined = kv.cache.layers[0].keys
    assert joined[1, 0, :, 0].tolist() == keys[0, 0, 1:, 0].tolist()
    # Padding positions are zeros, whatever the prefill computed there.
    assert joined[2, 0, 0, :].tolist() == [0.0] * 4
    assert joined[2, 0, 1:, 0].tolist() == keys[2, 0, 2:, 0].tolist()
    assert kv.cache.layers[0].values[2, 0, 0, :].tolist() == [0.0] * 4

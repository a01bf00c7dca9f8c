"""Chunked prefill: a long prompt is prefilled a chunk per step while the batch keeps decoding.

The engine is stepped by hand (no stepping thread), so what each step does is exact.
"""

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from contract.jobs import SamplingParams
from tests.unit.test_engine import collect, greedy, prompt_ids
from workers.backends.seam import Constraint, Finished, Submission, TextChunk
from workers.backends.transformers.engine import TransformersEngine

CHUNK = 32


def step(engine: TransformersEngine) -> None:
    """One iteration of the stepping thread's loop."""
    with engine._cond:
        cancels, engine._cancel = engine._cancel, set()
        admitted = engine._admit(cancels)
    engine._step(cancels, admitted)
    engine._publish_finals()


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[TransformersEngine]:
    engine = TransformersEngine(tiny_model_dir, max_batch=4, prefill_chunk_tokens=CHUNK)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def whole(tiny_model_dir: Path) -> Iterator[TransformersEngine]:
    """The same model prefilling every prompt in one forward."""
    engine = TransformersEngine.load(tiny_model_dir, max_batch=4, prefill_chunk_tokens=1 << 30)
    yield engine
    engine.stop()


def long_prompt(engine: TransformersEngine) -> list[int]:
    ids = prompt_ids(engine, "Tell me everything about the history of clocks. " * 12)
    assert len(ids) > 4 * CHUNK
    return ids


def test_the_batch_decodes_while_a_long_prompt_prefills(engine: TransformersEngine) -> None:
    short = engine.submit(Submission("short", prompt_ids(engine, "Hi"), greedy(64)))
    step(engine)
    assert len(short.token_ids) == 2  # its prefill's token, then one decode step
    ids = long_prompt(engine)
    long = engine.submit(Submission("long", ids, greedy(8)))
    chunks = -(-len(ids) // CHUNK)
    for n in range(1, chunks):
        step(engine)
        assert long.token_ids == []  # still prefilling: chunk n of `chunks`
        assert len(short.token_ids) == 2 + n  # ... and the short one got a token each step
        assert engine.stats.active == 2
    step(engine)  # the last chunk: its first token, then it decodes with the batch
    assert len(long.token_ids) == 2
    assert len(short.token_ids) == 2 + chunks
    while engine.stats.active:
        step(engine)
    for generation in (short, long):
        assert isinstance(generation.drain()[-1], Finished)


def test_a_chunked_prefill_generates_what_a_whole_one_does(
    engine: TransformersEngine, whole: TransformersEngine
) -> None:
    ids = long_prompt(engine)
    expected = collect(whole.submit(Submission("whole", ids, greedy(16)))).ids
    chunked = engine.submit(Submission("chunked", ids, greedy(16)))
    while engine.stats.active or engine.stats.waiting:
        step(engine)
    events = chunked.drain()
    assert isinstance(events[-1], Finished)
    assert chunked.token_ids == expected
    text = "".join(e.text for e in events if isinstance(e, TextChunk))
    assert text == engine.renderer.decode(expected)


def test_a_cancel_during_a_chunked_prefill_frees_it(engine: TransformersEngine) -> None:
    long = engine.submit(Submission("cancelled", long_prompt(engine), greedy(8)))
    step(engine)
    assert engine.stats.active == 1
    assert engine.cancel("cancelled")
    step(engine)
    final = long.drain()[-1]
    assert isinstance(final, Finished) and final.cancelled
    assert engine.stats.active == 0 and long.token_ids == []


def test_a_constrained_long_prompt_is_masked_from_its_first_token(
    engine: TransformersEngine,
) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 9}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    params = SamplingParams(max_tokens=40, temperature=1.0)
    generation = engine.submit(
        Submission("json", long_prompt(engine), params, constraint=Constraint("json", schema))
    )
    while engine.stats.active or engine.stats.waiting:
        step(engine)
    events = generation.drain()
    final = events[-1]
    assert isinstance(final, Finished) and final.stop_reason == "end_turn"
    text = "".join(e.text for e in events if isinstance(e, TextChunk))
    jsonschema.validate(json.loads(text), schema)


def test_a_long_prompt_alone_is_prefilled_by_the_stepping_thread(tiny_model_dir: Path) -> None:
    """Nothing else running or waiting: the thread still steps through every chunk (it once
    waited for idle capacity instead, so a lone long prompt never got its first token)."""
    engine = TransformersEngine.load(tiny_model_dir, max_batch=4, prefill_chunk_tokens=CHUNK)
    try:
        result = collect(engine.submit(Submission("alone", long_prompt(engine), greedy(4))))
        assert isinstance(result.final, Finished) and len(result.ids) == 4
    finally:
        engine.stop()

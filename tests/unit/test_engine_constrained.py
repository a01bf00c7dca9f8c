"""Grammar-constrained rows inside the engine's continuous batch (issue 14).

Forced tool calls and structured outputs share a batch with free-text rows; each constrained
output is complete and valid against its schema (jsonschema), within its max_tokens, and the
free-text rows decode exactly as they would alone.
"""

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from contract.jobs import SamplingParams
from contract.toolcalls import ToolCallEnd, ToolCallParser
from tests.unit.grammar_schemas import OUTPUTS, TOOLS
from tests.unit.test_engine import collect, greedy, prompt_ids
from workers.backends.seam import Constraint, Failed, Finished, Submission
from workers.backends.transformers.engine import TransformersEngine

MAX_TOKENS = 200


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[TransformersEngine]:
    engine = TransformersEngine.load(tiny_model_dir, max_batch=12)
    yield engine
    engine.stop()


def hot(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0)


def call_of(text: str) -> ToolCallEnd:
    events = [*(parser := ToolCallParser(TOOLS)).feed(text), *parser.finish()]
    calls = [e for e in events if isinstance(e, ToolCallEnd)]
    assert len(calls) == 1 and calls[0].complete, text
    return calls[0]


def test_constrained_and_free_rows_share_a_batch(engine: TransformersEngine) -> None:
    ids = prompt_ids(engine, "Plan my week.")
    free_alone = collect(engine.submit(Submission("free-alone", ids, greedy(40))))
    submissions: list[tuple[Submission, object]] = []
    for i in range(4):
        name = list(TOOLS)[i % len(TOOLS)]
        tool = Constraint("tool_call", tools=TOOLS, name=name)
        submissions.append((Submission(f"tool-{i}", ids, hot(), constraint=tool), name))
        anyone = Constraint("tool_call", tools=TOOLS)
        submissions.append((Submission(f"any-{i}", ids, hot(), constraint=anyone), None))
        schema = OUTPUTS[i % len(OUTPUTS)]
        json_row = Constraint("json", schema=schema)
        submissions.append((Submission(f"json-{i}", ids, hot(), constraint=json_row), schema))
    free = Submission("free", ids, greedy(40))
    generations = [engine.submit(s) for s, _ in submissions]
    free_generation = engine.submit(free)
    for (submission, target), generation in zip(submissions, generations, strict=True):
        result = collect(generation)
        assert isinstance(result.final, Finished), result.final
        assert result.final.stop_reason == "end_turn", (submission.request_id, result.text)
        assert result.final.output_tokens <= MAX_TOKENS
        if submission.constraint and submission.constraint.kind == "json":
            jsonschema.validate(json.loads(result.text), target)  # type: ignore[arg-type]
        else:
            call = call_of(result.text)
            assert target is None or call.name == target
            jsonschema.validate(call.input, TOOLS[call.name])
    # The free row shared its batch with grammar rows and decoded exactly as alone.
    free_result = collect(free_generation)
    assert free_result.ids == free_alone.ids
    assert engine.stats.max_batch_seen >= 8
    compiled = engine.grammars.compiled
    assert compiled is not None and compiled.misses <= len(TOOLS) + 1 + len(OUTPUTS)


def test_a_constraint_closes_within_a_small_budget(engine: TransformersEngine) -> None:
    ids = prompt_ids(engine, "Weather?")
    for i in range(6):
        tool = Constraint("tool_call", tools=TOOLS, name="get_weather")
        result = collect(engine.submit(Submission(f"small-{i}", ids, hot(90), constraint=tool)))
        assert isinstance(result.final, Finished) and result.final.stop_reason == "end_turn"
        assert len(result.ids) <= 90
        jsonschema.validate(call_of(result.text).input, TOOLS["get_weather"])


def test_greedy_constrained_rows_are_deterministic(engine: TransformersEngine) -> None:
    ids = prompt_ids(engine, "Describe it.")
    schema = OUTPUTS[0]
    texts = {
        collect(
            engine.submit(
                Submission(
                    f"det-{i}", ids, greedy(80), constraint=Constraint("json", schema=schema)
                )
            )
        ).text
        for i in range(2)
    }
    assert len(texts) == 1
    jsonschema.validate(json.loads(texts.pop()), schema)


def test_a_budget_too_small_for_the_schema_fails_before_running(
    engine: TransformersEngine,
) -> None:
    ids = prompt_ids(engine, "x")
    tool = Constraint("tool_call", tools=TOOLS, name="create_event")
    result = collect(engine.submit(Submission("tiny", ids, hot(4), constraint=tool)))
    assert isinstance(result.final, Failed)
    assert result.final.error_type == "invalid_request_error"
    assert result.final.message.startswith("max_tokens 4 is too small for the required output")
    assert result.ids == []


def test_unconstrained_batches_never_build_grammar_state(tiny_model_dir: Path) -> None:
    engine = TransformersEngine.load(tiny_model_dir, max_batch=4)
    try:
        ids = prompt_ids(engine, "Hello")
        for i in range(3):
            collect(engine.submit(Submission(f"plain-{i}", ids, greedy(8))))
        assert engine.grammars.compiled is None  # no tokenizer view, no masks, no thread
    finally:
        engine.stop()

"""Constrained answers through the official SDK, beyond tests/e2e/test_agents_sdk.py: the stream
of a forced call event by event, create and stream agreeing, stop sequences and budgets."""

import json
from typing import Any

import anthropic
import jsonschema
import pytest

from tests.e2e.test_agents_sdk import ANSWER_SCHEMA, CLOCK, MODEL, WEATHER, ask

FORCED: dict[str, Any] = {
    "model": MODEL,
    "max_tokens": 200,
    "extra_body": {"temperature": 0},
    "messages": ask("What is the weather in Paris?"),
    "tools": [WEATHER, CLOCK],
    "tool_choice": {"type": "tool", "name": "get_weather"},
}


def test_a_forced_call_streams_as_anthropic_streams_tool_use(client: anthropic.Anthropic) -> None:
    with client.messages.stream(**FORCED) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    starts = [e for e in events if e.type == "content_block_start"]
    assert len(starts) == 1 and starts[0].index == 0
    block = starts[0].content_block
    assert block.type == "tool_use" and block.name == "get_weather"
    assert block.id.startswith("toolu_") and len(block.id) == len("toolu_") + 24
    deltas = [e for e in events if e.type == "content_block_delta"]
    assert deltas and all(d.delta.type == "input_json_delta" for d in deltas)
    streamed = json.loads("".join(d.delta.partial_json for d in deltas))  # type: ignore[union-attr]
    jsonschema.validate(streamed, WEATHER["input_schema"])
    stops = [e for e in events if e.type == "content_block_stop"]
    assert [s.index for s in stops] == [0]
    (delta,) = [e for e in events if e.type == "message_delta"]
    assert delta.delta.stop_reason == "tool_use"
    assert final.stop_reason == "tool_use" and final.content[0].input == streamed  # type: ignore[union-attr]
    # Greedy: the same call without streaming (ids are fresh per answer).
    created = client.messages.create(**FORCED)
    assert created.stop_reason == "tool_use"
    assert [b.input for b in created.content] == [streamed]  # type: ignore[union-attr]
    assert created.usage.output_tokens == final.usage.output_tokens


def test_the_tool_result_follow_up_runs(client: anthropic.Anthropic) -> None:
    first = client.messages.create(**FORCED)
    call = first.content[0]
    assert call.type == "tool_use"
    follow_up = client.messages.create(
        model=MODEL,
        max_tokens=16,
        tools=[WEATHER, CLOCK],
        messages=[
            *FORCED["messages"],
            {"role": "assistant", "content": [call.model_dump()]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "12 C"}],
            },
        ],
    )
    assert follow_up.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert follow_up.usage.output_tokens >= 1


def test_stop_sequences_do_not_cut_structured_output(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=ask("JSON please."),
        stop_sequences=['"', ":", "}"],
        extra_body={"output_config": {"format": {"type": "json_schema", "schema": ANSWER_SCHEMA}}},
    )
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    jsonschema.validate(json.loads(message.content[0].text), ANSWER_SCHEMA)  # type: ignore[union-attr]


def test_max_tokens_too_small_for_a_forced_call_is_a_400(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as raised:
        client.messages.create(**{**FORCED, "max_tokens": 8})
    assert raised.value.status_code == 400
    assert "max_tokens 8 is too small for the required output" in str(raised.value)

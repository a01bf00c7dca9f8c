"""Agents with the official SDK against the real stack: tool calls, tool loops, structured output,
thinking and system messages.

The tests of answers that must be a tool call or JSON (forced calls, `any`, structured output)
need the engine side of issue 14 (grammar masks, tool-call parsing in the worker); the others
need only the API.
"""

import json
from typing import Any

import anthropic
import jsonschema

from tests.support import STACK_MODEL

MODEL = STACK_MODEL
WEATHER: dict[str, Any] = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 40},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
        "additionalProperties": False,
    },
}
CLOCK: dict[str, Any] = {
    "name": "get_time",
    "description": "The time now in a time zone",
    "input_schema": {
        "type": "object",
        "properties": {"zone": {"type": "string", "maxLength": 40}},
        "required": ["zone"],
    },
}
ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 60},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}


def ask(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def test_forced_tool_call_is_a_valid_call(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=ask("What is the weather in Paris?"),
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert message.stop_reason == "tool_use"
    calls = [block for block in message.content if block.type == "tool_use"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert calls[0].id.startswith("toolu_")
    jsonschema.validate(calls[0].input, WEATHER["input_schema"])


def test_any_tool_streams_one_valid_call(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model=MODEL,
        max_tokens=200,
        messages=ask("Weather or time?"),
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    ) as stream:
        final = stream.get_final_message()
    calls = [block for block in final.content if block.type == "tool_use"]
    assert final.stop_reason == "tool_use" and len(calls) == 1
    schema = {"get_weather": WEATHER, "get_time": CLOCK}[calls[0].name]["input_schema"]
    jsonschema.validate(calls[0].input, schema)


def test_structured_output_is_json_valid_against_the_schema(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=ask("Is the sky blue? Answer in JSON."),
        extra_body={"output_config": {"format": {"type": "json_schema", "schema": ANSWER_SCHEMA}}},
    )
    assert [block.type for block in message.content] == ["text"]
    text = message.content[0].text  # type: ignore[union-attr]
    jsonschema.validate(json.loads(text), ANSWER_SCHEMA)


def test_a_tool_loop_round_trip_is_counted_exactly(client: anthropic.Anthropic) -> None:
    call = {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Oslo"}}
    messages: list[Any] = [
        *ask("Weather in Oslo?"),
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, call]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "-3 C"}],
        },
    ]
    answer = client.messages.create(
        model=MODEL, max_tokens=8, messages=messages, tools=[WEATHER, CLOCK]
    )
    counted = client.messages.count_tokens(model=MODEL, messages=messages, tools=[WEATHER, CLOCK])
    assert answer.usage.input_tokens == counted.input_tokens
    assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_thinking_and_a_system_message_are_accepted(client: anthropic.Anthropic) -> None:
    messages: list[Any] = [
        *ask("Hi"),
        {"role": "system", "content": "Answer in one word."},
    ]
    message = client.messages.create(
        model=MODEL,
        max_tokens=8,
        messages=messages,
        extra_body={"thinking": {"type": "adaptive"}, "output_config": {"effort": "low"}},
    )
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert (
        message.usage.input_tokens
        == client.messages.count_tokens(model=MODEL, messages=messages).input_tokens
    )

"""Agent frameworks against the real stack: LangChain's ChatAnthropic and LiteLLM (issue 14).

Forced tool calls and structured output must come back as each framework's own objects (tool
calls with arguments, parsed structured output), valid against their schemas: the engine
generates them under a grammar, so even the random-weight test model gets them right.
"""

import json
import os
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from anthropic.lib._parse._transform import transform_schema

from infra.launcher.stack import Stack
from tests.conftest import ApiAccount
from tests.e2e.test_agents_sdk import ANSWER_SCHEMA, CLOCK, MODEL, WEATHER

# LiteLLM reads its model price map from the network at import unless told to use its own copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

langchain_anthropic = pytest.importorskip("langchain_anthropic")
litellm = pytest.importorskip("litellm")


@pytest.fixture
def chat(stack: Stack, account: ApiAccount) -> Any:
    return langchain_anthropic.ChatAnthropic(
        model=MODEL,
        base_url=stack.base_url,
        api_key=account.key,
        max_tokens=200,
        max_retries=0,
        temperature=1.0,
    )


def test_langchain_bind_tools_with_a_forced_tool(chat: Any) -> None:
    bound = chat.bind_tools([WEATHER, CLOCK], tool_choice="get_weather")
    message = bound.invoke("What is the weather in Paris?")
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call["name"] == "get_weather" and call["id"].startswith("toolu_")
    jsonschema.validate(call["args"], WEATHER["input_schema"])
    assert message.response_metadata["stop_reason"] == "tool_use"


def test_langchain_streams_a_forced_tool_call(chat: Any) -> None:
    bound = chat.bind_tools([WEATHER, CLOCK], tool_choice="any")
    chunks = list(bound.stream("Weather or time?"))
    message = chunks[0]
    for chunk in chunks[1:]:
        message += chunk
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0]
    schema = {"get_weather": WEATHER, "get_time": CLOCK}[call["name"]]["input_schema"]
    jsonschema.validate(call["args"], schema)


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_with_structured_output(chat: Any, method: str) -> None:
    schema = {"title": "Answer", "description": "An answer", **ANSWER_SCHEMA}
    structured = chat.with_structured_output(schema, method=method)
    answer = structured.invoke("Is the sky blue?")
    assert isinstance(answer, dict)
    if method == "json_schema":
        # The SDK sends the schema through `transform_schema`, which moves the keywords Anthropic
        # does not enforce (minimum, maximum, maxLength) into descriptions: the output is valid
        # against what was sent, not against those bounds.
        sent = transform_schema(schema)
        assert "maximum" not in sent["properties"]["confidence"]
        jsonschema.validate(answer, sent)
    else:
        jsonschema.validate(answer, ANSWER_SCHEMA)


def openai_tool(tool: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": tool["name"],
            "description": tool["description"],
            "parameters": tool["input_schema"],
        },
    }


@pytest.fixture
def litellm_args(stack: Stack, account: ApiAccount) -> Iterator[dict[str, Any]]:
    yield {
        "model": f"anthropic/{MODEL}",
        "api_base": stack.base_url,
        "api_key": account.key,
        "max_tokens": 200,
        "num_retries": 0,
    }


def test_litellm_forced_tool_call(litellm_args: dict[str, Any]) -> None:
    response = litellm.completion(
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[openai_tool(WEATHER), openai_tool(CLOCK)],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        **litellm_args,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["input_schema"])


def test_litellm_streams_a_required_tool_call(litellm_args: dict[str, Any]) -> None:
    stream = litellm.completion(
        messages=[{"role": "user", "content": "Weather or time?"}],
        tools=[openai_tool(WEATHER), openai_tool(CLOCK)],
        tool_choice="required",
        stream=True,
        **litellm_args,
    )
    chunks = list(stream)
    built = litellm.stream_chunk_builder(chunks)
    calls = built.choices[0].message.tool_calls
    assert len(calls) == 1
    schema = {"get_weather": WEATHER, "get_time": CLOCK}[calls[0].function.name]["input_schema"]
    jsonschema.validate(json.loads(calls[0].function.arguments), schema)

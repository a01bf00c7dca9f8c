"""Agent requests on the wire: tools, tool history, thinking, system messages, structured output,
Claude Code's first request; what a request turns into (conversation, job fields); aliases."""

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from api.anthropic import sse
from api.anthropic.convert import (
    ThinkingSignatures,
    conversation_of,
    thinking_budget,
    thinking_signature,
    tool_use,
)
from api.anthropic.protocol import CountTokensRequest, MessagesRequest
from api.errors import format_validation_errors
from contract.catalog import DEFAULT_MODEL, Catalog, ModelSpec
from contract.conversation import ToolCall, ToolResult
from contract.events import BlockStartEvent, DeltaEvent
from contract.jobs import ToolSpec, ToolUse

FIXTURES = Path(__file__).parent.parent / "fixtures"
USER_HI = [{"role": "user", "content": "hi"}]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the current weather in a given location",
    "input_schema": {
        "type": "object",
        "properties": {
            "location": {
                "type": "string",
                "description": "The city and state, e.g. San Francisco, CA",
            },
            "unit": {
                "type": "string",
                "enum": ["celsius", "fahrenheit"],
                "description": 'The unit of temperature, either "celsius" or "fahrenheit"',
            },
        },
        "required": ["location"],
    },
}
# Anthropic's tool-use walkthrough, the client's second request (docs: "Tool use").
TOOL_HISTORY = {
    "model": "claude-opus-4-1",
    "max_tokens": 1024,
    "tools": [WEATHER_TOOL],
    "messages": [
        {"role": "user", "content": "What is the weather like in San Francisco?"},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "text",
                    "text": "I need to use get_weather, and the user wants SF, which is likely"
                    " San Francisco, CA.",
                },
                {
                    "type": "tool_use",
                    "id": "toolu_01A09q90qw90lq917835lq9",
                    "name": "get_weather",
                    "input": {"location": "San Francisco, CA", "unit": "celsius"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
                    "content": "15 degrees",
                }
            ],
        },
    ],
}
# Extended thinking with tool use: the thinking blocks come back in the assistant turn.
THINKING_HISTORY = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 16000,
    "thinking": {"type": "enabled", "budget_tokens": 10000},
    "tools": [WEATHER_TOOL],
    "messages": [
        {"role": "user", "content": "What's the weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "thinking",
                    "thinking": "The user wants the weather in Paris. I'll call get_weather.",
                    "signature": "BDaL4VrbR2Oj0hO4XpJxT28J5TILnCrrUXoKiiNBZW9P+nr8XSj1zuZ",
                },
                {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8"},
                {
                    "type": "tool_use",
                    "id": "toolu_01CswdEQBMshySk6Y9DFKrfq",
                    "name": "get_weather",
                    "input": {"location": "Paris"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01CswdEQBMshySk6Y9DFKrfq",
                    "content": [{"type": "text", "text": "Current temperature: 88°F"}],
                    "is_error": False,
                }
            ],
        },
    ],
}


def error_message(body: Any, model: type[MessagesRequest] = MessagesRequest) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return format_validation_errors(info.value.errors())


def round_trip(body: dict[str, Any]) -> MessagesRequest:
    request = MessagesRequest.model_validate(body)
    assert MessagesRequest.model_validate_json(request.model_dump_json()) == request
    return request


# ------------------------------------------------------------------------------ history


def test_tool_history_round_trip_and_conversation() -> None:
    request = round_trip(TOOL_HISTORY)
    turns = conversation_of(request).turns
    assert [t.role for t in turns] == ["user", "assistant", "user"]
    assert turns[1].parts == [
        "I need to use get_weather, and the user wants SF, which is likely San Francisco, CA.",
        ToolCall(
            "toolu_01A09q90qw90lq917835lq9",
            "get_weather",
            {"location": "San Francisco, CA", "unit": "celsius"},
        ),
    ]
    # The result knows which tool it answers (templates print the name).
    assert turns[2].parts == [
        ToolResult("toolu_01A09q90qw90lq917835lq9", "15 degrees", False, "get_weather")
    ]
    assert conversation_of(request).tools[0].description == WEATHER_TOOL["description"]


def test_thinking_history_is_accepted_and_left_out() -> None:
    request = round_trip(THINKING_HISTORY)
    conversation = conversation_of(request)
    assert conversation.thinking
    assistant = conversation.turns[1]
    assert assistant.parts == [
        ToolCall("toolu_01CswdEQBMshySk6Y9DFKrfq", "get_weather", {"location": "Paris"})
    ]
    assert conversation.turns[2].parts == [
        ToolResult(
            "toolu_01CswdEQBMshySk6Y9DFKrfq", "Current temperature: 88°F", False, "get_weather"
        )
    ]
    assert thinking_budget(request, 16000) == 10000


def test_error_results_and_block_content() -> None:
    body = {
        **TOOL_HISTORY,
        "messages": [
            *TOOL_HISTORY["messages"][:2],  # type: ignore[index]
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
                        "content": "Error: Missing required 'location' parameter",
                        "is_error": True,
                    },
                    {"type": "text", "text": "Try again."},
                ],
            },
        ],
    }
    turn = conversation_of(round_trip(body)).turns[2]
    assert turn.parts == [
        ToolResult(
            "toolu_01A09q90qw90lq917835lq9",
            "Error: Missing required 'location' parameter",
            True,
            "get_weather",
        ),
        "Try again.",
    ]


def test_documents_and_search_results_are_flattened() -> None:
    document = {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": "The grass is green."},
        "title": "My Document",
        "context": "This is a trustworthy document.",
        "citations": {"enabled": True},
    }
    search = {
        "type": "search_result",
        "source": "https://example.com/article",
        "title": "Article Title",
        "content": [{"type": "text", "text": "Sky is blue."}, {"type": "text", "text": "Yes."}],
        "citations": {"enabled": True},
    }
    result = {"type": "tool_result", "tool_use_id": "t1", "content": [search]}
    body = {"model": "m", "messages": [{"role": "user", "content": [document, result]}]}
    (turn,) = conversation_of(round_trip(body)).turns
    assert turn.parts == [
        "My Document\n\nThis is a trustworthy document.\n\nThe grass is green.",
        ToolResult(
            "t1", "Article Title\nhttps://example.com/article\n\nSky is blue.\n\nYes.", False
        ),
    ]


def test_system_messages_inside_messages() -> None:
    body = {
        "model": "m",
        "system": "Top.",
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "system", "content": [{"type": "text", "text": "Mid."}]},
            {"role": "system", "content": "More."},
            {"role": "user", "content": "b"},
        ],
    }
    conversation = conversation_of(round_trip(body))
    assert conversation.system == "Top."
    assert [(t.role, t.text()) for t in conversation.turns] == [
        ("user", "a"),
        ("system", "Mid.\n\nMore."),
        ("user", "b"),
    ]


# ------------------------------------------------------------------- Claude Code, first


def test_claude_code_first_request_validates() -> None:
    body = json.loads((FIXTURES / "claude_code_first_request.json").read_text())
    tools_bytes = len(json.dumps(body["tools"]).encode())
    assert len(body["tools"]) == 24 and 60_000 < tools_bytes < 70_000
    assert [len(b["text"]) for b in body["system"]] == [74, 62, 5557]
    request = round_trip(body)
    assert request.stream and request.max_tokens == 32000
    assert request.thinking is not None and request.thinking.type == "adaptive"
    assert request.output_config is not None and request.output_config.effort == "high"
    assert request.output_format_schema() is None
    conversation = conversation_of(request)
    assert [t.role for t in conversation.turns] == ["user", "system"]
    assert conversation.thinking and len(conversation.tools) == 24
    job_tools = tool_use(request)
    assert job_tools is not None and (job_tools.choice, job_tools.parallel) == ("auto", True)
    assert [t.name for t in job_tools.tools][:3] == ["Agent", "Bash", "CronCreate"]
    assert thinking_budget(request, 1024) == 1024  # adaptive: all of max_tokens
    CountTokensRequest.model_validate(body)


# ------------------------------------------------------------------- tools and the job


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, ToolUse(tools=[], choice="auto")),
        ({"type": "auto"}, ToolUse(tools=[], choice="auto")),
        ({"type": "any"}, ToolUse(tools=[], choice="any")),
        ({"type": "none"}, ToolUse(tools=[], choice="none")),
        (
            {"type": "tool", "name": "get_weather"},
            ToolUse(tools=[], choice="tool", name="get_weather"),
        ),
        (
            {"type": "any", "disable_parallel_tool_use": True},
            ToolUse(tools=[], choice="any", parallel=False),
        ),
    ],
)
def test_tool_choice_becomes_the_jobs_tool_use(
    choice: dict[str, Any] | None, expected: ToolUse
) -> None:
    body: dict[str, Any] = {"model": "m", "messages": USER_HI, "tools": [WEATHER_TOOL]}
    if choice is not None:
        body["tool_choice"] = choice
    job = tool_use(MessagesRequest.model_validate(body))
    spec = ToolSpec(name="get_weather", input_schema=WEATHER_TOOL["input_schema"])  # type: ignore[arg-type]
    assert job == expected.model_copy(update={"tools": [spec]})


def test_no_tools_no_tool_use() -> None:
    request = MessagesRequest.model_validate(
        {"model": "m", "messages": USER_HI, "tools": [], "tool_choice": {"type": "auto"}}
    )
    assert tool_use(request) is None


PATTERN_TOOL = {
    "name": "lookup",
    "input_schema": {"type": "object", "properties": {"id": {"type": "string", "pattern": "^a"}}},
}
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
            'tools.0: tool type "web_search_20250305" is not supported: server tools',
        ),
        (
            {"tools": [WEATHER_TOOL, {"type": "bash_20250124", "name": "bash"}]},
            'tools.1: tool type "bash_20250124" is not supported',
        ),
        ({"tools": [{"name": "bad name", "input_schema": {}}]}, "tools.0.name: String should"),
        (
            {"tools": [{"name": "f", "input_schema": {"type": "array"}}]},
            'tools.0.input_schema: a tool\'s input is a JSON object: type must be "object"',
        ),
        ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools: tool names must be unique"),
        ({"tool_choice": {"type": "tool", "name": "x"}}, 'tool_choice: type "tool" needs tools'),
        (
            {"tools": [WEATHER_TOOL], "tool_choice": {"type": "tool", "name": "nope"}},
            'tool_choice.name: there is no tool named "nope" in tools',
        ),
        (
            {"tools": [WEATHER_TOOL], "tool_choice": {"type": "tool"}},
            "tool_choice.name: Field required",
        ),
        (
            {"tools": [WEATHER_TOOL], "tool_choice": {"type": "sometimes"}},
            "tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'",
        ),
        (
            {"tools": [PATTERN_TOOL], "tool_choice": {"type": "any"}},
            "tools.0.input_schema: 'pattern' cannot be enforced by the decoder"
            " (keyword 'pattern' at '/properties/id')",
        ),
        (
            {"tools": [{**PATTERN_TOOL, "strict": True}]},
            "tools.0.strict: a strict tool's input is enforced only when tool_choice forces",
        ),
        (
            {"output_config": {"format": {"type": "json_schema", "schema": {"multipleOf": 2}}}},
            "output_config.format.schema: 'multipleOf' cannot be enforced by the decoder",
        ),
        (
            {
                "output_format": {
                    "type": "json_schema",
                    "schema": {"type": "array", "uniqueItems": True},
                }
            },
            "output_format.schema: 'uniqueItems' cannot be enforced",
        ),
        (
            {"output_config": {"format": {"type": "text"}}},
            "output_config.format.type: Input should be 'json_schema'",
        ),
        (
            {
                "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}},
                "output_format": {"type": "json_schema", "schema": SCHEMA},
            },
            "output_format: send either output_format or output_config.format, not both",
        ),
        (
            {
                "tools": [WEATHER_TOOL],
                "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}},
            },
            "output_config.format: structured output together with tools the model may call",
        ),
        (
            {"output_config": {"format": {"type": "json_schema", "schema": {"$schema": 5}}}},
            "output_config.format.schema: '$schema' must be a string",
        ),
        ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens: Field required"),
        (
            {"thinking": {"type": "enabled", "budget_tokens": 512}},
            "thinking.budget_tokens: Input should be greater than or equal to 1024",
        ),
        (
            {"thinking": {"type": "enabled", "budget_tokens": 2048}, "max_tokens": 2048},
            "thinking.budget_tokens: `max_tokens` must be greater than `thinking.budget_tokens`",
        ),
        ({"thinking": {"type": "sometimes"}}, "thinking.type: Input should be"),
        ({"mcp_servers": [{"type": "url", "url": "https://x"}]}, "mcp_servers: the MCP connector"),
    ],
)
def test_refused_output_contracts_name_what_is_not_supported(
    fields: dict[str, Any], expected: str
) -> None:
    assert error_message({"model": "m", "messages": USER_HI, **fields}).startswith(expected)


def test_schemas_are_checked_only_where_the_decoder_enforces_them() -> None:
    # Called freely (auto), a schema is only prompt text: anything goes.
    auto = {"model": "m", "messages": USER_HI, "tools": [PATTERN_TOOL]}
    assert tool_use(MessagesRequest.model_validate(auto)) is not None
    forced_other = {**auto, "tools": [PATTERN_TOOL, WEATHER_TOOL]}
    forced_other["tool_choice"] = {"type": "tool", "name": "get_weather"}
    MessagesRequest.model_validate(forced_other)
    strict_forced = {**forced_other, "tools": [PATTERN_TOOL, {**WEATHER_TOOL, "strict": True}]}
    MessagesRequest.model_validate(strict_forced)
    # No tools may be called: structured output with tools described is fine.
    structured = {
        "model": "m",
        "messages": USER_HI,
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "none"},
        "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}, "effort": "low"},
    }
    assert MessagesRequest.model_validate(structured).output_format_schema() == SCHEMA
    legacy = {"model": "m", "messages": USER_HI}
    legacy["output_format"] = {"type": "json_schema", "schema": SCHEMA}
    assert MessagesRequest.model_validate(legacy).output_format_schema() == SCHEMA


def test_deep_json_is_checked_without_recursion() -> None:
    depth = 900
    deep = '{"a":' * depth + '"\\ud800"' + "}" * depth
    raw = (
        '{"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant","content":'
        '[{"type":"tool_use","id":"t","name":"f","input":' + deep + "}]},"
        '{"role":"user","content":"y"}]}'
    )
    with pytest.raises(ValidationError) as info:
        MessagesRequest.model_validate(json.loads(raw))
    message = format_validation_errors(info.value.errors())
    assert message == "messages.1.content.0.input: unpaired UTF-16 surrogate at character 0"


@pytest.mark.parametrize(
    ("thinking", "max_tokens", "budget"),
    [
        (None, 100, None),
        ({"type": "disabled"}, 100, None),
        ({"type": "adaptive"}, 100, 100),
        ({"type": "enabled", "budget_tokens": 2048}, 4096, 2048),
        # max_tokens clamped below the budget by admission: the budget follows.
        ({"type": "enabled", "budget_tokens": 2048}, 1024, 1023),
    ],
)
def test_thinking_budget(
    thinking: dict[str, Any] | None, max_tokens: int, budget: int | None
) -> None:
    body: dict[str, Any] = {"model": "m", "messages": USER_HI}
    if thinking is not None:
        body["thinking"] = thinking
    assert thinking_budget(MessagesRequest.model_validate(body), max_tokens) == budget


def test_role_placement_and_prefill_rules() -> None:
    tool_use_block = {"type": "tool_use", "id": "t", "name": "f", "input": {}}
    result = {"type": "tool_result", "tool_use_id": "t", "content": "x"}
    assert (
        error_message(
            {"model": "m", "messages": [*USER_HI, {"role": "assistant", "content": [result]}]}
        )
        == "messages.1.content.0: tool_result blocks are not allowed in assistant messages"
    )
    assert error_message(
        {"model": "m", "messages": [{"role": "system", "content": [{"type": "document"}]}]}
    ).startswith("messages.0.content.0.source: Field required")
    assert error_message(
        {"model": "m", "messages": [*USER_HI, {"role": "assistant", "content": [tool_use_block]}]}
    ).startswith("messages.1: a final assistant message is continued (a prefill)")
    # A turn of only a tool call or only thinking has content.
    thinking = {"type": "thinking", "thinking": "hm", "signature": "s"}
    MessagesRequest.model_validate(
        {
            "model": "m",
            "messages": [
                *USER_HI,
                {"role": "assistant", "content": [tool_use_block]},
                {"role": "user", "content": [result]},
                {"role": "assistant", "content": [thinking]},
            ],
        }
    )


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}},
            'content block type "image" is not supported (this model accepts text only)',
        ),
        (
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf"}},
            'source: document source type "base64" is not supported (this model accepts text only',
        ),
        (
            {"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}},
            'content block type "server_tool_use" is not supported (server tools do not run',
        ),
        (
            {"type": "web_search_tool_result", "tool_use_id": "s", "content": []},
            'content block type "web_search_tool_result" is not supported (server tools',
        ),
        (
            {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image"}]},
            'content.0: content block type "image" is not supported (this model accepts text',
        ),
    ],
)
def test_unsupported_blocks_are_named(block: dict[str, Any], expected: str) -> None:
    message = error_message({"model": "m", "messages": [{"role": "user", "content": [block]}]})
    assert message.startswith("messages.0.content.0") and expected in message


# ---------------------------------------------------------------------------- streaming


def test_thinking_blocks_close_with_a_signature_delta() -> None:
    signatures = ThinkingSignatures()
    signatures.add(BlockStartEvent(index=1, block=0, block_type="thinking"))
    signatures.add(DeltaEvent(index=2, block=0, kind="thinking", text="Let me ", output_tokens=2))
    signatures.add(DeltaEvent(index=3, block=0, kind="thinking", text="think.", output_tokens=3))
    signatures.add(BlockStartEvent(index=4, block=1, block_type="text"))
    assert signatures.closing(1) is None
    signature = signatures.closing(0)
    assert signature == thinking_signature("Let me think.")
    assert signatures.closing(0) is None
    frame = sse.signature_delta(0, signature)
    assert frame == (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"signature_delta","signature":"' + signature.encode() + b'"}}\n\n'
    )


# ------------------------------------------------------------------------------ aliases


def spec(model_id: str, *aliases: str) -> ModelSpec:
    return DEFAULT_MODEL.model_copy(
        update={"id": model_id, "queue": model_id, "aliases": list(aliases)}
    )


def test_aliases_resolve_exact_ids_then_patterns() -> None:
    catalog = Catalog(
        [
            spec("big", "claude-opus-*", "gpt-4o"),
            spec("small", "claude-*", "claude-haiku-4-5"),
            spec("plain"),
        ]
    )
    assert catalog.resolve("big") is catalog.get("big")
    assert catalog.resolve("gpt-4o") is catalog.get("big")
    assert catalog.resolve("claude-haiku-4-5") is catalog.get("small")
    assert catalog.resolve("claude-opus-4-6") is catalog.get("big")  # first pattern that matches
    assert catalog.resolve("claude-sonnet-4-6") is catalog.get("small")
    assert catalog.resolve("Claude-sonnet") is None and catalog.resolve("other") is None
    assert catalog.get("gpt-4o") is None  # get() is for served ids only
    assert [m.id for m in catalog.all()] == ["small", "plain", "big"]  # served ids only


def test_aliases_default_to_none_and_may_not_shadow_models() -> None:
    assert DEFAULT_MODEL.aliases == []
    assert Catalog([DEFAULT_MODEL]).resolve("claude-sonnet-4-6") is None
    with pytest.raises(ValueError, match="names another model"):
        Catalog([spec("a", "b"), spec("b")])
    with pytest.raises(ValueError, match="names another model"):
        Catalog([spec("a", "x"), spec("b", "x")])

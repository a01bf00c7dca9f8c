"""Wire models against recorded Anthropic JSON (reference/anthropic-messages-api.md, the seed)."""

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import anthropic.types
import pytest
from pydantic import ValidationError

from api.anthropic.convert import (
    ContentAssembler,
    conversation_of,
    estimated_cost_usd,
    message_response,
    model_info,
    models_page,
    sampling_params,
)
from api.anthropic.protocol import (
    CountTokensRequest,
    MessageResponse,
    MessagesRequest,
    ModelList,
    TextBlock,
    TokenCount,
    ToolUseBlock,
)
from api.errors import InvalidRequestError, format_validation_errors
from api.ids import base62, new_account_id, new_key_id, new_message_id, new_request_id
from contract.catalog import DEFAULT_MODEL, TEST_MODEL, ModelSpec
from contract.events import (
    BlockStartEvent,
    BlockStopEvent,
    ContentEvent,
    DeltaEvent,
    DoneEvent,
)

USER_HI = [{"role": "user", "content": "hi"}]

# The seed's multi-turn example, verbatim.
SEED_REQUEST = {
    "model": "abliterated-model",
    "max_tokens": 1024,
    "messages": [
        {"role": "user", "content": "What is abliteration?"},
        {
            "role": "assistant",
            "content": "Abliteration is a technique that removes refusal vectors from LLMs.",
        },
        {"role": "user", "content": "Explain how it works step by step."},
    ],
}

# The seed's non-streaming response, verbatim.
SEED_RESPONSE = {
    "id": "msg_abc123",
    "type": "message",
    "role": "assistant",
    "model": "abliterated-model",
    "content": [
        {"type": "text", "text": "Abliteration removes refusal vectors from language models..."}
    ],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 42, "output_tokens": 128},
    "remaining_credits": 487,
    "estimated_credits_used": 1,
    "estimated_cost_usd": 0.00085,
}


def turns(request: MessagesRequest | CountTokensRequest) -> list[tuple[str, str]]:
    """(role, text) of the request's turns, as the prompt renderer gets them."""
    return [(turn.role, turn.text()) for turn in conversation_of(request).turns]


def error_message(
    body: Any, model: type[MessagesRequest | CountTokensRequest] = MessagesRequest
) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return format_validation_errors(info.value.errors())


def test_ids_have_prefix_and_base62_body() -> None:
    for make, prefix in [
        (new_request_id, "req_"),
        (new_message_id, "msg_"),
        (new_account_id, "acct_"),
        (new_key_id, "key_"),
    ]:
        value = make()
        assert value.startswith(prefix)
        body = value[len(prefix) :]
        assert len(body) == 24 and body.isalnum() and body.isascii()
    assert new_request_id() != new_request_id()
    assert len(base62(7)) == 7


def test_seed_request_round_trip() -> None:
    request = MessagesRequest.model_validate(SEED_REQUEST)
    assert request.max_tokens == 1024 and request.stream is False
    assert request.system_text() is None
    assert turns(request) == [
        ("user", "What is abliteration?"),
        ("assistant", "Abliteration is a technique that removes refusal vectors from LLMs."),
        ("user", "Explain how it works step by step."),
    ]
    again = MessagesRequest.model_validate_json(request.model_dump_json())
    assert again == request


def test_sdk_captured_request_body() -> None:
    raw = '{"max_tokens":16,"messages":[{"role":"user","content":"hi"}],"model":"m"}'
    request = MessagesRequest.model_validate_json(raw)
    assert (request.model, request.max_tokens, turns(request)) == (
        "m",
        16,
        [("user", "hi")],
    )


def test_block_content_system_blocks_and_ignored_fields() -> None:
    request = MessagesRequest.model_validate(
        {
            "model": "m",
            "system": [
                {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Answer in English."},
            ],
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "first", "citations": []},
                        {"type": "text", "text": "second", "cache_control": {"type": "ephemeral"}},
                    ],
                },
                {"role": "user", "content": "third"},
                {"role": "assistant", "content": "Sure:"},
            ],
            "metadata": {"user_id": "u-1"},
            "service_tier": "auto",
            "output_config": {"effort": "low"},
            "tool_choice": {"type": "auto"},
            "thinking": {"type": "adaptive"},
            "tools": [],
            "context_management": {"edits": [{"type": "clear_thinking_20251015"}]},
            "cache_control": {"type": "ephemeral"},
            "container": None,
            "speed": "fast",
            "stream": True,
            "temperature": 1.5,
            "top_p": 0.9,
            "top_k": 40,
            "stop_sequences": ["\n\nHuman:"],
        }
    )
    assert request.system_text() == "You are terse.\n\nAnswer in English."
    # Blocks of one turn and consecutive same-role turns are joined by a blank line.
    assert turns(request) == [("user", "first\n\nsecond\n\nthird"), ("assistant", "Sure:")]
    assert request.stream and request.metadata is not None and request.metadata.user_id == "u-1"
    params = sampling_params(request, max_tokens=64)
    assert params.model_dump() == {
        "max_tokens": 64,
        "temperature": 1.5,
        "top_p": 0.9,
        "top_k": 40,
        "stop_sequences": ["\n\nHuman:"],
    }


def test_max_tokens_optional_and_sampling_defaults() -> None:
    request = MessagesRequest.model_validate({"model": "m", "messages": USER_HI})
    assert request.max_tokens is None
    assert sampling_params(request, max_tokens=8).temperature == 1.0


def test_a_models_sampling_defaults_fill_what_the_request_leaves_out() -> None:
    def params(**fields: object) -> tuple[float, float | None]:
        request = MessagesRequest.model_validate({"model": "m", "messages": USER_HI, **fields})
        got = sampling_params(request, 8, DEFAULT_MODEL)
        return got.temperature, got.top_p

    assert (DEFAULT_MODEL.default_temperature, DEFAULT_MODEL.default_top_p) == (0.3, 0.9)
    assert params() == (0.3, 0.9)
    # A chosen temperature gets the distribution it asks for: no nucleus it did not ask for.
    assert params(temperature=1.0) == (1.0, None)
    assert params(temperature=0) == (0.0, None)
    assert params(top_p=0.5) == (0.3, 0.5)
    assert params(temperature=0.7, top_p=0.95) == (0.7, 0.95)
    # The test model has none: Anthropic's 1.0 and no nucleus.
    request = MessagesRequest.model_validate({"model": "m", "messages": USER_HI})
    assert sampling_params(request, 8, TEST_MODEL).temperature == 1.0
    assert sampling_params(request, 8, TEST_MODEL).top_p is None


def test_empty_final_assistant_message_is_allowed() -> None:
    request = MessagesRequest.model_validate(
        {"model": "m", "messages": [*USER_HI, {"role": "assistant", "content": ""}]}
    )
    assert turns(request) == [("user", "hi"), ("assistant", "")]


def test_count_tokens_ignores_generation_fields() -> None:
    request = CountTokensRequest.model_validate(
        {"model": "m", "messages": USER_HI, "max_tokens": 5, "stream": True, "temperature": 9}
    )
    assert turns(request) == [("user", "hi")]
    assert "max_tokens" not in request.model_dump()
    assert TokenCount(input_tokens=12).model_dump() == {"input_tokens": 12}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"model": "m", "messages": []}, "messages: at least one message is required"),
        ({"messages": USER_HI}, "model: Field required"),
        ({"model": "m"}, "messages: Field required"),
        (
            {"model": "m" * 257, "messages": USER_HI},
            "model: String should have at most 256 characters",
        ),
        ({"model": 5, "messages": USER_HI}, "model: Input should be a valid string"),
        ({"model": "m", "messages": [{"role": "user"}]}, "messages.0.content: Field required"),
        (
            {"model": "m", "messages": [{"role": "bot", "content": "x"}]},
            "messages.0.role: Input should be 'user', 'assistant' or 'system'",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": 5}]},
            "messages.0.content: Input should be a string or a list of content blocks",
        ),
        (
            {
                "model": "m",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "look"},
                            {"type": "image", "source": {"type": "url", "url": "https://x"}},
                        ],
                    }
                ],
            },
            'messages.0.content.1: content block type "image" is not supported'
            " (this model accepts text only)",
        ),
        (
            {
                "model": "m",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
                    },
                ],
            },
            "messages.0.content.0: tool_use blocks are not allowed in user messages",
        ),
        (
            {
                "model": "m",
                "messages": [
                    *USER_HI,
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": []}],
                    },
                    {"role": "user", "content": "ok"},
                ],
            },
            "messages.1.content.0.input: Input should be a valid dictionary",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages.0.content.0.text: Field required",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"text": "x"}]}]},
            "messages.0.content.0.type: Field required",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": ["x"]}]},
            "messages.0.content.0: content blocks must be JSON objects",
        ),
        (
            {"model": "m", "messages": [{"role": "user", "content": ""}]},
            "messages.0: all messages must have non-empty content"
            " except for the optional final assistant message",
        ),
        (
            {
                "model": "m",
                "messages": [
                    *USER_HI,
                    {"role": "assistant", "content": []},
                    {"role": "user", "content": "again"},
                ],
            },
            "messages.1: all messages must have non-empty content"
            " except for the optional final assistant message",
        ),
        (
            {"model": "m", "messages": USER_HI, "system": [{"type": "document"}]},
            'system.0: content block type "document" is not supported'
            " (a system prompt takes text blocks only)",
        ),
        (
            {"model": "m", "messages": USER_HI, "tool_choice": {"type": "any"}},
            'tool_choice: type "any" needs tools to choose from',
        ),
        (
            {"model": "m", "messages": USER_HI, "thinking": {"type": "enabled"}},
            'thinking.budget_tokens: Field required (thinking type "enabled")',
        ),
        (
            {"model": "m", "messages": USER_HI, "max_tokens": 0},
            "max_tokens: Input should be greater than or equal to 1",
        ),
        (
            {"model": "m", "messages": USER_HI, "temperature": 2.5},
            "temperature: Input should be less than or equal to 2",
        ),
        ({"model": "m", "messages": USER_HI, "top_p": 0}, "top_p: Input should be greater than 0"),
        (
            {"model": "m", "messages": USER_HI, "top_k": 0},
            "top_k: Input should be greater than or equal to 1",
        ),
        (
            {"model": "m", "messages": USER_HI, "stop_sequences": ["ok", ""]},
            "stop_sequences.1: String should have at least 1 character",
        ),
        (
            {"model": "m", "messages": USER_HI, "stop_sequences": ["s"] * 33},
            "stop_sequences: List should have at most 32 items after validation, not 33",
        ),
        (
            {"model": "m", "messages": USER_HI, "stream": "yes please"},
            "stream: Input should be a valid boolean, unable to interpret input",
        ),
        ([], "body: Input should be a JSON object"),
        ("x", "body: Input should be a JSON object"),
    ],
)
def test_validation_messages(body: Any, expected: str) -> None:
    assert error_message(body) == expected


def test_count_tokens_applies_the_same_content_rules() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "image"}]}]}
    assert error_message(body, CountTokensRequest) == (
        'messages.0.content.0: content block type "image" is not supported'
        " (this model accepts text only)"
    )


def test_several_errors_are_joined() -> None:
    assert error_message({}) == "model: Field required; messages: Field required"


def test_seed_response_round_trip_and_sdk_parse() -> None:
    response = MessageResponse.model_validate(SEED_RESPONSE)
    dumped = response.model_dump(mode="json")
    assert {k: v for k, v in dumped.items() if k != "usage"} == {
        k: v for k, v in SEED_RESPONSE.items() if k != "usage"
    }
    assert dumped["usage"] == {
        "input_tokens": 42,
        "output_tokens": 128,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "service_tier": "standard",
    }
    message = anthropic.types.Message.model_validate(json.loads(response.model_dump_json()))
    assert message.content[0].type == "text"
    assert message.content[0].text.startswith("Abliteration")
    assert message.usage.output_tokens == 128 and message.stop_reason == "end_turn"
    assert message.model_extra == {
        "remaining_credits": 487,
        "estimated_credits_used": 1,
        "estimated_cost_usd": 0.00085,
    }


def done_event(**overrides: Any) -> DoneEvent:
    fields: dict[str, Any] = {
        "index": 3,
        "status": "succeeded",
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "input_tokens": 42,
        "output_tokens": 128,
        "credits_charged": 1,
        "remaining_credits": 487,
        "cost_usd": "0.00085",
    }
    return DoneEvent.model_validate({**fields, **overrides})


def test_message_response_from_done_event_matches_the_seed() -> None:
    response = message_response(
        message_id="msg_abc123",
        model="abliterated-model",
        content=[TextBlock(text="Abliteration removes refusal vectors from language models...")],
        done=done_event(),
    )
    dumped = json.loads(response.model_dump_json())
    assert {k: v for k, v in dumped.items() if k != "usage"} == {
        k: v for k, v in SEED_RESPONSE.items() if k != "usage"
    }
    assert json.dumps(dumped["estimated_cost_usd"]) == "0.00085"
    message = anthropic.types.Message.model_validate(dumped)
    assert message.usage.input_tokens == 42 and message.usage.output_tokens == 128


def test_message_response_stop_sequence_and_empty_text() -> None:
    response = message_response(
        message_id="msg_x",
        model="m",
        content=ContentAssembler().blocks(),
        done=done_event(stop_reason="stop_sequence", stop_sequence="END", output_tokens=1),
    )
    assert response.content == [TextBlock(text="")]
    assert (response.stop_reason, response.stop_sequence) == ("stop_sequence", "END")


def test_content_is_assembled_from_block_events_in_block_order() -> None:
    content = ContentAssembler()
    events: list[ContentEvent] = [
        BlockStartEvent(index=1, block=0, block_type="text"),
        DeltaEvent(index=2, block=0, text="Let me ", output_tokens=2),
        DeltaEvent(index=3, block=0, text="look.", output_tokens=3),
        BlockStopEvent(index=4, block=0),
        BlockStartEvent(
            index=5, block=1, block_type="tool_use", tool_use_id="toolu_1", tool_name="get"
        ),
        DeltaEvent(index=6, block=1, kind="input_json", text='{"city": ', output_tokens=5),
        DeltaEvent(index=7, block=1, kind="input_json", text='"Paris"}', output_tokens=7),
        BlockStopEvent(index=8, block=1),
    ]
    for event in events:
        content.add(event)
    assert content.blocks() == [
        TextBlock(text="Let me look."),
        ToolUseBlock(id="toolu_1", name="get", input={"city": "Paris"}),
    ]


def test_estimated_cost_usd() -> None:
    assert estimated_cost_usd("0.00085") == 0.00085
    assert estimated_cost_usd(str(Decimal(42 + 128) * Decimal(5) / Decimal(10**6))) == 0.00085
    assert estimated_cost_usd("0") == 0.0


def make_models(count: int) -> list[ModelSpec]:
    return [
        DEFAULT_MODEL.model_copy(
            update={"id": f"m{i}", "created_at": datetime(2026, 1, 1, 12, 30, tzinfo=UTC)}
        )
        for i in range(count)
    ]


def test_model_info_shape_and_sdk_parse() -> None:
    info = model_info(DEFAULT_MODEL).model_dump(mode="json")
    assert info == {
        "type": "model",
        "id": "abliterated-model",
        "display_name": DEFAULT_MODEL.display_name,
        "created_at": "2026-01-01T00:00:00Z",
        "max_input_tokens": DEFAULT_MODEL.context_window,
        "max_tokens": DEFAULT_MODEL.max_output_tokens,
        "lifecycle": "active",
    }
    parsed = anthropic.types.ModelInfo.model_validate(info)
    assert parsed.created_at == datetime(2026, 1, 1, tzinfo=UTC)


def page_ids(page: ModelList) -> tuple[list[str], bool, str | None, str | None]:
    return [m.id for m in page.data], page.has_more, page.first_id, page.last_id


def test_models_page_forward() -> None:
    models = make_models(5)
    assert page_ids(models_page(models)) == (["m0", "m1", "m2", "m3", "m4"], False, "m0", "m4")
    assert page_ids(models_page(models, limit=2)) == (["m0", "m1"], True, "m0", "m1")
    assert page_ids(models_page(models, after_id="m1", limit=2)) == (["m2", "m3"], True, "m2", "m3")
    assert page_ids(models_page(models, after_id="m3", limit=2)) == (["m4"], False, "m4", "m4")
    assert page_ids(models_page(models, after_id="m4")) == ([], False, None, None)


def test_models_page_backward() -> None:
    models = make_models(5)
    assert page_ids(models_page(models, before_id="m4", limit=2)) == (
        ["m2", "m3"],
        True,
        "m2",
        "m3",
    )
    assert page_ids(models_page(models, before_id="m2", limit=2)) == (
        ["m0", "m1"],
        False,
        "m0",
        "m1",
    )
    assert page_ids(models_page(models, before_id="m0")) == ([], False, None, None)


def test_models_page_unknown_cursor_and_bad_arguments() -> None:
    models = make_models(3)
    assert page_ids(models_page(models, after_id="nope")) == ([], False, None, None)
    for bad in (0, 1001):
        with pytest.raises(InvalidRequestError, match="limit"):
            models_page(models, limit=bad)
    with pytest.raises(InvalidRequestError):
        models_page(models, after_id="m0", before_id="m2")


def test_models_page_parses_as_sdk_page() -> None:
    page = models_page(make_models(2), limit=1).model_dump(mode="json")
    assert page["has_more"] is True and page["last_id"] == "m0"
    assert anthropic.types.ModelInfo.model_validate(page["data"][0]).id == "m0"

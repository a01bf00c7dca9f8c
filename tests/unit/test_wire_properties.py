"""Property tests of the request wire models: any JSON is either a request or a clean 400."""

import itertools
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from api.anthropic.convert import conversation_of
from api.anthropic.protocol import BLOCK_SEPARATOR, CountTokensRequest, MessagesRequest
from api.errors import format_validation_errors

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
TEXT = st.text(min_size=1, max_size=40).filter(lambda t: t.strip() == t and t != "")
ROLE = st.sampled_from(["user", "assistant"])
TEXT_BLOCK = st.builds(lambda t: {"type": "text", "text": t}, TEXT)
CONTENT = TEXT | st.lists(TEXT_BLOCK, min_size=1, max_size=3)
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": CONTENT})

TOP_LEVEL_FIELDS = [
    "model",
    "messages",
    "system",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop_sequences",
    "stream",
    "metadata",
    "tools",
    "tool_choice",
    "thinking",
    "output_config",
    "output_format",
]


@st.composite
def valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    messages = draw(st.lists(MESSAGE, min_size=1, max_size=5))
    messages[0]["role"] = "user"
    body: dict[str, Any] = {"model": draw(st.text(min_size=1, max_size=30)), "messages": messages}
    optional = {
        "max_tokens": st.integers(min_value=1, max_value=10**6),
        "temperature": st.floats(min_value=0, max_value=2),
        "top_p": st.floats(min_value=0, max_value=1, exclude_min=True),
        "top_k": st.integers(min_value=1, max_value=10**6),
        "stop_sequences": st.lists(st.text(min_size=1, max_size=16), max_size=4),
        "stream": st.booleans(),
        "system": CONTENT,
        "metadata": st.fixed_dictionaries({"user_id": st.none() | st.text(max_size=20)}),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            body[name] = draw(strategy)
    return body


def _check_rejection(exc: ValidationError) -> None:
    message = format_validation_errors(exc.errors())
    assert message and message != "Invalid request"
    # The envelope renderer escapes lone surrogates; everything else must already be text.
    message.encode("utf-8", "backslashreplace")


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(JSON)
def test_any_json_is_a_request_or_a_named_400(value: Any) -> None:
    for model in (MessagesRequest, CountTokensRequest):
        try:
            model.model_validate(value)
        except ValidationError as exc:
            _check_rejection(exc)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(valid_requests(), st.sampled_from(TOP_LEVEL_FIELDS), JSON)
def test_one_corrupted_field_is_named_in_the_error(
    body: dict[str, Any], field: str, value: Any
) -> None:
    corrupted = {**body, field: value}
    try:
        MessagesRequest.model_validate(corrupted)
    except ValidationError as exc:
        _check_rejection(exc)
        message = format_validation_errors(exc.errors())
        # The bad field (or, for messages, a path inside it) is what the message starts with.
        assert message.startswith(field), (field, value, message)


@settings(max_examples=100)
@given(valid_requests())
def test_valid_requests_validate_and_round_trip(body: dict[str, Any]) -> None:
    request = MessagesRequest.model_validate(body)
    again = MessagesRequest.model_validate(json.loads(request.model_dump_json()))
    assert again == request
    turns = conversation_of(request).turns
    assert all(a.role != b.role for a, b in itertools.pairwise(turns))
    joined = BLOCK_SEPARATOR.join(turn.text() for turn in turns)
    for message in request.messages:
        for block in message.content:
            assert block.type == "text" and block.text in joined


@given(valid_requests(), st.integers(max_value=0))
def test_max_tokens_below_one_is_refused(body: dict[str, Any], max_tokens: int) -> None:
    try:
        MessagesRequest.model_validate({**body, "max_tokens": max_tokens})
    except ValidationError as exc:
        assert format_validation_errors(exc.errors()).startswith("max_tokens:")
    else:
        raise AssertionError("max_tokens < 1 was accepted")


@given(
    valid_requests(),
    st.floats(allow_nan=True).filter(lambda t: not 0 <= t <= 2),
)
def test_temperature_outside_0_to_2_is_refused(body: dict[str, Any], temperature: float) -> None:
    try:
        MessagesRequest.model_validate({**body, "temperature": temperature})
    except ValidationError as exc:
        assert format_validation_errors(exc.errors()).startswith("temperature:")
    else:
        raise AssertionError(f"temperature {temperature} was accepted")


@given(valid_requests(), st.sampled_from(["\ud800", "a\udfffb", "\udc00x"]))
def test_lone_surrogates_are_refused_with_their_path(body: dict[str, Any], bad: str) -> None:
    body = {**body, "messages": [{"role": "user", "content": [{"type": "text", "text": bad}]}]}
    try:
        MessagesRequest.model_validate(body)
    except ValidationError as exc:
        assert format_validation_errors(exc.errors()).startswith("messages.0.content.0.text:")
    else:
        raise AssertionError("a lone surrogate was accepted")

"""The official anthropic SDK against the real stack: create, stream, count, models, errors."""

import anthropic
import pytest

from contract.catalog import DEFAULT_MODEL_ID
from infra.launcher.stack import Stack
from tests.conftest import AccountFactory
from tests.support import STACK_MODEL

MODEL = STACK_MODEL
GREEDY = {"temperature": 0}


def ask(text: str = "Hello, world!") -> list[anthropic.types.MessageParam]:
    return [{"role": "user", "content": text}]


def test_create_returns_a_full_message(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=MODEL, max_tokens=16, messages=ask())
    assert message.id.startswith("msg_")
    assert message.type == "message" and message.role == "assistant"
    assert message.model == MODEL
    assert message.content[0].type == "text"
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert 1 <= message.usage.output_tokens <= 16
    assert message.usage.input_tokens > 0
    assert message._request_id and message._request_id.startswith("req_")
    extra = message.model_extra or {}
    assert extra["estimated_credits_used"] >= 1
    assert extra["remaining_credits"] == 10_000 - extra["estimated_credits_used"]
    assert extra["estimated_cost_usd"] > 0


def test_max_tokens_is_honoured(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL, max_tokens=5, messages=ask("Count to one hundred"), extra_body=GREEDY
    )
    if message.stop_reason == "max_tokens":
        assert message.usage.output_tokens == 5
    else:
        assert message.stop_reason == "end_turn" and message.usage.output_tokens <= 5


def test_stream_text_and_final_message(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model=MODEL, max_tokens=24, messages=ask("Tell me a story"), extra_body=GREEDY
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == final.content[0].text
    assert final.usage.output_tokens >= 1
    assert final.usage.input_tokens > 0
    assert final.stop_reason in ("end_turn", "max_tokens")


def test_streamed_text_equals_non_streamed_at_temperature_zero(client: anthropic.Anthropic) -> None:
    messages = ask("The same prompt twice")
    plain = client.messages.create(model=MODEL, max_tokens=32, messages=messages, extra_body=GREEDY)
    with client.messages.stream(
        model=MODEL, max_tokens=32, messages=messages, extra_body=GREEDY
    ) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].text == plain.content[0].text
    assert streamed.usage.output_tokens == plain.usage.output_tokens
    assert streamed.stop_reason == plain.stop_reason


def test_count_tokens_matches_usage(client: anthropic.Anthropic) -> None:
    messages = ask("Count these tokens.")
    counted = client.messages.count_tokens(model=MODEL, messages=messages, system="Be brief.")
    message = client.messages.create(
        model=MODEL, max_tokens=4, messages=messages, system="Be brief."
    )
    assert counted.input_tokens == message.usage.input_tokens > 0


def test_models_list_and_retrieve(client: anthropic.Anthropic) -> None:
    models = list(client.models.list())
    # The catalogue always holds the default model and the test model, newest first.
    assert [m.id for m in models] == [DEFAULT_MODEL_ID, MODEL]
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.type == "model" and model.display_name


def test_bad_request_error(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=MODEL, max_tokens=16, messages=[])
    assert caught.value.status_code == 400
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert "messages" in caught.value.body["error"]["message"]


def test_authentication_error(stack: Stack) -> None:
    bad = anthropic.Anthropic(base_url=stack.base_url, api_key="ak_not-a-real-key", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        bad.messages.create(model=MODEL, max_tokens=16, messages=ask())
    assert caught.value.body["error"]["type"] == "authentication_error"


def test_not_found_error(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="no-such-model", max_tokens=16, messages=ask())
    assert caught.value.body["error"]["message"] == "model: no-such-model"
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("no-such-model")


def test_payment_required_error(stack: Stack, make_account: AccountFactory) -> None:
    poor = make_account(credits=0)
    sdk = anthropic.Anthropic(base_url=stack.base_url, api_key=poor.key, max_retries=0)
    with pytest.raises(anthropic.PaymentRequiredError) as caught:
        sdk.messages.create(model=MODEL, max_tokens=16, messages=ask())
    assert caught.value.status_code == 402
    assert caught.value.body["error"]["type"] == "billing_error"
    assert "insufficient credits" in caught.value.body["error"]["message"]

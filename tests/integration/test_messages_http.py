"""Plain HTTP for what the SDK hides: exact SSE frames, headers, both auth headers."""

import json

import httpx

from contract.catalog import DEFAULT_MODEL_ID
from infra.launcher.stack import Stack
from tests.conftest import ApiAccount
from tests.support import STACK_MODEL

MODEL = STACK_MODEL
BODY = {"model": MODEL, "max_tokens": 12, "messages": [{"role": "user", "content": "Hi"}]}


def parse_sse(raw: str) -> list[tuple[str, dict]]:
    events = []
    for frame in raw.strip().split("\n\n"):
        lines = frame.split("\n")
        assert lines[0].startswith("event: "), frame
        assert lines[1].startswith("data: "), frame
        name, data = lines[0][7:], json.loads(lines[1][6:])
        assert data["type"] == name
        events.append((name, data))
    return events


def test_sse_event_sequence(http: httpx.Client) -> None:
    response = http.post("/v1/messages", json={**BODY, "stream": True, "temperature": 0})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["request-id"].startswith("req_")
    events = parse_sse(response.text)
    names = [n for n, _ in events if n != "ping"]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) <= {"content_block_delta"}
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_") and start["content"] == []
    assert start["usage"]["input_tokens"] > 0 and start["stop_reason"] is None
    deltas = [d for n, d in events if n == "content_block_delta"]
    assert all(d["index"] == 0 and d["delta"]["type"] == "text_delta" for d in deltas)
    final = next(d for n, d in events if n == "message_delta")
    assert final["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    assert 1 <= final["usage"]["output_tokens"] <= 12
    assert final["estimated_credits_used"] >= 1
    assert isinstance(final["remaining_credits"], int)
    assert final["estimated_cost_usd"] > 0
    count = http.post("/v1/messages/count_tokens", json=BODY).json()["input_tokens"]
    assert start["usage"]["input_tokens"] == count


def test_both_auth_headers(stack: Stack, account: ApiAccount) -> None:
    for headers in ({"x-api-key": account.key}, {"Authorization": f"Bearer {account.key}"}):
        response = httpx.post(
            f"{stack.base_url}/v1/messages/count_tokens", json=BODY, headers=headers
        )
        assert response.status_code == 200, response.text


def test_missing_and_wrong_keys_are_401(stack: Stack) -> None:
    for headers in ({}, {"x-api-key": "ak_wrong"}, {"Authorization": "Bearer nope"}):
        response = httpx.post(f"{stack.base_url}/v1/messages", json=BODY, headers=headers)
        assert response.status_code == 401
        body = response.json()
        assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
        assert body["request_id"] == response.headers["request-id"]


def test_query_parameters_are_ignored(http: httpx.Client) -> None:
    response = http.post("/v1/messages/count_tokens?beta=true", json=BODY)
    assert response.status_code == 200
    assert http.get("/v1/models?beta=true").json()["has_more"] is False


def test_validation_errors_are_400_not_422(http: httpx.Client) -> None:
    cases = [
        ({"model": MODEL}, "messages: Field required"),
        ({**BODY, "messages": []}, "messages: at least one message is required"),
        ({**BODY, "temperature": 3}, "temperature"),
        ({**BODY, "max_tokens": 0}, "max_tokens"),
        ({**BODY, "messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
    ]
    for body, fragment in cases:
        response = http.post("/v1/messages", json=body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert fragment in response.json()["error"]["message"]
    bad_json = http.post(
        "/v1/messages", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 400


def test_optional_fields_and_default_max_tokens(http: httpx.Client) -> None:
    """The seed: only model and messages are required; system may be blocks; no version header."""
    body = {
        "model": MODEL,
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "stop_sequences": ["\n\n\n"],
        "metadata": {"user_id": "u-1"},
        "top_k": 5,
        "top_p": 0.9,
        "temperature": 0.7,
    }
    response = http.post("/v1/messages", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["output_tokens"] >= 1


def test_unknown_route_is_404_envelope(http: httpx.Client) -> None:
    response = http.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_a_catalogue_model_this_deployment_never_prepared_is_a_404(http: httpx.Client) -> None:
    # The test stack's workers serve abl-tiny alone: the default model's folder was never made.
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        response = http.post(path, json={**BODY, "model": DEFAULT_MODEL_ID})
        assert response.status_code == 404, response.text
        assert response.json()["error"] == {
            "type": "not_found_error",
            "message": f"model: {DEFAULT_MODEL_ID} is not available on this deployment",
        }

"""Malformed requests on the real stack: every one gets Anthropic's envelope with the right status
and a message naming the field; never a 5xx, never FastAPI's 422."""

import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import anthropic
import httpx
import pytest

from infra.launcher.stack import Stack
from tests.conftest import ApiAccount
from tests.support import STACK_MODEL

MODEL = STACK_MODEL
USER = [{"role": "user", "content": "Hi"}]
OK: dict[str, Any] = {"model": MODEL, "max_tokens": 1, "messages": USER}
MB = 1024 * 1024


def _with(**fields: Any) -> dict[str, Any]:
    return {**OK, **fields}


def _without(name: str) -> dict[str, Any]:
    return {k: v for k, v in OK.items() if k != name}


def _msg(content: Any, role: str = "user") -> dict[str, Any]:
    return _with(messages=[{"role": role, "content": content}])


SURROGATE = b'{"model":"abl-tiny","messages":[{"role":"user","content":"\\ud800"}]}'
NAN = b'{"model":"abl-tiny","messages":[{"role":"user","content":"x"}],"temperature":NaN}'

# (case id, body: raw bytes or JSON, how the 400 message starts)
CASES: list[tuple[str, Any, str]] = [
    ("malformed JSON", b'{"model": ', "invalid JSON body"),
    ("trailing garbage", b'{"model": "m"} x', "invalid JSON body"),
    ("not UTF-8", b'{"model": "\xff"}', ""),
    ("empty body", b"", "body: Field required"),
    ("array body", [OK], "body: Input should be a JSON object"),
    ("string body", "hi", "body: Input should be a JSON object"),
    ("number body", 42, "body: Input should be a JSON object"),
    ("null body", None, "body:"),
    ("model missing", _without("model"), "model: Field required"),
    ("model not a string", _with(model=7), "model: "),
    ("model too long", _with(model="m" * 257), "model: String should have at most 256"),
    ("messages missing", _without("messages"), "messages: Field required"),
    ("messages empty", _with(messages=[]), "messages: at least one message is required"),
    ("messages an object", _with(messages={}), "messages: "),
    ("message not an object", _with(messages=["hi"]), "messages.0"),
    ("role missing", _with(messages=[{"content": "x"}]), "messages.0.role: Field required"),
    ("role bot", _msg("x", "bot"), "messages.0.role: Input should be"),
    ("content missing", _with(messages=[{"role": "user"}]), "messages.0.content: Field"),
    ("content a number", _msg(5), "messages.0.content: Input should be"),
    ("content empty string", _msg(""), "messages.0: all messages must have non-empty"),
    ("content empty list", _msg([]), "messages.0: all messages must have non-empty"),
    ("block not an object", _msg(["x"]), "messages.0.content.0: content blocks must be"),
    ("block type missing", _msg([{"text": "x"}]), "messages.0.content.0.type: Field"),
    ("image block", _msg([{"type": "image"}]), 'messages.0.content.0: content block type "image"'),
    ("tool_result block", _msg([{"type": "tool_result"}]), "messages.0.content.0.tool_use_id: "),
    ("text not a string", _msg([{"type": "text", "text": 1}]), "messages.0.content.0.text: "),
    ("lone surrogate", SURROGATE, "messages.0.content.0.text: unpaired UTF-16 surrogate"),
    ("system a number", _with(system=3), "system: Input should be"),
    ("system bad block", _with(system=[{"type": "image"}]), "system.0: content block type"),
    ("max_tokens 0", _with(max_tokens=0), "max_tokens: Input should be greater than or equal"),
    ("max_tokens negative", _with(max_tokens=-5), "max_tokens: "),
    ("max_tokens a string", _with(max_tokens="ten"), "max_tokens: Input should be a valid int"),
    ("max_tokens fractional", _with(max_tokens=1.5), "max_tokens: "),
    ("temperature below 0", _with(temperature=-0.1), "temperature: Input should be greater"),
    ("temperature above 2", _with(temperature=2.01), "temperature: Input should be less"),
    ("temperature a string", _with(temperature="hot"), "temperature: "),
    ("temperature NaN", NAN, "temperature: "),
    ("top_p 0", _with(top_p=0), "top_p: Input should be greater than 0"),
    ("top_p above 1", _with(top_p=1.5), "top_p: "),
    ("top_k 0", _with(top_k=0), "top_k: Input should be greater than or equal to 1"),
    ("top_k fractional", _with(top_k=2.5), "top_k: "),
    ("stop_sequences a string", _with(stop_sequences="END"), "stop_sequences: Input should be"),
    ("stop_sequences empty entry", _with(stop_sequences=[""]), "stop_sequences.0: "),
    ("stop_sequences not strings", _with(stop_sequences=[1]), "stop_sequences.0: "),
    ("stop_sequences too many", _with(stop_sequences=["a"] * 33), "stop_sequences: List"),
    ("stop_sequences too long", _with(stop_sequences=["a" * 257]), "stop_sequences.0: "),
    ("stream not a bool", _with(stream=[]), "stream: "),
    ("metadata not an object", _with(metadata="u"), "metadata: "),
    ("server tool", _with(tools=[{"type": "bash_20250124", "name": "bash"}]), "tools.0: tool type"),
    ("tool_choice any", _with(tool_choice={"type": "any"}), 'tool_choice: type "any" needs tools'),
    ("thinking no budget", _with(thinking={"type": "enabled"}), "thinking.budget_tokens: Field"),
]


def _post(http: httpx.Client, path: str, body: Any) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(path, content=raw, headers={"content-type": "application/json"})


def assert_envelope(response: httpx.Response, status: int, error_type: str, start: str) -> None:
    assert response.status_code == status, response.text
    envelope = response.json()
    assert envelope["type"] == "error"
    assert envelope["error"]["type"] == error_type
    assert envelope["request_id"] == response.headers["request-id"]
    assert envelope["error"]["message"].startswith(start), envelope["error"]["message"]
    if status == 400:
        assert response.headers["x-should-retry"] == "false"


@pytest.mark.parametrize(("case", "body", "start"), CASES, ids=[c[0] for c in CASES])
def test_bad_messages_request(http: httpx.Client, case: str, body: Any, start: str) -> None:
    assert_envelope(_post(http, "/v1/messages", body), 400, "invalid_request_error", start)


def test_unknown_model_is_404(http: httpx.Client) -> None:
    response = _post(http, "/v1/messages", _with(model="claude-nonexistent"))
    assert_envelope(response, 404, "not_found_error", "model: claude-nonexistent")
    response = _post(http, "/v1/messages/count_tokens", _with(model="claude-nonexistent"))
    assert_envelope(response, 404, "not_found_error", "model: claude-nonexistent")
    response = http.get("/v1/models/claude-nonexistent")
    assert_envelope(response, 404, "not_found_error", "model: claude-nonexistent")


SHARED = {"malformed JSON", "array body", "messages empty", "role bot", "lone surrogate"}


@pytest.mark.parametrize(("case", "body", "start"), [c for c in CASES if c[0] in SHARED])
def test_count_tokens_refuses_the_same(
    http: httpx.Client, case: str, body: Any, start: str
) -> None:
    response = _post(http, "/v1/messages/count_tokens", body)
    assert_envelope(response, 400, "invalid_request_error", start)


def test_sdk_maps_400_and_404(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model=MODEL, max_tokens=0, messages=USER)  # type: ignore[arg-type]
    assert bad.value.body["error"]["message"].startswith("max_tokens:")  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="nope", max_tokens=1, messages=USER)  # type: ignore[arg-type]
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("nope")


def test_unknown_fields_are_ignored(http: httpx.Client) -> None:
    block = {"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}, "x": 1}
    body = _with(
        response_format={"type": "json"},
        service_tier="auto",
        output_config={"effort": "low"},
        messages=[{"role": "user", "content": [block], "name": "u"}],
    )
    response = http.post("/v1/messages", json=body)
    assert response.status_code == 200, response.text


CONTENT_TYPES = [None, "text/plain", "application/x-www-form-urlencoded", "application/json"]


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_json_is_read_whatever_the_content_type(
    http: httpx.Client, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    raw = json.dumps({"model": MODEL, "messages": USER}).encode()
    response = http.post("/v1/messages/count_tokens", content=raw, headers=headers)
    assert response.status_code == 200, response.text
    form = http.post("/v1/messages/count_tokens", content=b"model=x", headers=headers)
    assert form.status_code == 400
    assert form.json()["error"]["message"].startswith("invalid JSON body")


@pytest.mark.parametrize(
    ("version", "status"),
    [
        (None, 200),
        ("2023-06-01", 200),
        ("2026-10-21", 200),
        ("2027-01-15", 200),
        ("garbage", 400),
        ("2023-06-01, 2023-06-01", 400),
        ("2023-02-30", 400),
    ],
)
def test_anthropic_version(http: httpx.Client, version: str | None, status: int) -> None:
    headers = {} if version is None else {"anthropic-version": version}
    response = http.post("/v1/messages/count_tokens", json=OK, headers=headers)
    assert response.status_code == status, response.text
    if status == 400:
        assert (
            response.json()["error"]["message"]
            == f'anthropic-version: "{version}" is not a valid version'
        )


def test_both_sdk_generations_versions_work(stack: Stack, account: ApiAccount) -> None:
    for headers in ({}, {"anthropic-version": "2023-06-01"}):
        client = anthropic.Anthropic(
            base_url=stack.base_url, api_key=account.key, max_retries=0, default_headers=headers
        )
        reply = client.messages.create(model=MODEL, max_tokens=2, messages=USER)  # type: ignore[arg-type]
        assert reply.usage.output_tokens >= 1


# ------------------------------------------------------------------------------ body size


def test_body_over_32_mb_is_413(http: httpx.Client) -> None:
    big = b'{"model":"m","messages":[{"role":"user","content":"' + b"a" * (32 * MB) + b'"}]}'
    response = http.post("/v1/messages", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "request_too_large"

    def chunks() -> Any:
        for start in range(0, len(big), MB):
            yield big[start : start + MB]

    chunked = http.post("/v1/messages", content=chunks())
    assert chunked.status_code == 413
    assert chunked.json()["error"]["type"] == "request_too_large"


def _raw_request(stack: Stack, head: bytes, body_parts: list[bytes]) -> tuple[bytes, float]:
    """Send `head` and `body_parts` on a raw socket, never finishing the body; the answer."""
    url = urlsplit(stack.base_url)
    with socket.create_connection((url.hostname or "", url.port or 80), timeout=20) as sock:
        started = time.monotonic()
        try:
            sock.sendall(head)
            for part in body_parts:
                sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before taking the whole upload
        answer = sock.recv(65536)
        seconds = time.monotonic() - started
        try:
            while chunk := sock.recv(65536):  # the rest, up to the server's close
                answer += chunk
        except ConnectionResetError:
            pass  # closing with our unread upload still queued resets the connection
        return answer, seconds


def test_413_comes_before_the_body_is_read(stack: Stack, account: ApiAccount) -> None:
    """The declared length alone is enough; a chunked body is cut off at the limit. Neither
    body is ever completed, so a server waiting for the whole body would time out instead."""
    common = (
        b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"x-api-key: {account.key}\r\n".encode()
    )
    declared = common + f"content-length: {100 * MB}\r\n\r\n".encode()
    answer, _ = _raw_request(stack, declared, [b'{"model":'])
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    chunk = b"%x\r\n" % MB + b"a" * MB + b"\r\n"
    chunked = common + b"transfer-encoding: chunked\r\n\r\n"
    answer, _ = _raw_request(stack, chunked, [chunk] * 33)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"\r\nconnection: close\r\n" in answer


# ------------------------------------------------------------ credentials before the body


@pytest.mark.parametrize(
    ("path", "credentials"),
    [
        ("/v1/messages", "x-api-key: ak_not-a-key-at-all-not-a-key-at-all-not-a-key\r\n"),
        ("/v1/messages", "authorization: Bearer not.a.jwt\r\n"),
        ("/v1/messages", ""),
        ("/v1/messages/count_tokens", "x-api-key: ak_bogus\r\n"),
        ("/admin/accounts", "authorization: Bearer not-the-admin-token\r\n"),
        ("/admin/accounts", ""),
    ],
)
def test_bad_credentials_are_refused_before_the_body_is_read(
    stack: Stack, path: str, credentials: str
) -> None:
    """30 MB declared, a few bytes sent: the 401 comes from the headers alone. A server that
    read (or parsed) the body first would wait for the rest and time out instead."""
    head = (
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{credentials}"
        f"content-length: {30 * MB}\r\n\r\n"
    ).encode()
    answer, _ = _raw_request(stack, head, [b'{"model":"abl-tiny","messages":[{},{},'])
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1].split(b"\n", 1)[0])
    assert body["error"]["type"] == "authentication_error"


def test_a_body_with_too_many_json_values_is_413(http: httpx.Client) -> None:
    """Within the byte limit, but more values than ABL_MAX_JSON_VALUES: refused before parsing."""
    body = b'{"model":"abl-tiny","messages":[' + b",".join([b"{}"] * 200_000) + b"]}"
    response = http.post("/v1/messages", content=body)
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["type"] == "request_too_large"
    assert "JSON values" in error["message"] and "ABL_MAX_JSON_VALUES" in error["message"]
    # Commas inside strings are not values: a long text with many commas is fine.
    text = ", " * 150_000
    response = http.post("/v1/messages/count_tokens", json=_msg(text))
    assert response.status_code == 200, response.text


def test_many_errors_in_a_large_body_name_the_first_and_count_the_rest(
    http: httpx.Client,
) -> None:
    body = _with(messages=[{"role": "user", "content": "x"}] + [{}] * 5_000)
    response = http.post("/v1/messages", json=body)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert message.startswith("messages.1.role: Field required; messages.1.content: Field required")
    assert message.endswith(" more errors)")
    assert len(message) < 2_000

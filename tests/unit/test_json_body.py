"""JsonBodyMiddleware: bodies are JSON whatever Content-Type says."""

import asyncio

import pytest
from starlette.types import Message, Receive, Scope, Send

from api.middleware import JsonBodyMiddleware


def _content_type_seen(method: str, headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    seen: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.extend(v for k, v in scope["headers"] if k == b"content-type")

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        return None

    scope: Scope = {"type": "http", "method": method, "path": "/v1/messages", "headers": headers}
    asyncio.run(JsonBodyMiddleware(app)(scope, receive, send))
    return seen


@pytest.mark.parametrize(
    ("declared", "seen"),
    [
        (None, b"application/json"),
        (b"text/plain", b"application/json"),
        (b"application/x-www-form-urlencoded", b"application/json"),
        (b"multipart/form-data; boundary=x", b"application/json"),
        (b"application/json", b"application/json"),
        (b"application/json; charset=utf-8", b"application/json; charset=utf-8"),
        (b"Application/JSON", b"Application/JSON"),
        (b"application/vnd.api+json", b"application/vnd.api+json"),
    ],
)
def test_bodies_are_read_as_json(declared: bytes | None, seen: bytes) -> None:
    headers = [] if declared is None else [(b"content-type", declared)]
    assert _content_type_seen("POST", headers) == [seen]


def test_requests_without_a_body_are_left_alone() -> None:
    assert _content_type_seen("GET", []) == []

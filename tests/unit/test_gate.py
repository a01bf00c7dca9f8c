"""The credential gate on its own (no database): refusals come from the headers alone, without
the body ever being read, and bodies to paths without credentials are capped."""

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import SecretStr
from starlette.types import Message, Receive, Scope, Send

from api.gate import ANONYMOUS_BODIES, ANONYMOUS_BODY_BYTES, CredentialGateMiddleware
from api.settings import ApiSettings

ADMIN_TOKEN = "unit-admin-token-" + "0123456789abcdef" * 2
MB = 1024 * 1024


class Downstream:
    """The app behind the gate: records what reached it, reads its body if asked to."""

    def __init__(self, read_body: bool = False, hold: asyncio.Event | None = None) -> None:
        self.paths: list[str] = []
        self.read_body = read_body
        self.hold = hold
        self.inside = 0
        self.most_inside = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.paths.append(scope["path"])
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            if self.hold is not None:
                await self.hold.wait()
            while self.read_body:
                message = await receive()
                if not message.get("more_body"):
                    break
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
        finally:
            self.inside -= 1


class NoThrottle:
    """The admin throttle's contract, never refusing (the throttle has its own tests)."""

    async def check(self, address: str) -> int:
        return 0

    async def failed(self, address: str) -> None:
        return None

    async def succeeded(self, address: str) -> None:
        return None


def _scope(path: str, headers: dict[str, str], method: str = "POST") -> Scope:
    settings = ApiSettings(admin_token=SecretStr(ADMIN_TOKEN))
    platform = SimpleNamespace(settings=settings, database_url=None)
    state = SimpleNamespace(settings=settings, platform=platform, admin_throttle=NoThrottle())
    app = SimpleNamespace(state=state)
    return {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "query_string": b"",
        "app": app,
        "state": {"request_id": "req_unit"},
    }


async def _call(
    gate: CredentialGateMiddleware, scope: Scope, body: bytes = b"x"
) -> tuple[int, dict[str, Any], bool]:
    """The status and JSON body of the answer, and whether the request body was read (the
    answer's headers go to `scope["answer_headers"]`)."""
    read = False
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal read
        read = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await gate(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    status = start["status"]
    scope["answer_headers"] = dict(start.get("headers", []))
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, (json.loads(payload) if payload.startswith(b"{") else {}), read


HUGE = {"content-type": "application/json", "content-length": str(30 * MB)}


@pytest.mark.parametrize(
    ("path", "credentials"),
    [
        ("/v1/messages", {}),
        ("/v1/messages", {"authorization": "Bearer not.a.jwt"}),
        ("/v1/messages/count_tokens", {"authorization": "Basic eDp5"}),
        ("/admin/accounts", {}),
        ("/admin/accounts", {"authorization": "Bearer wrong-token"}),
        ("/admin/accounts", {"x-api-key": ADMIN_TOKEN}),
    ],
)
def test_refused_from_the_headers_without_reading_the_body(
    path: str, credentials: dict[str, str]
) -> None:
    downstream = Downstream(read_body=True)
    gate = CredentialGateMiddleware(downstream)
    scope = _scope(path, {**HUGE, **credentials})
    status, body, read = asyncio.run(_call(gate, scope))
    assert status == 401
    assert body["error"]["type"] == "authentication_error"
    assert body["request_id"] == "req_unit"
    assert not read and downstream.paths == []
    # The unread 30 MB are not drained: the connection closes after the answer.
    assert scope["answer_headers"][b"connection"] == b"close"
    assert scope["route"].path == ("/v1/*" if path.startswith("/v1/") else "/admin/*")


def test_a_small_refused_body_keeps_the_connection() -> None:
    scope = _scope("/v1/messages", {"content-length": "100"})
    status, _, read = asyncio.run(_call(CredentialGateMiddleware(Downstream()), scope))
    assert status == 401 and not read
    assert b"connection" not in scope["answer_headers"]


def test_the_admin_token_lets_the_request_through_with_its_body() -> None:
    downstream = Downstream(read_body=True)
    gate = CredentialGateMiddleware(downstream)
    headers = {**HUGE, "authorization": f"Bearer {ADMIN_TOKEN}"}
    status, _, read = asyncio.run(_call(gate, _scope("/admin/accounts", headers)))
    assert status == 200 and read and downstream.paths == ["/admin/accounts"]


def test_paths_without_credentials_pass_and_their_bodies_are_small() -> None:
    downstream = Downstream(read_body=True)
    gate = CredentialGateMiddleware(downstream)
    status, _, _ = asyncio.run(_call(gate, _scope("/healthz", {}, method="GET")))
    assert status == 200
    declared = {"content-length": str(ANONYMOUS_BODY_BYTES + 1)}
    status, body, read = asyncio.run(_call(gate, _scope("/healthz", declared)))
    assert status == 413 and body["error"]["type"] == "request_too_large" and not read


def test_bodies_without_credentials_are_read_a_few_at_a_time() -> None:
    async def scenario() -> int:
        hold = asyncio.Event()
        downstream = Downstream(read_body=True, hold=hold)
        gate = CredentialGateMiddleware(downstream)
        scope = _scope("/somewhere", {"content-length": "10"})
        calls = [asyncio.create_task(_call(gate, dict(scope))) for _ in range(3 * ANONYMOUS_BODIES)]
        await asyncio.sleep(0.05)
        assert downstream.inside == ANONYMOUS_BODIES
        hold.set()
        await asyncio.gather(*calls)
        return downstream.most_inside

    assert asyncio.run(scenario()) == ANONYMOUS_BODIES

"""Credentials first: every `/v1` and `/admin` request is authenticated from its headers before a
byte of its body is read, so a caller without valid credentials costs no memory and no parsing.

FastAPI reads and parses a body before it runs any dependency, the credential checks included:
a bogus key with a 30 MB body was read and parsed in full before its 401 (docs/security.md).
Here the same checks run first (`authenticate` for `/v1`, the admin token for `/admin`), on the
headers alone; a refusal is answered without reading the body, and a principal found is kept on
the request for the route's own dependency. A refused request whose body is large (over
`DRAIN_BYTES`, or of unknown length) is answered with `connection: close`: reading the rest of
an upload nobody wants only to throw it away costs more than the client's reconnect.

Other paths (health, metrics, the OpenAPI document) take no credentials and have no use for a
body: at most `ANONYMOUS_BODIES` of their bodies are read at once, each at most
`ANONYMOUS_BODY_BYTES`.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.admin.access import verify_admin
from api.credentials import authenticate
from api.errors import handled_error_response
from api.middleware import BodyLimitMiddleware

ANONYMOUS_BODIES = 4
ANONYMOUS_BODY_BYTES = 64 * 1024
# Up to this size, the unread body of a refused request is drained and the connection kept.
DRAIN_BYTES = 1024 * 1024


@dataclass(frozen=True)
class RefusedAt:
    """Stands for the route of a request refused before routing: `abl_http_responses_total`
    (api/metrics.py) labels it by the prefix its credentials were checked for."""

    path: str


async def _no_body() -> Message:
    raise RuntimeError("the credential gate must not read the request body")


def _declared_length(scope: Scope) -> int | None:
    """The body's declared length: 0 without one, None when unknown (chunked, or nonsense)."""
    for name, value in scope.get("headers", []):
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            return int(value) if value.strip().isdigit() else None
    return 0


class CredentialGateMiddleware:
    """401/403 from the headers alone for `/v1` and `/admin`; anonymous bodies capped."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._anonymous_app = BodyLimitMiddleware(app, ANONYMOUS_BODY_BYTES)
        self._anonymous_bodies = anyio.Semaphore(ANONYMOUS_BODIES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        check: Callable[[Request], Awaitable[object]]
        if path.startswith("/v1/"):
            check, prefix = authenticate, "/v1/*"
        elif path == "/admin" or path.startswith("/admin/"):
            check, prefix = verify_admin, "/admin/*"
        elif _declared_length(scope) != 0:
            async with self._anonymous_bodies:
                await self._anonymous_app(scope, receive, send)
            return
        else:
            await self.app(scope, receive, send)
            return
        # The same scope (and so the same request state) as the route's own Request.
        request = Request(scope, _no_body)
        try:
            await check(request)
        except Exception as exc:
            response = await handled_error_response(request, exc)
            if response is None:
                raise
            scope["route"] = RefusedAt(prefix)
            length = _declared_length(scope)
            if length is None or length > DRAIN_BYTES:
                response.headers["connection"] = "close"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

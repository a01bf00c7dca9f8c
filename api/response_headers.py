"""Headers a response must carry whatever its outcome (the caller's `anthropic-ratelimit-*`).

They are collected on the request while it is handled and added in one place: the error handler
for error responses, the route for its own. So neither errors nor the code that raises them need
to know about rate limits, and no exception is changed after it was raised.

A route may also name a `fallback`: how to learn the headers when nothing recorded any (a body
that failed validation never reached the rate limiter, yet its caller is known).
"""

from collections.abc import Awaitable, Callable

from starlette.requests import Request

HeaderSource = Callable[[], Awaitable[dict[str, str]]]


class ResponseHeaders:
    """The headers collected for one request."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.fallback: HeaderSource | None = None

    def update(self, headers: dict[str, str]) -> None:
        self.values.update(headers)

    async def resolve(self) -> dict[str, str]:
        """What was recorded, else what the fallback says ({} without either)."""
        if self.values or self.fallback is None:
            return dict(self.values)
        return await self.fallback()


def response_headers(request: Request) -> ResponseHeaders:
    """The request's collector, created on first use."""
    collected = getattr(request.state, "response_headers", None)
    if not isinstance(collected, ResponseHeaders):
        collected = ResponseHeaders()
        request.state.response_headers = collected
    return collected

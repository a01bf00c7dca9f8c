"""Request bodies: counted, parsed and validated off the event loop, within a budget of values.

FastAPI reads and parses a body on the event loop, and pydantic validates it there: a 30 MB body
of `[{},{},...]` took seconds of loop time and gigabytes of memory (docs/security.md). Routes of
`BodyRoute` hand FastAPI bodies it has nothing left to do for:
- the body's JSON values are counted first, without parsing (`within_budget`): more than
  `ABL_MAX_JSON_VALUES` is a 413, before any object is built;
- then it is parsed and validated by the route's own body field, in a thread (at most
  `PARSE_THREADS` at once) unless it is small enough that the hop would cost more;
- FastAPI gets the validated model, which its own validation returns as it is (pydantic does
  not revalidate instances). For an invalid body it gets `_Refused`, which every body model
  refuses (reading any attribute of it raises), and the body's own errors, kept on the request,
  replace FastAPI's in the validation handler (api/errors.py). So they still surface after the
  route's dependencies ran, with the headers those set, as they did before.
Only bodies whose type is a model with fields (or such a model or None) take this path; any
other body type (which a stand-in might satisfy) is left to FastAPI.
"""

import json
import types
import typing
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
from fastapi import Request, Response
from fastapi.exceptions import HTTPException
from fastapi.routing import APIRoute
from pydantic import BaseModel

from api.errors import BODY_ERRORS_STATE
from api.settings import ApiSettings

# Bodies up to this size are parsed in place: a thread hop costs more than they do.
INLINE_BYTES = 8 * 1024
# Threads that parse larger bodies; more wait (their bytes are already bounded by the size limit).
PARSE_THREADS = 2
# Validation errors kept per request; the message says how many there were in all.
REPORTED_ERRORS = 20
# Bytes that each start or separate JSON values (outside strings).
_STRUCTURE = (b",", b"[", b"{")
_BACKSLASH = ord("\\")


def within_budget(body: bytes, max_values: int) -> bool:
    """Whether `body` holds fewer than about `max_values` JSON values (elements, members and
    containers), counted from its commas and opening brackets outside strings: without parsing
    or copying it, in short C calls (`bytes.find`, `bytes.count`) that let other threads run."""
    outside = sum(body.count(c) for c in _STRUCTURE)
    position, strings = 0, 0
    while outside >= max_values:
        start = body.find(b'"', position)
        if start < 0:
            return False
        end = _string_end(body, start)
        outside -= sum(body.count(c, start, end) for c in _STRUCTURE)
        position = end + 1
        strings += 1
        if strings > 2 * max_values:  # a string is a value, or the key of one
            return False
    return True


def _string_end(body: bytes, start: int) -> int:
    """The index of the quote that closes the string opened at `start` (or the body's end)."""
    end = start
    while True:
        end = body.find(b'"', end + 1)
        if end < 0:
            return len(body)
        backslashes = 0
        while body[end - 1 - backslashes] == _BACKSLASH:
            backslashes += 1
        if backslashes % 2 == 0:
            return end


class BodyParser:
    """The process's parsing threads and value budget (one per app: `app.state.body_parser`)."""

    def __init__(self, max_values: int, threads: int = PARSE_THREADS) -> None:
        self.max_values = max_values
        self.limiter = anyio.CapacityLimiter(threads)

    @classmethod
    def of(cls, settings: ApiSettings) -> "BodyParser":
        return cls(settings.max_json_values)

    async def parse(self, body: bytes, validate: Callable[[Any], "Parsed"]) -> "Parsed":
        work = self._parse_sync
        if len(body) <= INLINE_BYTES:
            return work(body, validate)
        return await anyio.to_thread.run_sync(work, body, validate, limiter=self.limiter)

    def _parse_sync(self, body: bytes, validate: Callable[[Any], "Parsed"]) -> "Parsed":
        if not within_budget(body, self.max_values):
            raise HTTPException(
                413,
                f"request body has more than {self.max_values} JSON values"
                " (array elements and object members; ABL_MAX_JSON_VALUES)",
            )
        # json.JSONDecodeError propagates: FastAPI turns it into its json_invalid error.
        return validate(json.loads(body))


class Parsed:
    """A body after validation: the value, or the (first few) errors and how many in all."""

    def __init__(self, value: Any = None, errors: list[Any] | None = None, total: int = 0):
        self.value = value
        self.errors = errors
        self.total = total


class _Refused:
    """What FastAPI validates in place of a body found invalid: pydantic reads a model's fields
    as attributes of it, and every read fails, so no model (even one whose fields all have
    defaults) accepts it; a validator that looks into it fails the same way."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        raise ValueError("this body was refused; its own errors are reported")


def _takes_models_only(annotation: Any) -> bool:
    """Whether a body of this type must be a model with fields (or None): a `_Refused` then
    fails validation whatever the model."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _takes_models_only(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(members) and all(_takes_models_only(m) for m in members)
    return (
        isinstance(annotation, type)
        and issubclass(annotation, BaseModel)
        and bool(annotation.model_fields)
    )


class _ParsedBodyRequest(Request):
    """`json()` is the body validated by `validate`, parsed off the event loop when large."""

    def __init__(self, request: Request, validate: Callable[[Any], Parsed]) -> None:
        super().__init__(request.scope, request.receive)
        self._validate = validate

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            parser = getattr(self.app.state, "body_parser", None)
            if not isinstance(parser, BodyParser):
                parser = BodyParser.of(ApiSettings())
            parsed = await parser.parse(await self.body(), self._validate)
            if parsed.errors is not None:
                setattr(self.state, BODY_ERRORS_STATE, (parsed.errors, parsed.total))
                self._json = _Refused()
            else:
                self._json = parsed.value
        return self._json


class BodyRoute(APIRoute):
    """An APIRoute whose JSON body is parsed and validated as this module says."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        field = self.body_field
        if (
            field is None
            or getattr(self, "_embed_body_fields", False)
            or not _takes_models_only(field.field_info.annotation)
        ):
            return handler  # no body, several body parameters, or not a model: FastAPI's way

        def validate(data: Any) -> Parsed:
            value, errors = field.validate(data, {}, loc=("body",))
            if errors:
                return Parsed(None, list(errors[:REPORTED_ERRORS]), len(errors))
            return Parsed(value)

        async def parsed_body_handler(request: Request) -> Response:
            return await handler(_ParsedBodyRequest(request, validate))

        return parsed_body_handler

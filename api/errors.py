"""Error types and the only exception handlers: everything renders Anthropic's error envelope.

Raise an `ApiError` subclass anywhere before the first response byte; the handler turns it into
`{"type":"error","error":{"type","message"},"request_id"}` with the matching status, the
`request-id` header, and `x-should-retry: false` on errors a retry cannot fix. FastAPI's 422 is
never sent: request validation failures are 400 `invalid_request_error` with dotted paths.
"""

import logging
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException

from api.ids import new_request_id
from api.response_headers import response_headers
from contract.errors import ErrorType

logger = logging.getLogger(__name__)

# Statuses for which a retry cannot succeed; the SDKs obey `x-should-retry`.
NO_RETRY_STATUSES = frozenset({400, 401, 402, 403, 404, 405, 413})
# First element of a FastAPI error location: where the bad input was, not part of its path.
_LOC_SOURCES = frozenset({"body", "query", "path", "header", "cookie"})
# Root-level type errors: the body was JSON but not an object.
_NOT_AN_OBJECT = frozenset({"model_attributes_type", "model_type", "dict_type"})
# Request state under which api/request_body.py keeps a body's validation errors (found off the
# event loop), with how many there were in all: they replace FastAPI's errors about the body.
BODY_ERRORS_STATE = "body_errors"


class ApiError(Exception):
    """An error with an Anthropic error type; subclasses fix `status` and `error_type`."""

    status: ClassVar[int] = 500
    error_type: ClassVar[ErrorType] = "api_error"
    default_message: ClassVar[str] = "Internal server error"

    def __init__(self, message: str | None = None, *, headers: Mapping[str, str] | None = None):
        self.message: str = message or self.default_message
        self.headers: dict[str, str] = dict(headers or {})
        super().__init__(self.message)


class InvalidRequestError(ApiError):
    status = 400
    error_type = "invalid_request_error"
    default_message = "Invalid request"


class AuthenticationError(ApiError):
    status = 401
    error_type = "authentication_error"
    default_message = "Authentication error"


class BillingError(ApiError):
    status = 402
    error_type = "billing_error"
    default_message = "Billing error"


class PermissionDeniedError(ApiError):
    status = 403
    error_type = "permission_error"
    default_message = "Permission denied"


class NotFoundError(ApiError):
    status = 404
    error_type = "not_found_error"
    default_message = "Not found"


class RequestTooLargeError(ApiError):
    status = 413
    error_type = "request_too_large"
    default_message = "Request too large"


class _RetryAfterError(ApiError):
    """An error that tells the client when to retry (`retry-after`, whole seconds, >= 1)."""

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after: int = 1,
        headers: Mapping[str, str] | None = None,
    ):
        # SDK2 ignores values <= 0 and SDK0 ignores values > 60 (both fall back to backoff).
        super().__init__(
            message, headers={**(headers or {}), "retry-after": str(max(1, retry_after))}
        )
        self.retry_after: int = max(1, retry_after)


class RateLimitError(_RetryAfterError):
    status = 429
    error_type = "rate_limit_error"
    default_message = "Rate limit exceeded"


class ApiInternalError(ApiError):
    status = 500
    error_type = "api_error"
    default_message = "Internal server error"


class GatewayTimeoutError(ApiError):
    status = 504
    error_type = "timeout_error"
    default_message = "Request timed out"


class OverloadedError(_RetryAfterError):
    status = 529
    error_type = "overloaded_error"
    default_message = "Overloaded"


_BY_TYPE: dict[ErrorType, type[ApiError]] = {
    cls.error_type: cls
    for cls in (
        InvalidRequestError,
        AuthenticationError,
        BillingError,
        PermissionDeniedError,
        NotFoundError,
        RequestTooLargeError,
        RateLimitError,
        ApiInternalError,
        GatewayTimeoutError,
        OverloadedError,
    )
}


def api_error_for(error_type: str, message: str) -> ApiError:
    """The typed error for an Anthropic error type (e.g. a worker's ErrorEvent); unknown -> 500."""
    cls = next((c for t, c in _BY_TYPE.items() if t == error_type), ApiInternalError)
    return cls(message)


def error_body(error_type: str, message: str, request_id: str) -> dict[str, Any]:
    """Anthropic's error envelope."""
    return {
        "type": "error",
        "error": {"type": error_type, "message": message},
        "request_id": request_id,
    }


def request_id_of(request: Request) -> str:
    """The request's id as set by the request-id middleware, or a fresh one if it did not run."""
    request_id = getattr(request.state, "request_id", None)
    if not isinstance(request_id, str) or not request_id:
        request_id = new_request_id()
        request.state.request_id = request_id
    return request_id


def error_response(
    request: Request,
    status: int,
    error_type: str,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The one place an error becomes an HTTP response."""
    request_id = request_id_of(request)
    # Messages may echo input, and JSON input may hold lone surrogates that UTF-8 cannot encode.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    out = dict(headers or {})
    out["request-id"] = request_id
    if status in NO_RETRY_STATUSES:
        out["x-should-retry"] = "false"
    return JSONResponse(
        error_body(error_type, message, request_id), status_code=status, headers=out
    )


def _format_loc(loc: Iterable[Any]) -> str:
    return ".".join(str(part) for part in loc)


def format_validation_error(error: Mapping[str, Any]) -> str:
    """One pydantic/FastAPI error as `dotted.path: message`, without the `body.` prefix."""
    loc = list(error.get("loc") or ())
    had_source = bool(loc) and loc[0] in _LOC_SOURCES
    source = loc.pop(0) if had_source else "body"
    error_type = error.get("type", "")
    message = str(error.get("msg", "Invalid value"))
    if error_type == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "could not parse")
        where = f" at position {loc[0]}" if loc else ""
        return f"invalid JSON body: {detail}{where}"
    if loc:
        return f"{_format_loc(loc)}: {message}"
    if error_type in _NOT_AN_OBJECT:
        return f"{source}: Input should be a JSON object"
    if error_type == "missing":
        return f"{source}: Field required"
    # Root-level checks (e.g. per-message rules) carry their own path in the message.
    return message


def format_validation_errors(errors: Iterable[Mapping[str, Any]]) -> str:
    """All errors, deduplicated and joined with `; `."""
    messages = list(dict.fromkeys(format_validation_error(e) for e in errors))
    return "; ".join(messages) or "Invalid request"


async def _handle_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    headers = {**await response_headers(request).resolve(), **exc.headers}
    return error_response(request, exc.status, exc.error_type, exc.message, headers)


def _validation_errors(request: Request, exc: RequestValidationError) -> tuple[list[Any], int]:
    """The errors to report, and how many there were: the body's own, when they were found
    before FastAPI looked at it (FastAPI then only saw a stand-in that fails at once)."""
    errors = list(exc.errors())
    kept = getattr(request.state, BODY_ERRORS_STATE, None)
    if kept is None:
        return errors, len(errors)
    body_errors, total = kept
    others = [e for e in errors if (e.get("loc") or ("",))[0] != "body"]
    return [*others, *body_errors], len(others) + total


async def _handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors, total = _validation_errors(request, exc)
    message = format_validation_errors(errors)
    if total > len(errors):
        message += f" (and {total - len(errors)} more errors)"
    headers = await response_headers(request).resolve()
    return error_response(request, 400, InvalidRequestError.error_type, message, headers)


async def _handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    error_type: ErrorType
    if status == 404:
        error_type, message = NotFoundError.error_type, "Not found"
        if exc.detail and exc.detail != "Not Found":
            message = str(exc.detail)
    elif status >= 500:
        error_type, message = ApiInternalError.error_type, str(exc.detail)
    else:
        cls = next((c for c in _BY_TYPE.values() if c.status == status), InvalidRequestError)
        error_type, message = cls.error_type, str(exc.detail)
    return error_response(request, status, error_type, message, exc.headers)


async def _handle_dependency_down(request: Request, exc: Exception) -> JSONResponse:
    """Postgres or Redis unreachable: a typed, retryable error instead of a traceback."""
    which = "database" if isinstance(exc, DBAPIError) else "queue"
    logger.warning("%s unavailable on %s: %s", which, request.url.path, exc)
    return error_response(
        request,
        ApiInternalError.status,
        ApiInternalError.error_type,
        f"the {which} is unavailable; retry shortly",
        {"retry-after": "2"},
    )


async def _handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(
        request, ApiInternalError.status, ApiInternalError.error_type, "Internal server error"
    )


_OUTAGES = (DBAPIError, RedisConnectionError, RedisTimeoutError)


async def handled_error_response(request: Request, exc: Exception) -> JSONResponse | None:
    """The answer the app's handlers give `exc`, for middleware that runs before the routes
    (api/gate.py); None for an exception they leave to the server's error handling."""
    if isinstance(exc, ApiError):
        return await _handle_api_error(request, exc)
    if isinstance(exc, _OUTAGES):
        return await _handle_dependency_down(request, exc)
    return None


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers; call once from create_app()."""
    app.add_exception_handler(ApiError, _handle_api_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(HTTPException, _handle_http_exception)
    for outage in _OUTAGES:
        app.add_exception_handler(outage, _handle_dependency_down)
    # Starlette runs this in ServerErrorMiddleware (outermost), then re-raises for the server log.
    app.add_exception_handler(Exception, _handle_unexpected)

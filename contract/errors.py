"""The Anthropic error types of the platform: what a worker may report, what the API renders."""

from typing import Literal

ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "billing_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "api_error",
    "timeout_error",
    "overloaded_error",
]
# Every type, in the order the OpenAPI document lists them.
ERROR_TYPES: tuple[ErrorType, ...] = ErrorType.__args__  # type: ignore[attr-defined]

INVALID_REQUEST: ErrorType = "invalid_request_error"
# Something failed on our side; nothing was charged.
API_ERROR: ErrorType = "api_error"
# The platform stopped the request (shutdown, lost Redis) or has no room; retry it.
OVERLOADED: ErrorType = "overloaded_error"

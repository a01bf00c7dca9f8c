"""The served OpenAPI document, corrected to what the API really answers.

FastAPI documents a 422 `HTTPValidationError` on every operation with parameters or a body; this
API never sends 422 (validation failures are 400 `invalid_request_error`, see api/errors.py), so
the document describes Anthropic's error envelope instead, on the statuses an operation can give.
"""

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from contract.errors import ERROR_TYPES

ERROR_SCHEMA: dict[str, Any] = {
    "title": "ErrorResponse",
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"type": "string", "const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {
                "type": {
                    "type": "string",
                    "enum": list(ERROR_TYPES),
                },
                "message": {"type": "string"},
            },
        },
        "request_id": {"type": "string"},
    },
}
_ERROR_RESPONSE = {
    "description": "Anthropic error envelope (invalid_request_error: the message names the field)",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
}
_FASTAPI_VALIDATION = ("HTTPValidationError", "ValidationError")


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = corrected(
                get_openapi(title=app.title, version=app.version, routes=app.routes)
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def corrected(document: dict[str, Any]) -> dict[str, Any]:
    """Swap every 422 for a 400 with the error envelope; drop FastAPI's validation schemas."""
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.get("responses") if isinstance(operation, dict) else None
            if responses is not None and responses.pop("422", None) is not None:
                responses.setdefault("400", _ERROR_RESPONSE)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name in _FASTAPI_VALIDATION:
        schemas.pop(name, None)
    schemas["ErrorResponse"] = ERROR_SCHEMA
    return document

"""The served OpenAPI document never promises FastAPI's 422."""

import json

from api.main import create_app
from api.settings import ApiSettings


def test_document_describes_400_envelopes_not_422() -> None:
    app = create_app(ApiSettings(database_url="postgresql+psycopg://x@127.0.0.1:1/x"))
    document = app.openapi()
    text = json.dumps(document)
    assert '"422"' not in text and "HTTPValidationError" not in text
    messages = document["paths"]["/v1/messages"]["post"]["responses"]
    assert messages["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }
    assert "ErrorResponse" in document["components"]["schemas"]
    assert app.openapi() is document  # built once

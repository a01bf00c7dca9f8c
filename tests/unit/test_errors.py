"""Error handlers: every failure is Anthropic's envelope with a request id, never FastAPI's 422."""

import logging

import anthropic
import httpx2
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.testclient import TestClient

from api.anthropic.protocol import MessagesRequest
from api.errors import (
    ApiError,
    ApiInternalError,
    AuthenticationError,
    BillingError,
    GatewayTimeoutError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    RateLimitError,
    RequestTooLargeError,
    api_error_for,
    error_body,
    install_error_handlers,
)

FIXED_ID = "req_fixedfixedfixedfixedfixe"
VALID = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

RAISABLE: dict[str, ApiError] = {
    "invalid": InvalidRequestError("max_tokens: 5000 > 1024, the model's output limit"),
    "auth": AuthenticationError("invalid x-api-key"),
    "billing": BillingError("insufficient credits"),
    "permission": PermissionDeniedError(),
    "notfound": NotFoundError("model: nope"),
    "toolarge": RequestTooLargeError(),
    "ratelimit": RateLimitError(
        "too many requests", retry_after=7, headers={"anthropic-ratelimit-requests-limit": "5"}
    ),
    "internal": ApiInternalError(),
    "timeout": GatewayTimeoutError(),
    "overloaded": OverloadedError(),
}


def make_app(*, with_request_id: bool) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    if with_request_id:

        @app.middleware("http")
        async def request_id(request: Request, call_next):  # type: ignore[no-untyped-def]
            request.state.request_id = FIXED_ID
            response: Response = await call_next(request)
            response.headers["request-id"] = FIXED_ID
            return response

    @app.post("/v1/messages")
    def create(body: MessagesRequest) -> dict[str, str]:
        return {"model": body.model}

    @app.get("/raise/{name}")
    def raise_named(name: str) -> None:
        raise RAISABLE[name]

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret detail")

    return app


@pytest.fixture
def client() -> TestClient:
    return TestClient(make_app(with_request_id=False), raise_server_exceptions=False)


def assert_envelope(response: httpx2.Response | object, status: int, error_type: str) -> str:
    assert response.status_code == status  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    request_id = response.headers["request-id"]  # type: ignore[attr-defined]
    assert request_id.startswith("req_")
    assert body["type"] == "error"
    assert body["error"]["type"] == error_type
    assert body["request_id"] == request_id
    message: str = body["error"]["message"]
    return message


def test_error_body_shape() -> None:
    assert error_body("api_error", "Internal server error", "req_1") == {
        "type": "error",
        "error": {"type": "api_error", "message": "Internal server error"},
        "request_id": "req_1",
    }


def test_valid_request_passes(client: TestClient) -> None:
    assert client.post("/v1/messages", json=VALID).json() == {"model": "m"}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            b'{"model": "m",',
            "invalid JSON body: Expecting property name enclosed in double quotes at position 14",
        ),
        (b"[]", "body: Input should be a JSON object"),
        (b'"x"', "body: Input should be a JSON object"),
        (b"{}", "model: Field required; messages: Field required"),
        (
            b'{"model": 5, "messages": [{"role": "user", "content": "hi"}]}',
            "model: Input should be a valid string",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user"}]}',
            "messages.0.content: Field required",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "x"}',
            "max_tokens: Input should be a valid integer, unable to parse string as an integer",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image"}]}]}',
            'messages.0.content.0: content block type "image" is not supported'
            " (this model accepts text only)",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": ""}]}',
            "messages.0: all messages must have non-empty content"
            " except for the optional final assistant message",
        ),
    ],
)
def test_bad_bodies_are_400(client: TestClient, content: bytes, expected: str) -> None:
    response = client.post(
        "/v1/messages", content=content, headers={"content-type": "application/json"}
    )
    assert assert_envelope(response, 400, "invalid_request_error") == expected
    assert response.headers["x-should-retry"] == "false"


def test_missing_body_is_400(client: TestClient) -> None:
    response = client.post("/v1/messages")
    assert assert_envelope(response, 400, "invalid_request_error") == "body: Field required"


def test_unknown_route_is_404(client: TestClient) -> None:
    response = client.get("/v1/nope")
    assert assert_envelope(response, 404, "not_found_error") == "Not found"
    assert response.headers["x-should-retry"] == "false"


def test_wrong_method_is_405(client: TestClient) -> None:
    response = client.get("/v1/messages")
    assert assert_envelope(response, 405, "invalid_request_error") == "Method Not Allowed"
    assert response.headers["allow"] == "POST"


@pytest.mark.parametrize("name", sorted(RAISABLE))
def test_api_errors_render_their_status_and_type(client: TestClient, name: str) -> None:
    error = RAISABLE[name]
    response = client.get(f"/raise/{name}")
    assert assert_envelope(response, error.status, error.error_type) == error.message
    no_retry = error.status in {400, 401, 402, 403, 404, 413}
    assert (response.headers.get("x-should-retry") == "false") is no_retry


def test_retry_after_headers(client: TestClient) -> None:
    limited = client.get("/raise/ratelimit")
    assert limited.headers["retry-after"] == "7"
    assert limited.headers["anthropic-ratelimit-requests-limit"] == "5"
    assert client.get("/raise/overloaded").headers["retry-after"] == "1"
    assert OverloadedError(retry_after=0).headers["retry-after"] == "1"


def test_unexpected_exception_is_500_and_logged(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="api.errors"):
        response = client.get("/boom")
    assert assert_envelope(response, 500, "api_error") == "Internal server error"
    assert "secret detail" not in response.text
    record = next(r for r in caplog.records if r.name == "api.errors")
    assert record.exc_info is not None and "secret detail" in str(record.exc_info[1])


def test_request_id_comes_from_request_state() -> None:
    client = TestClient(make_app(with_request_id=True), raise_server_exceptions=False)
    for response in (
        client.post("/v1/messages", json={}),
        client.get("/raise/billing"),
        client.get("/boom"),
    ):
        assert response.headers["request-id"] == FIXED_ID
        assert response.json()["request_id"] == FIXED_ID


def test_api_error_for_maps_worker_error_types() -> None:
    assert isinstance(api_error_for("overloaded_error", "busy"), OverloadedError)
    assert api_error_for("overloaded_error", "busy").status == 529
    unknown = api_error_for("mystery_error", "what")
    assert (unknown.status, unknown.error_type, unknown.message) == (500, "api_error", "what")


def sdk_against(app: FastAPI) -> tuple[anthropic.Anthropic, list[str]]:
    """The official SDK, with its transport calling the app in-process."""
    test_client = TestClient(app, raise_server_exceptions=False)
    paths: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        paths.append(request.url.path)
        response = test_client.request(
            request.method,
            request.url.raw_path.decode(),
            headers=dict(request.headers),
            content=request.content,
        )
        return httpx2.Response(
            response.status_code, headers=response.headers.multi_items(), content=response.content
        )

    client = anthropic.Anthropic(
        api_key="sk-test",
        base_url="http://testserver",
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )
    return client, paths


def test_sdk_raises_bad_request_once_with_type_and_request_id() -> None:
    client, paths = sdk_against(make_app(with_request_id=True))
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="m", max_tokens=8, messages=[])
    assert info.value.type == "invalid_request_error"
    assert info.value.request_id == FIXED_ID
    assert info.value.body["error"]["message"] == "messages: at least one message is required"  # type: ignore[index]
    assert paths == ["/v1/messages"]  # x-should-retry: false, and 400 is never retried


def test_sdk_maps_not_found() -> None:
    client, _ = sdk_against(make_app(with_request_id=False))
    with pytest.raises(anthropic.NotFoundError) as info:
        client.models.retrieve("nope")
    assert info.value.type == "not_found_error"

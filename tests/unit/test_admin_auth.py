"""The admin guard on its own: no database, no Redis (an in-memory throttle), one route."""

from typing import Any, Protocol

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.admin.access import Admin, AdminDep, matching_name
from api.errors import RateLimitError, install_error_handlers
from api.settings import ApiSettings

TOKEN = "admin-unit-token-" + "0123456789abcdef" * 2
OPS = "ops-token-" + "1" * 32
CI = "ci-token-" + "2" * 32


class CountingThrottle:
    """The throttle's contract in memory: refuse past `limit` failures until a success."""

    def __init__(self, limit: int = 3) -> None:
        self.limit = limit
        self.failures: dict[str, int] = {}

    async def check(self, address: str) -> int:
        count = self.failures.get(address, 0)
        if count >= self.limit:
            raise RateLimitError("too many failed admin authentications", retry_after=7)
        return count

    async def failed(self, address: str) -> None:
        self.failures[address] = self.failures.get(address, 0) + 1

    async def succeeded(self, address: str) -> None:
        self.failures.pop(address, None)


def _client(
    admin_token: str | None,
    admin_tokens: str | None = None,
    throttle: CountingThrottle | None = None,
) -> TestClient:
    router = APIRouter(prefix="/admin", dependencies=[AdminDep])

    @router.get("/ping")
    def ping(admin: Admin) -> dict[str, object]:
        return {"ok": True, "admin": admin.name}

    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.settings = ApiSettings(
        admin_token=SecretStr(admin_token) if admin_token is not None else None,
        admin_tokens=SecretStr(admin_tokens) if admin_tokens is not None else None,
    )
    app.state.admin_throttle = throttle or CountingThrottle(limit=1000)
    return TestClient(app)


class _Response(Protocol):
    """httpx's or httpx2's Response, whichever TestClient uses."""

    status_code: int

    def json(self) -> Any: ...


def _error(response: _Response, status: int, error_type: str) -> str:
    assert response.status_code == status
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == error_type
    assert body["request_id"].startswith("req_")
    return str(body["error"]["message"])


def test_right_token_passes() -> None:
    response = _client(TOKEN).get("/admin/ping", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    assert response.json() == {"ok": True, "admin": "admin"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer "},
        {"x-api-key": TOKEN},
    ],
)
def test_missing_token_is_401(headers: dict[str, str]) -> None:
    response = _client(TOKEN).get("/admin/ping", headers=headers)
    assert "missing admin token" in _error(response, 401, "authentication_error")


@pytest.mark.parametrize("sent", ["wrong", TOKEN + "x", TOKEN[:-1], TOKEN.upper()])
def test_wrong_token_is_401(sent: str) -> None:
    response = _client(TOKEN).get("/admin/ping", headers={"Authorization": f"Bearer {sent}"})
    assert _error(response, 401, "authentication_error") == "invalid admin token"


@pytest.mark.parametrize("configured", [None, ""])
def test_unconfigured_admin_token_disables_the_api(configured: str | None) -> None:
    response = _client(configured).get("/admin/ping", headers={"Authorization": "Bearer "})
    message = _error(response, 403, "permission_error")
    assert message == "admin API disabled: set ABL_ADMIN_TOKEN or ABL_ADMIN_TOKENS"


def test_each_named_token_is_known_by_its_name() -> None:
    client = _client(TOKEN, f"ops={OPS},ci={CI}")
    for token, name in ((TOKEN, "admin"), (OPS, "ops"), (CI, "ci")):
        response = client.get("/admin/ping", headers={"Authorization": f"Bearer {token}"})
        assert response.json()["admin"] == name
    only_named = _client(None, f"ops={OPS}")
    response = only_named.get("/admin/ping", headers={"Authorization": f"Bearer {OPS}"})
    assert response.json()["admin"] == "ops"
    assert matching_name({"a": "x", "b": "y"}, "z") is None


def test_wrong_tokens_are_throttled_and_right_ones_unaffected() -> None:
    throttle = CountingThrottle(limit=3)
    client = _client(TOKEN, throttle=throttle)
    right = {"Authorization": f"Bearer {TOKEN}"}
    wrong = {"Authorization": "Bearer guess"}
    for _ in range(2):
        _error(client.get("/admin/ping", headers=wrong), 401, "authentication_error")
    # A success below the limit is served, and forgets the failures.
    assert client.get("/admin/ping", headers=right).status_code == 200
    assert throttle.failures == {}
    # Missing tokens are not guesses.
    for _ in range(5):
        _error(client.get("/admin/ping"), 401, "authentication_error")
    assert throttle.failures == {}
    for _ in range(3):
        _error(client.get("/admin/ping", headers=wrong), 401, "authentication_error")
    refused = client.get("/admin/ping", headers=right)
    _error(refused, 429, "rate_limit_error")
    assert refused.headers["retry-after"] == "7"

"""The admin guard on its own: no database, one route behind it."""

from typing import Any, Protocol

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.admin.access import AdminDep
from api.errors import install_error_handlers
from api.settings import ApiSettings

TOKEN = "admin-unit-token-" + "0123456789abcdef" * 2


def _client(admin_token: str | None) -> TestClient:
    router = APIRouter(prefix="/admin", dependencies=[AdminDep])

    @router.get("/ping")
    def ping() -> dict[str, bool]:
        return {"ok": True}

    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.settings = ApiSettings(
        admin_token=SecretStr(admin_token) if admin_token is not None else None
    )
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
    assert response.json() == {"ok": True}


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
    assert message == "admin API disabled: set ABL_ADMIN_TOKEN"

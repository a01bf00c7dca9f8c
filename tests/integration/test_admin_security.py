"""JWT revocation and maximum lifetime; named admin tokens, the audit log and the throttle on
failed admin authentications. Real stack; a second API process where a test needs its own
settings or a second replica."""

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import redis

from infra.launcher.stack import Stack
from tests.conftest import AccountFactory
from tests.integration.api_process import api_process
from tests.integration.test_admin_cli import abl, abl_json

pytestmark = pytest.mark.integration


def _account_as(base_url: str, credential: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {credential}"}
    return httpx.get(f"{base_url}/v1/account", headers=headers, timeout=30)


def _mint(admin: httpx.Client, account_id: str, ttl: int = 600) -> dict[str, Any]:
    minted = admin.post(f"/admin/accounts/{account_id}/tokens", json={"ttl_seconds": ttl})
    assert minted.status_code == 201, minted.text
    body: dict[str, Any] = minted.json()
    return body


def _hs256(stack: Stack, **claims: Any) -> str:
    secret = stack.extra_env["ABL_JWT_SECRET"]
    now = int(time.time())
    return jwt.encode({"iss": "abl", "iat": now, "exp": now + 300, **claims}, secret, "HS256")


# ---- JWT revocation and lifetime ---------------------------------------------------------


@pytest.fixture(scope="module")
def replica(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second API process on the same Postgres and Redis."""
    log = tmp_path_factory.mktemp("replica") / "api-revocation.log"
    with api_process(stack, log) as base_url:
        yield base_url


def test_a_revoked_token_is_refused_at_once_everywhere(
    stack: Stack, replica: str, admin: httpx.Client, make_account: AccountFactory
) -> None:
    account = make_account()
    revoked, kept = _mint(admin, account.id), _mint(admin, account.id)
    for base_url in (stack.base_url, replica):
        assert _account_as(base_url, revoked["token"]).status_code == 200
    answer = admin.post("/admin/tokens/revoke", json={"jti": revoked["jti"], "reason": "leaked"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["jti"], body["revoked_by"], body["reason"]) == (
        revoked["jti"],
        "admin:admin",
        "leaked",
    )
    for base_url in (stack.base_url, replica):
        refused = _account_as(base_url, revoked["token"])
        assert refused.status_code == 401
        assert refused.json()["error"]["message"] == "invalid token: revoked"
        assert _account_as(base_url, kept["token"]).status_code == 200
    # Revoking it again answers the first revocation.
    again = admin.post("/admin/tokens/revoke", json={"jti": revoked["jti"]}).json()
    assert again["revoked_at"] == body["revoked_at"] and again["reason"] == "leaked"


def test_a_token_is_revoked_by_itself_even_without_a_jti(
    stack: Stack, admin: httpx.Client, make_account: AccountFactory
) -> None:
    account = make_account()
    token = _hs256(stack, sub=account.id)  # no jti: revoked by its SHA-256
    assert _account_as(stack.base_url, token).status_code == 200
    answer = admin.post("/admin/tokens/revoke", json={"token": token})
    assert answer.status_code == 200, answer.text
    assert answer.json()["jti"].startswith("sha256:")
    assert answer.json()["account_id"] == account.id
    assert _account_as(stack.base_url, token).status_code == 401


@pytest.mark.parametrize(
    "body",
    [{}, {"jti": "a", "token": "b"}, {"token": "not-a-token"}, {"jti": ""}, {"jti": "a", "x": 1}],
)
def test_revocation_requests_that_name_nothing_revocable_are_400(
    admin: httpx.Client, body: dict[str, Any]
) -> None:
    answer = admin.post("/admin/tokens/revoke", json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["type"] == "invalid_request_error"


def test_tokens_living_longer_than_the_maximum_are_refused(
    stack: Stack, make_account: AccountFactory
) -> None:
    account = make_account()
    now = int(time.time())
    day = 86_400  # ABL_JWT_MAX_TTL_S's default
    fine = _hs256(stack, sub=account.id, iat=now, exp=now + day)
    assert _account_as(stack.base_url, fine).status_code == 200
    for token in (
        _hs256(stack, sub=account.id, iat=now, exp=now + day + 1),
        _hs256(stack, sub=account.id, iat=now - 3 * day, exp=now + 60),
    ):
        refused = _account_as(stack.base_url, token)
        assert refused.status_code == 401
        assert "longer than the 86400 s allowed" in refused.json()["error"]["message"]
    secret = stack.extra_env["ABL_JWT_SECRET"]
    no_iat = jwt.encode({"iss": "abl", "sub": account.id, "exp": now + 60}, secret, "HS256")
    refused = _account_as(stack.base_url, no_iat)
    assert refused.json()["error"]["message"] == "invalid token: missing the 'iat' claim"


def test_abl_admin_tokens_revoke(stack: Stack, admin: httpx.Client, make_account: Any) -> None:
    account = make_account()
    minted = abl_json(stack, "tokens", "mint", account.id, "--ttl", "120")
    assert _account_as(stack.base_url, minted["token"]).status_code == 200
    done = abl(stack, "tokens", "revoke", "--jti", minted["jti"], "--reason", "cli")
    assert done.returncode == 0, done.stderr
    assert "token revoked" in done.stdout
    assert _account_as(stack.base_url, minted["token"]).status_code == 401


# ---- named admin tokens and the audit log ------------------------------------------------


def test_admin_changes_name_the_token_that_made_them(
    admin: httpx.Client, ops_admin: httpx.Client
) -> None:
    created = ops_admin.post("/admin/accounts", json={"name": "audited", "credits": 50})
    assert created.status_code == 201, created.text
    account_id = created.json()["id"]
    added = admin.post(f"/admin/accounts/{account_id}/credits", json={"amount": 25})
    assert added.status_code == 200
    key = ops_admin.post(f"/admin/accounts/{account_id}/keys", json={"name": "k"}).json()
    ledger = admin.get(f"/admin/accounts/{account_id}/ledger").json()["data"]
    assert [(e["kind"], e["amount"], e["created_by"]) for e in ledger] == [
        ("grant", 25, "admin:admin"),
        ("grant", 50, "admin:ops"),
    ]
    rows = admin.get("/admin/audit", params={"target": account_id}).json()["data"]
    assert [(r["admin"], r["action"]) for r in rows] == [
        ("admin", "credits.add"),
        ("ops", "account.create"),
    ]
    credits_row, create_row = rows
    assert credits_row["details"]["amount"] == 25
    assert credits_row["request_id"] == added.headers["request-id"]
    assert credits_row["client_address"] == "127.0.0.1"
    assert create_row["details"]["name"] == "audited"
    (key_row,) = admin.get("/admin/audit", params={"target": key["id"]}).json()["data"]
    assert (key_row["admin"], key_row["action"]) == ("ops", "key.create")
    assert key["key"] not in str(key_row)  # never the secret


def test_the_audit_log_pages_and_filters(
    stack: Stack, admin: httpx.Client, ops_admin: httpx.Client
) -> None:
    account_id = ops_admin.post("/admin/accounts", json={"name": "paged"}).json()["id"]
    for name in ("one", "two", "three"):
        ops_admin.patch(f"/admin/accounts/{account_id}", json={"name": name})
    query = {"target": account_id, "action": "account.update", "limit": 2}
    first = admin.get("/admin/audit", params=query).json()
    assert [r["details"]["name"] for r in first["data"]] == ["three", "two"]
    assert first["has_more"]
    rest = admin.get("/admin/audit", params={**query, "before_id": first["next_before_id"]})
    assert [r["details"]["name"] for r in rest.json()["data"]] == ["one"]
    assert not rest.json()["has_more"]
    assert (
        admin.get("/admin/audit", params={"target": account_id, "admin": "admin"}).json()["data"]
        == []
    )
    printed = abl_json(stack, "audit", "--target", account_id, "--admin", "ops", "--limit", "0")
    assert [r["action"] for r in printed] == ["account.update"] * 3 + ["account.create"]


# ---- the throttle on failed admin authentications ----------------------------------------


@pytest.fixture
def throttled_api(stack: Stack, tmp_path: Path) -> Iterator[str]:
    """An API process that blocks an address after 3 wrong admin tokens in a minute."""
    assert stack.redis_url is not None
    client = redis.Redis.from_url(stack.redis_url)
    counter = "abl:admin-auth-failures:127.0.0.1"
    client.delete(counter)
    env = {"ABL_ADMIN_AUTH_MAX_FAILURES": "3", "ABL_ADMIN_AUTH_WINDOW_S": "60"}
    try:
        with api_process(stack, tmp_path / "api-throttled.log", env) as base_url:
            yield base_url
    finally:
        client.delete(counter)
        client.close()


def test_failed_admin_authentications_are_throttled(stack: Stack, throttled_api: str) -> None:
    right = {"Authorization": f"Bearer {stack.admin_token}"}
    wrong = {"Authorization": "Bearer guess"}
    with httpx.Client(base_url=throttled_api, timeout=30) as client:

        def status(headers: dict[str, str] | None) -> int:
            return client.get("/admin/accounts", headers=headers).status_code

        # Successes never count, and clear the failures before them.
        assert [status(h) for h in (wrong, wrong, right, wrong, wrong, right)] == [
            401,
            401,
            200,
            401,
            401,
            200,
        ]
        # Requests without a token guess nothing.
        assert [status(None) for _ in range(4)] == [401] * 4
        assert [status(wrong) for _ in range(3)] == [401] * 3
        blocked = client.get("/admin/accounts", headers=right)
        assert blocked.status_code == 429
        assert blocked.json()["error"]["type"] == "rate_limit_error"
        assert 1 <= int(blocked.headers["retry-after"]) <= 60
        assert client.get("/admin/accounts", headers=wrong).status_code == 429

"""The admin API against the running stack: every route, its errors, and the ledger it writes."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import jwt
import pytest

from api.ids import new_message_id, new_request_id
from db.ledger import NewRequest, Outcome, open_request, settle_request
from db.pricing import Prices
from db.session import transaction
from tests.support import STACK_MODEL

pytestmark = pytest.mark.integration

MODEL = STACK_MODEL
ACCOUNT_FIELDS = {
    "id",
    "name",
    "credits",
    "reserved_credits",
    "available_credits",
    "disabled",
    "created_at",
    "rate_limits",
    "shared_rate_limits",
}
LEDGER_FIELDS = {
    "id",
    "account_id",
    "kind",
    "amount",
    "balance_after",
    "reserved_after",
    "request_id",
    "reason",
    "created_by",
    "created_at",
}


def _error(response: httpx.Response, status: int, error_type: str) -> str:
    """Assert the Anthropic error envelope; return its message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == error_type
    assert body["request_id"].startswith("req_")
    return str(body["error"]["message"])


def _account(admin: httpx.Client, credits: int = 0, **extra: Any) -> dict[str, Any]:
    response = admin.post("/admin/accounts", json={"name": "it-admin", "credits": credits, **extra})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def _ledger(admin: httpx.Client, account_id: str, **params: Any) -> dict[str, Any]:
    response = admin.get(f"/admin/accounts/{account_id}/ledger", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _message(stack: Any, credential: str) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {credential}"}
    return httpx.post(f"{stack.base_url}/v1/messages", json=body, headers=headers, timeout=120)


# ---- authentication ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/accounts"),
        ("POST", "/admin/accounts"),
        ("GET", "/admin/accounts/acct_x"),
        ("DELETE", "/admin/keys/key_x"),
        ("GET", "/admin/reconcile"),
    ],
)
def test_admin_routes_need_the_admin_token(stack: Any, method: str, path: str) -> None:
    with httpx.Client(base_url=stack.base_url) as anonymous:
        assert "missing" in _error(anonymous.request(method, path), 401, "authentication_error")
        wrong = {"Authorization": f"Bearer {stack.admin_token}x"}
        response = anonymous.request(method, path, headers=wrong)
        assert _error(response, 401, "authentication_error") == "invalid admin token"


def test_an_api_key_is_not_an_admin_token(stack: Any, admin: httpx.Client) -> None:
    account = _account(admin)
    key = admin.post(f"/admin/accounts/{account['id']}/keys", json={}).json()["key"]
    response = httpx.get(
        f"{stack.base_url}/admin/accounts", headers={"Authorization": f"Bearer {key}"}
    )
    # Valid credentials without the right: 403 (issue 4), not 401.
    _error(response, 403, "permission_error")


# ---- accounts ----------------------------------------------------------------------------


def test_create_account_grants_initial_credits(admin: httpx.Client) -> None:
    limits = {"requests_per_minute": 7, "concurrent_requests": 2}
    account = _account(admin, credits=250, rate_limits=limits)

    assert set(account) == ACCOUNT_FIELDS
    assert account["id"].startswith("acct_")
    assert account["name"] == "it-admin"
    assert (account["credits"], account["reserved_credits"], account["available_credits"]) == (
        250,
        0,
        250,
    )
    assert account["disabled"] is False
    assert account["rate_limits"] == limits
    assert admin.get(f"/admin/accounts/{account['id']}").json() == account

    [entry] = _ledger(admin, account["id"])["data"]
    assert set(entry) == LEDGER_FIELDS
    assert entry["kind"] == "grant"
    assert (entry["amount"], entry["balance_after"], entry["reserved_after"]) == (250, 250, 0)
    assert entry["request_id"] is None


def test_create_account_without_credits_writes_no_ledger_entry(admin: httpx.Client) -> None:
    account = _account(admin)
    assert account["credits"] == 0
    assert _ledger(admin, account["id"]) == {"data": [], "has_more": False, "next_before_id": None}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "x", "credits": -1}, "credits"),
        ({"name": "x", "credits": "lots"}, "credits"),
        ({"name": "x", "credits": 1.5}, "credits"),
        ({"name": "x", "surprise": 1}, "surprise"),
        ({"name": "x", "rate_limits": {"requests_per_minute": 0}}, "requests_per_minute"),
        (["name"], "object"),
    ],
)
def test_create_account_rejects_bad_bodies(admin: httpx.Client, body: Any, fragment: str) -> None:
    message = _error(admin.post("/admin/accounts", json=body), 400, "invalid_request_error")
    assert fragment in message


def test_create_account_rejects_malformed_json(admin: httpx.Client) -> None:
    response = admin.post(
        "/admin/accounts", content=b'{"name": ', headers={"content-type": "application/json"}
    )
    _error(response, 400, "invalid_request_error")


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("GET", "", None),
        ("PATCH", "", {"disabled": True}),
        ("POST", "/credits", {"amount": 5}),
        ("POST", "/keys", {}),
        ("GET", "/keys", None),
        ("POST", "/tokens", {"ttl_seconds": 60}),
        ("GET", "/ledger", None),
    ],
)
def test_unknown_account_is_404(
    admin: httpx.Client, method: str, suffix: str, body: dict[str, Any] | None
) -> None:
    response = admin.request(method, f"/admin/accounts/acct_missing{suffix}", json=body)
    assert "acct_missing" in _error(response, 404, "not_found_error")


def test_list_accounts_pages_in_creation_order(admin: httpx.Client) -> None:
    created = [_account(admin)["id"] for _ in range(3)]
    first = admin.get("/admin/accounts", params={"limit": 1}).json()
    assert len(first["data"]) == 1
    assert first["has_more"] is True
    assert first["next_after_id"] == first["data"][0]["id"]

    seen: list[str] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"after_id": after} if after else {})}
        page = admin.get("/admin/accounts", params=params).json()
        assert len(page["data"]) <= 2
        seen += [a["id"] for a in page["data"]]
        if not page["has_more"]:
            assert page["next_after_id"] is None
            break
        after = page["next_after_id"]
    assert len(seen) == len(set(seen))
    assert [i for i in seen if i in created] == created


@pytest.mark.parametrize(
    "params", [{"limit": 0}, {"limit": 1001}, {"limit": "x"}, {"after_id": "acct_missing"}]
)
def test_list_accounts_rejects_bad_paging(admin: httpx.Client, params: dict[str, Any]) -> None:
    _error(admin.get("/admin/accounts", params=params), 400, "invalid_request_error")


def test_patch_account(admin: httpx.Client) -> None:
    account_id = _account(admin, credits=5)["id"]
    path = f"/admin/accounts/{account_id}"

    disabled = admin.patch(path, json={"disabled": True}).json()
    assert disabled["disabled"] is True
    assert admin.get(path).json()["disabled"] is True
    renamed = admin.patch(path, json={"name": "renamed", "disabled": False}).json()
    assert (renamed["name"], renamed["disabled"], renamed["credits"]) == ("renamed", False, 5)
    limited = admin.patch(path, json={"rate_limits": {"requests_per_minute": 3}}).json()
    assert limited["rate_limits"] == {"requests_per_minute": 3}
    assert admin.patch(path, json={"rate_limits": None}).json()["rate_limits"] is None

    for bad in ({"disabled": "maybe"}, {"name": ""}, {"credits": 10}):
        _error(admin.patch(path, json=bad), 400, "invalid_request_error")
    assert admin.get(path).json()["credits"] == 5


# ---- credits -----------------------------------------------------------------------------


def test_credits_grant_and_adjustment(admin: httpx.Client) -> None:
    account_id = _account(admin, credits=100)["id"]
    path = f"/admin/accounts/{account_id}/credits"

    granted = admin.post(path, json={"amount": 40, "reason": "top-up"})
    assert granted.status_code == 200, granted.text
    body = granted.json()
    assert set(body) == ACCOUNT_FIELDS | {"ledger_entry"}
    assert (body["credits"], body["available_credits"]) == (140, 140)
    entry = body["ledger_entry"]
    assert (entry["kind"], entry["amount"], entry["balance_after"]) == ("grant", 40, 140)
    assert (entry["reason"], entry["account_id"]) == ("top-up", account_id)
    assert entry["created_by"] == "admin:admin"  # the name of ABL_ADMIN_TOKEN

    adjusted = admin.post(path, json={"amount": -15}).json()
    assert adjusted["credits"] == 125
    entry = adjusted["ledger_entry"]
    assert (entry["kind"], entry["amount"], entry["balance_after"]) == ("adjustment", -15, 125)
    assert entry["reason"] is None

    ledger = _ledger(admin, account_id)["data"]
    assert [(e["kind"], e["amount"]) for e in ledger] == [
        ("adjustment", -15),
        ("grant", 40),
        ("grant", 100),
    ]
    assert (
        sum(e["amount"] for e in ledger)
        == admin.get(f"/admin/accounts/{account_id}").json()["credits"]
    )


@pytest.mark.parametrize(
    "body",
    [{}, {"amount": 0}, {"amount": "ten"}, {"amount": 2.5}, {"amount": 1, "reason": ""}],
)
def test_credits_rejects_bad_bodies(admin: httpx.Client, body: dict[str, Any]) -> None:
    account_id = _account(admin, credits=10)["id"]
    response = admin.post(f"/admin/accounts/{account_id}/credits", json=body)
    _error(response, 400, "invalid_request_error")
    assert admin.get(f"/admin/accounts/{account_id}").json()["credits"] == 10


def test_adjustment_below_reserved_credits_is_400(stack: Any, admin: httpx.Client) -> None:
    account_id = _account(admin, credits=1000)["id"]
    request_id = new_request_id()
    with transaction(stack.database_url) as session:
        open_request(
            session,
            NewRequest(
                id=request_id,
                message_id=new_message_id(),
                account_id=account_id,
                api_key_id=None,
                model=MODEL,
                stream=False,
                max_tokens=64,
                input_tokens=8,
                credits_reserved=600,
                prices=Prices(Decimal(5), Decimal(5), Decimal("0.001")),
            ),
        )
    account = admin.get(f"/admin/accounts/{account_id}").json()
    assert (account["credits"], account["reserved_credits"], account["available_credits"]) == (
        1000,
        600,
        400,
    )

    path = f"/admin/accounts/{account_id}/credits"
    message = _error(admin.post(path, json={"amount": -401}), 400, "invalid_request_error")
    assert "reserved" in message and "400" in message
    assert admin.get(f"/admin/accounts/{account_id}").json()["credits"] == 1000
    assert admin.post(path, json={"amount": -400}).json()["available_credits"] == 0

    # The request record while open, then settled: every column and its ledger rows.
    record = admin.get(f"/admin/requests/{request_id}").json()
    assert (record["status"], record["credits_reserved"], record["account_id"]) == (
        "queued",
        600,
        account_id,
    )
    assert [(e["kind"], e["amount"]) for e in record["ledger_entries"]] == [("reserve", 600)]
    with transaction(stack.database_url) as session:
        # Charged at the request's prices: (8 + 1) tokens at $5 per million, one credit.
        outcome = Outcome(status="cancelled", output_tokens=1, billable=True)
        settle_request(session, request_id, outcome)
    record = admin.get(f"/admin/requests/{request_id}").json()
    assert (record["status"], record["credits_charged"], record["cost_usd"]) == (
        "cancelled",
        1,
        "0.000045",
    )
    assert record["finished_at"] is not None
    assert [(e["kind"], e["amount"]) for e in record["ledger_entries"]] == [
        ("reserve", 600),
        ("release", -600),
        ("charge", -1),
    ]
    account = admin.get(f"/admin/accounts/{account_id}").json()
    assert (account["credits"], account["reserved_credits"]) == (599, 0)


# ---- keys --------------------------------------------------------------------------------


def test_create_list_and_revoke_a_key(stack: Any, admin: httpx.Client) -> None:
    account_id = _account(admin, credits=1000)["id"]
    expires = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    limits = {
        "requests_per_minute": 60,
        "input_tokens_per_minute": 10_000,
        "output_tokens_per_minute": 5_000,
        "concurrent_requests": 4,
    }
    body = {"name": "ci", "rate_limits": limits, "expires_at": expires.isoformat()}
    response = admin.post(f"/admin/accounts/{account_id}/keys", json=body)
    assert response.status_code == 201, response.text
    key = response.json()
    assert set(key) == {
        "id",
        "key",
        "prefix",
        "name",
        "account_id",
        "rate_limits",
        "created_at",
        "expires_at",
    }
    assert key["id"].startswith("key_") and key["key"].startswith("ak_")
    assert key["key"].startswith(key["prefix"]) and len(key["prefix"]) < len(key["key"])
    assert (key["name"], key["account_id"], key["rate_limits"]) == ("ci", account_id, limits)
    assert datetime.fromisoformat(key["expires_at"]) == expires

    listed = admin.get(f"/admin/accounts/{account_id}/keys")
    assert key["key"] not in listed.text
    [row] = listed.json()["data"]
    assert "key" not in row
    assert (row["id"], row["prefix"], row["revoked_at"]) == (key["id"], key["prefix"], None)

    assert _message(stack, key["key"]).status_code == 200

    revoked = admin.delete(f"/admin/keys/{key['id']}")
    assert revoked.status_code == 200, revoked.text
    assert set(revoked.json()) == {"id", "revoked_at"}
    assert revoked.json()["id"] == key["id"]
    again = admin.delete(f"/admin/keys/{key['id']}").json()
    assert again["revoked_at"] == revoked.json()["revoked_at"]
    [row] = admin.get(f"/admin/accounts/{account_id}/keys").json()["data"]
    assert row["revoked_at"] == revoked.json()["revoked_at"]

    _error(_message(stack, key["key"]), 401, "authentication_error")


def test_a_key_stores_only_the_limits_it_sets(admin: httpx.Client) -> None:
    """The account's defaults are read per request (tests/integration/test_limits.py), never
    copied into the key."""
    account_id = _account(admin, rate_limits={"requests_per_minute": 7})["id"]
    path = f"/admin/accounts/{account_id}/keys"
    plain = admin.post(path, json={}).json()
    assert (plain["name"], plain["expires_at"]) == (None, None)
    assert plain["rate_limits"] is None
    own = admin.post(path, json={"rate_limits": {"concurrent_requests": 2}}).json()
    assert own["rate_limits"] == {"concurrent_requests": 2}
    assert plain["key"] != own["key"]


@pytest.mark.parametrize(
    "body",
    [
        {"rate_limits": {"requests_per_minute": 0}},
        {"rate_limits": {"concurrent_requests": -1}},
        {"rate_limits": {"tokens_per_day": 5}},
        {"expires_at": "2001-01-01T00:00:00Z"},
        {"expires_at": "2999-01-01T00:00:00"},
        {"expires_at": "soon"},
        {"name": 5},
    ],
)
def test_create_key_rejects_bad_bodies(admin: httpx.Client, body: dict[str, Any]) -> None:
    account_id = _account(admin)["id"]
    response = admin.post(f"/admin/accounts/{account_id}/keys", json=body)
    _error(response, 400, "invalid_request_error")
    assert admin.get(f"/admin/accounts/{account_id}/keys").json()["data"] == []


def test_revoke_unknown_key_is_404(admin: httpx.Client) -> None:
    assert "key_missing" in _error(admin.delete("/admin/keys/key_missing"), 404, "not_found_error")


# ---- account JWTs ------------------------------------------------------------------------


def test_mint_token(stack: Any, admin: httpx.Client) -> None:
    account_id = _account(admin, credits=1000)["id"]
    response = admin.post(f"/admin/accounts/{account_id}/tokens", json={"ttl_seconds": 120})
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"token", "expires_at", "account_id", "jti"}
    assert body["account_id"] == account_id
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert (claims["sub"], claims["jti"]) == (account_id, body["jti"])
    assert claims["exp"] - claims["iat"] == 120
    assert datetime.fromisoformat(body["expires_at"]).timestamp() == claims["exp"]

    default = admin.post(f"/admin/accounts/{account_id}/tokens").json()
    claims = jwt.decode(default["token"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 3600

    # The token is a credential for /v1, and the request is billed to its account.
    message = _message(stack, body["token"])
    assert message.status_code == 200, message.text
    record = admin.get(f"/admin/requests/{message.headers['request-id']}").json()
    assert record["account_id"] == account_id
    assert record["api_key_id"] is None


@pytest.mark.parametrize("ttl", [0, -5, 86_401, "long"])
def test_mint_token_rejects_bad_ttl(admin: httpx.Client, ttl: Any) -> None:
    account_id = _account(admin)["id"]
    response = admin.post(f"/admin/accounts/{account_id}/tokens", json={"ttl_seconds": ttl})
    assert "ttl_seconds" in _error(response, 400, "invalid_request_error")


# ---- ledger, requests, reconcile ---------------------------------------------------------


def test_ledger_pages_newest_first(admin: httpx.Client) -> None:
    account_id = _account(admin, credits=10)["id"]
    for amount in (1, 2, 3, -4):
        credited = admin.post(f"/admin/accounts/{account_id}/credits", json={"amount": amount})
        assert credited.status_code == 200
    everything = _ledger(admin, account_id)["data"]
    assert [e["amount"] for e in everything] == [-4, 3, 2, 1, 10]
    assert [e["balance_after"] for e in everything] == [12, 16, 13, 11, 10]

    pages: list[list[int]] = []
    before: int | None = None
    while True:
        page = _ledger(admin, account_id, limit=2, **({"before_id": before} if before else {}))
        pages.append([e["id"] for e in page["data"]])
        if not page["has_more"]:
            assert page["next_before_id"] is None
            break
        before = page["next_before_id"]
        assert before == page["data"][-1]["id"]
    assert pages == [[e["id"] for e in everything[i : i + 2]] for i in (0, 2, 4)]


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 1001}, {"before_id": "x"}])
def test_ledger_rejects_bad_paging(admin: httpx.Client, params: dict[str, Any]) -> None:
    account_id = _account(admin)["id"]
    response = admin.get(f"/admin/accounts/{account_id}/ledger", params=params)
    _error(response, 400, "invalid_request_error")


def test_request_record_of_a_real_message(stack: Any, admin: httpx.Client) -> None:
    account_id = _account(admin, credits=1000)["id"]
    key = admin.post(f"/admin/accounts/{account_id}/keys", json={}).json()
    message = _message(stack, key["key"])
    assert message.status_code == 200, message.text
    usage = message.json()["usage"]

    record = admin.get(f"/admin/requests/{message.headers['request-id']}").json()
    assert record["message_id"] == message.json()["id"]
    assert (record["account_id"], record["api_key_id"]) == (account_id, key["id"])
    assert (record["status"], record["model"], record["stream"]) == ("succeeded", MODEL, False)
    assert record["input_tokens"] == usage["input_tokens"]
    assert record["output_tokens"] == usage["output_tokens"]
    assert record["finished_at"] is not None
    kinds = [e["kind"] for e in record["ledger_entries"]]
    assert kinds[:2] == ["reserve", "release"] and set(kinds) <= {"reserve", "release", "charge"}
    charged = -sum(e["amount"] for e in record["ledger_entries"] if e["kind"] == "charge")
    assert charged == record["credits_charged"]
    account = admin.get(f"/admin/accounts/{account_id}").json()
    assert account["credits"] == 1000 - charged


def test_unknown_request_is_404(admin: httpx.Client) -> None:
    response = admin.get("/admin/requests/req_missing")
    assert "req_missing" in _error(response, 404, "not_found_error")


def test_reconcile_finds_the_books_balanced(admin: httpx.Client) -> None:
    _account(admin, credits=3)
    response = admin.get("/admin/reconcile")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["discrepancies"] == []
    assert body["ok"] is True
    assert body["accounts_checked"] >= 1

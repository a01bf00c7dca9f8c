"""Where a request's limits come from: the key's own values, its account's (read per request),
an account-wide budget every credential shares, and token counting against the request rate."""

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from infra.launcher.stack import Stack
from tests.conftest import AccountFactory
from tests.integration.test_admin_cli import abl, abl_json
from tests.integration.test_ratelimit import BODY, MODEL, assert_429, assert_rate_headers, send

pytestmark = pytest.mark.integration

LIMIT = "anthropic-ratelimit-requests-limit"


def _account(admin: httpx.Client, **fields: Any) -> str:
    created = admin.post("/admin/accounts", json={"name": "limits", "credits": 10_000, **fields})
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def _key(admin: httpx.Client, account_id: str, **fields: Any) -> dict[str, Any]:
    created = admin.post(f"/admin/accounts/{account_id}/keys", json=fields)
    assert created.status_code == 201, created.text
    body: dict[str, Any] = created.json()
    return body


def test_a_key_stores_only_its_own_limits_and_follows_its_account(
    stack: Stack, admin: httpx.Client
) -> None:
    account_id = _account(admin, rate_limits={"requests_per_minute": 50})
    plain = _key(admin, account_id)
    tuned = _key(admin, account_id, rate_limits={"input_tokens_per_minute": 9999})
    assert plain["rate_limits"] is None
    assert tuned["rate_limits"] == {"input_tokens_per_minute": 9999}
    assert send(stack.base_url, plain["key"]).headers[LIMIT] == "50"
    # Lowering the account's limit reaches the keys created before it.
    lowered = admin.patch(
        f"/admin/accounts/{account_id}", json={"rate_limits": {"requests_per_minute": 5}}
    )
    assert lowered.status_code == 200, lowered.text
    for key in (plain, tuned):
        assert send(stack.base_url, key["key"]).headers[LIMIT] == "5"
    listed = admin.get(f"/admin/accounts/{account_id}/keys").json()["data"]
    assert {k["id"]: k["rate_limits"] for k in listed} == {
        plain["id"]: None,
        tuned["id"]: {"input_tokens_per_minute": 9999},
    }


def test_count_tokens_counts_against_the_request_rate(
    stack: Stack, make_account: AccountFactory
) -> None:
    key = make_account(rate_limits={"requests_per_minute": 3}).key
    body = {"model": MODEL, "messages": BODY["messages"]}
    headers = {"x-api-key": key}
    with httpx.Client(base_url=stack.base_url, headers=headers, timeout=30) as client:
        answers = [client.post("/v1/messages/count_tokens", json=body) for _ in range(6)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429, 429, 429]
    assert answers[0].json()["input_tokens"] > 0
    assert_rate_headers(answers[0])
    assert answers[0].headers["anthropic-ratelimit-requests-remaining"] == "2"
    assert_429(answers[3], "requests")
    # The same budget as messages: the key has nothing left for them either.
    assert_429(send(stack.base_url, key), "requests")


def test_an_account_wide_budget_is_shared_by_all_its_credentials(
    stack: Stack, admin: httpx.Client
) -> None:
    shared = {"requests_per_minute": 3}
    account_id = _account(admin, shared_rate_limits=shared)
    assert admin.get(f"/admin/accounts/{account_id}").json()["shared_rate_limits"] == shared
    first, second = _key(admin, account_id)["key"], _key(admin, account_id)["key"]
    minted = admin.post(f"/admin/accounts/{account_id}/tokens", json={"ttl_seconds": 60})
    token = minted.json()["token"]
    assert [send(stack.base_url, k).status_code for k in (first, first, second)] == [200] * 3
    # Each credential has most of its own budget left; the account's is spent.
    refused = send(stack.base_url, token)
    assert "your account's shared rate limit of 3 per minute" in refused.json()["error"]["message"]
    assert_429(refused, "requests")
    assert refused.headers[LIMIT] == "3"
    assert_429(send(stack.base_url, second), "shared")
    # Without a shared budget every credential has its own again.
    cleared = admin.patch(f"/admin/accounts/{account_id}", json={"shared_rate_limits": None})
    assert cleared.json()["shared_rate_limits"] is None
    assert send(stack.base_url, second).status_code == 200
    assert send(stack.base_url, token).status_code == 200


def test_patch_a_key(stack: Stack, admin: httpx.Client) -> None:
    account_id = _account(admin, rate_limits={"requests_per_minute": 40})
    key = _key(admin, account_id, name="before")
    path = f"/admin/keys/{key['id']}"
    later = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    body = {
        "name": "after",
        "rate_limits": {"requests_per_minute": 7},
        "expires_at": later.isoformat(),
    }
    updated = admin.patch(path, json=body)
    assert updated.status_code == 200, updated.text
    out = updated.json()
    assert (out["name"], out["rate_limits"]) == ("after", {"requests_per_minute": 7})
    assert datetime.fromisoformat(out["expires_at"]) == later
    assert send(stack.base_url, key["key"]).headers[LIMIT] == "7"
    # Only what is sent changes; null clears the key's limits and its expiry.
    cleared = admin.patch(path, json={"rate_limits": None, "expires_at": None}).json()
    assert (cleared["name"], cleared["rate_limits"], cleared["expires_at"]) == ("after", None, None)
    assert send(stack.base_url, key["key"]).headers[LIMIT] == "40"
    past = {"expires_at": (datetime.now(UTC) - timedelta(seconds=1)).isoformat()}
    assert admin.patch(path, json=past).status_code == 400
    assert admin.patch(path, json={"rate_limits": {"requests_per_minute": 0}}).status_code == 400
    assert admin.patch(path, json={"prefix": "x"}).status_code == 400
    assert admin.patch("/admin/keys/key_missing", json={"name": "x"}).status_code == 404
    assert admin.delete(path).status_code == 200
    revoked = admin.patch(path, json={"name": "again"})
    assert revoked.status_code == 400 and "revoked" in revoked.json()["error"]["message"]


def test_abl_admin_keys_update_and_accounts_update(stack: Stack) -> None:
    account_id = abl_json(stack, "accounts", "create", "cli-limits", "--credits", "100")["id"]
    key = abl_json(stack, "keys", "create", account_id, "--name", "k")
    updated = abl_json(stack, "keys", "update", key["id"], "--name", "k2", "--rpm", "9")
    assert (updated["name"], updated["rate_limits"]) == ("k2", {"requests_per_minute": 9})
    assert send(stack.base_url, key["key"]).headers[LIMIT] == "9"
    cleared = abl_json(stack, "keys", "update", key["id"], "--clear-limits")
    assert cleared["rate_limits"] is None and cleared["name"] == "k2"
    account = abl_json(stack, "accounts", "update", account_id, "--rpm", "11", "--shared-rpm", "30")
    assert account["rate_limits"] == {"requests_per_minute": 11}
    assert account["shared_rate_limits"] == {"requests_per_minute": 30}
    assert send(stack.base_url, key["key"]).headers[LIMIT] == "11"
    table = abl(stack, "keys", "update", key["id"], "--no-expiry")
    assert table.returncode == 0 and "key updated" in table.stdout

"""API keys and account JWTs on the real stack: the SDK's exception classes, revocation, expiry,
disabled accounts, and JWT forgeries (HS256 on the stack, RS256 on a second API process)."""

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import ApiKey
from infra.launcher.stack import Stack
from tests.conftest import AccountFactory, ApiAccount
from tests.integration.api_process import api_process
from tests.support import STACK_MODEL

MODEL = STACK_MODEL
MESSAGES = [{"role": "user", "content": "Hi"}]
COUNT_BODY = {"model": MODEL, "messages": MESSAGES}


def count_tokens(base_url: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/messages/count_tokens", json=COUNT_BODY, headers=headers)


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def assert_error(response: httpx.Response, status: int, error_type: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == error_type
    assert body["request_id"] == response.headers["request-id"]
    message: str = body["error"]["message"]
    return message


def sdk(stack: Stack, **credentials: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.base_url, max_retries=0, **credentials)


def create_key(admin: httpx.Client, account_id: str, **fields: Any) -> dict[str, Any]:
    created = admin.post(f"/admin/accounts/{account_id}/keys", json=fields)
    assert created.status_code == 201, created.text
    body: dict[str, Any] = created.json()
    return body


def mint(admin: httpx.Client, account_id: str) -> str:
    token: str = admin.post(
        f"/admin/accounts/{account_id}/tokens", json={"ttl_seconds": 300}
    ).json()["token"]
    return token


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# ------------------------------------------------------------------------------ API keys


def test_sdk_exception_for_bad_keys(stack: Stack) -> None:
    for credentials in ({"api_key": "ak_" + "x" * 43}, {"auth_token": "a.b.c"}):
        with pytest.raises(anthropic.AuthenticationError) as info:
            sdk(stack, **credentials).messages.create(model=MODEL, max_tokens=4, messages=MESSAGES)
        assert info.value.status_code == 401
        assert info.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        assert info.value.request_id and info.value.request_id.startswith("req_")
    missing = httpx.post(f"{stack.base_url}/v1/messages", json=COUNT_BODY)
    assert "x-api-key" in assert_error(missing, 401, "authentication_error")


def test_keys_are_random_and_stored_hashed(account: ApiAccount, db: Session) -> None:
    assert account.key.startswith("ak_") and len(account.key) >= 3 + 43
    row = db.scalars(select(ApiKey).where(ApiKey.account_id == account.id)).one()
    assert row.key_hash == hashlib.sha256(account.key.encode()).hexdigest()
    assert row.prefix == account.key[:10]
    assert account.key not in json.dumps([str(v) for v in row.__dict__.values()])


def test_x_api_key_wins_over_bearer(stack: Stack, account: ApiAccount) -> None:
    both = {"x-api-key": account.key, **bearer("ak_wrong")}
    assert count_tokens(stack.base_url, both).status_code == 200
    swapped = {"x-api-key": "ak_wrong", **bearer(account.key)}
    assert_error(count_tokens(stack.base_url, swapped), 401, "authentication_error")


def test_revocation_takes_effect_on_the_next_request(
    stack: Stack, admin: httpx.Client, account: ApiAccount
) -> None:
    key = create_key(admin, account.id, name="to-revoke")
    client = sdk(stack, api_key=key["key"])
    assert client.messages.count_tokens(model=MODEL, messages=MESSAGES).input_tokens > 0
    assert admin.delete(f"/admin/keys/{key['id']}").status_code == 200
    with pytest.raises(anthropic.AuthenticationError):
        client.messages.count_tokens(model=MODEL, messages=MESSAGES)
    assert_error(
        count_tokens(stack.base_url, {"x-api-key": key["key"]}), 401, "authentication_error"
    )
    # The account's other key is untouched.
    assert count_tokens(stack.base_url, {"x-api-key": account.key}).status_code == 200


def test_expired_key_is_refused(stack: Stack, admin: httpx.Client, account: ApiAccount) -> None:
    expires_at = datetime.now(UTC) + timedelta(seconds=2)
    key = create_key(admin, account.id, expires_at=expires_at.isoformat())
    assert count_tokens(stack.base_url, {"x-api-key": key["key"]}).status_code == 200
    time.sleep(max(0.0, (expires_at - datetime.now(UTC)).total_seconds()) + 0.2)
    assert_error(
        count_tokens(stack.base_url, {"x-api-key": key["key"]}), 401, "authentication_error"
    )


def test_last_used_at_is_recorded(stack: Stack, admin: httpx.Client, account: ApiAccount) -> None:
    key = create_key(admin, account.id, name="fresh")

    def last_used() -> str | None:
        keys = admin.get(f"/admin/accounts/{account.id}/keys").json()["data"]
        value: str | None = next(k for k in keys if k["id"] == key["id"])["last_used_at"]
        return value

    assert last_used() is None
    before = datetime.now(UTC) - timedelta(seconds=1)
    assert count_tokens(stack.base_url, bearer(key["key"])).status_code == 200
    used = last_used()
    assert used is not None and datetime.fromisoformat(used) >= before


def test_disabled_account_is_403_for_keys_and_tokens(
    stack: Stack, admin: httpx.Client, make_account: AccountFactory
) -> None:
    account = make_account()
    token = mint(admin, account.id)
    assert admin.patch(f"/admin/accounts/{account.id}", json={"disabled": True}).status_code == 200
    for credentials in ({"api_key": account.key}, {"auth_token": token}):
        with pytest.raises(anthropic.PermissionDeniedError) as info:
            sdk(stack, **credentials).messages.create(model=MODEL, max_tokens=4, messages=MESSAGES)
        assert info.value.status_code == 403
        assert info.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    assert admin.patch(f"/admin/accounts/{account.id}", json={"disabled": False}).status_code == 200
    assert count_tokens(stack.base_url, bearer(token)).status_code == 200


def test_inference_credentials_on_admin_routes_are_403(
    stack: Stack, admin: httpx.Client, account: ApiAccount
) -> None:
    url = f"{stack.base_url}/admin/accounts/{account.id}"
    token = mint(admin, account.id)
    for headers in (bearer(account.key), {"x-api-key": account.key}, bearer(token)):
        assert_error(httpx.get(url, headers=headers), 403, "permission_error")
    for headers in (bearer("ak_wrong"), {"x-api-key": "nope"}, {}):
        assert_error(httpx.get(url, headers=headers), 401, "authentication_error")


# ----------------------------------------------------------------------------- JWT, HS256


def test_admin_minted_token_works_with_the_sdk(
    stack: Stack, admin: httpx.Client, account: ApiAccount
) -> None:
    client = sdk(stack, auth_token=mint(admin, account.id))
    assert client.messages.count_tokens(model=MODEL, messages=MESSAGES).input_tokens > 0
    with client.messages.create(model=MODEL, max_tokens=2, messages=MESSAGES, stream=True) as s:
        assert s.response.status_code == 200


def _forgeries(secret: str, account_id: str, victim_id: str) -> dict[str, str]:
    now = int(time.time())
    claims = {"sub": account_id, "iss": "abl", "iat": now, "exp": now + 300}
    good = jwt.encode(claims, secret, algorithm="HS256")
    header, payload, signature = good.split(".")
    none_header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    victim = _b64(json.dumps({**claims, "sub": victim_id}).encode())
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "alg none": f"{none_header}.{payload}.",
        "alg none, victim": f"{none_header}.{victim}.",
        "tampered sub": f"{header}.{victim}.{signature}",
        "wrong secret": jwt.encode(claims, "not-the-secret-" * 4, algorithm="HS256"),
        "HS512": jwt.encode(claims, secret, algorithm="HS512"),
        "RS256 not configured": jwt.encode(claims, other_key, algorithm="RS256"),
        "expired": jwt.encode({**claims, "exp": now - 60}, secret, algorithm="HS256"),
        "no exp": jwt.encode({k: v for k, v in claims.items() if k != "exp"}, secret),
        "wrong issuer": jwt.encode({**claims, "iss": "evil"}, secret, algorithm="HS256"),
        "unknown account": jwt.encode({**claims, "sub": "acct_nobody"}, secret),
        "signature stripped": f"{header}.{payload}.",
    }


def test_jwt_forgeries_are_401(stack: Stack, make_account: AccountFactory) -> None:
    secret = stack.env_for_api()["ABL_JWT_SECRET"]
    attacker, victim = make_account(), make_account()
    for name, token in _forgeries(secret, attacker.id, victim.id).items():
        response = count_tokens(stack.base_url, bearer(token))
        message = assert_error(response, 401, "authentication_error")
        assert message.startswith("invalid token"), (name, message)
        response = httpx.post(
            f"{stack.base_url}/v1/messages",
            json={**COUNT_BODY, "max_tokens": 2},
            headers=bearer(token),
        )
        assert response.status_code == 401, name


# ----------------------------------------------------------------------------- JWT, RS256


def test_rs256_with_a_jwks_file(stack: Stack, make_account: AccountFactory, tmp_path: Path) -> None:
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}))
    env = {
        "ABL_JWKS_FILE": str(jwks),
        "ABL_JWT_ISSUER": "https://idp.test",
        "ABL_JWT_AUDIENCE": "abl-api",
    }
    account = make_account()
    now = int(time.time())
    claims = {
        "sub": account.id,
        "iss": "https://idp.test",
        "aud": "abl-api",
        "iat": now,
        "exp": now + 60,
    }
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    confused_header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    confused_payload = _b64(json.dumps(claims).encode())
    confused_sig = hmac.new(
        public_pem, f"{confused_header}.{confused_payload}".encode(), hashlib.sha256
    ).digest()

    def rs256(**overrides: Any) -> str:
        return jwt.encode({**claims, **overrides}, private_key, "RS256", headers={"kid": "k1"})

    refused = {
        "algorithm confusion": f"{confused_header}.{confused_payload}.{_b64(confused_sig)}",
        "wrong audience": rs256(aud="someone-else"),
        "wrong issuer": rs256(iss="https://evil.test"),
        "expired": rs256(exp=now - 60),
        "unknown kid": jwt.encode(claims, private_key, "RS256", headers={"kid": "k2"}),
    }
    with api_process(stack, tmp_path / "api.log", env) as base_url:
        ok = count_tokens(base_url, bearer(rs256()))
        assert ok.status_code == 200, ok.text
        for name, token in refused.items():
            message = assert_error(
                count_tokens(base_url, bearer(token)), 401, "authentication_error"
            )
            assert message.startswith("invalid token"), (name, message)

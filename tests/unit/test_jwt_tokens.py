"""Account JWTs: what is minted, and every way a forged or stale token must be refused."""

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from api.admin.jwt_tokens import mint_account_token, verify_account_token, verify_token
from api.errors import AuthenticationError, PermissionDeniedError
from api.settings import ApiSettings

SECRET = "unit-test-secret-" + "0123456789abcdef" * 4
ACCOUNT = "acct_unit"


@pytest.fixture
def settings() -> ApiSettings:
    return ApiSettings(jwt_secret=SecretStr(SECRET), jwt_issuer="abl-test")


def _claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {"sub": ACCOUNT, "iss": "abl-test", "iat": now, "exp": now + 60}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _refused(settings: ApiSettings, token: str) -> str:
    with pytest.raises(AuthenticationError) as info:
        verify_account_token(settings, token)
    return info.value.message


def test_mint_then_verify_round_trip(settings: ApiSettings) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    token, expires_at = mint_account_token(settings, ACCOUNT, 120)

    assert verify_account_token(settings, token) == ACCOUNT
    assert before + timedelta(seconds=120) <= expires_at <= before + timedelta(seconds=121)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], issuer="abl-test")
    assert claims["sub"] == ACCOUNT
    assert claims["exp"] == int(expires_at.timestamp())
    assert claims["exp"] - claims["iat"] == 120
    assert claims["nbf"] == claims["iat"]
    assert isinstance(claims["jti"], str) and claims["jti"]


def test_each_token_has_its_own_jti(settings: ApiSettings) -> None:
    first, _ = mint_account_token(settings, ACCOUNT, 60)
    second, _ = mint_account_token(settings, ACCOUNT, 60)
    jti = [
        jwt.decode(t, SECRET, algorithms=["HS256"], issuer="abl-test")["jti"]
        for t in (first, second)
    ]
    assert jti[0] != jti[1]


@pytest.mark.parametrize("ttl", [0, -1, 86_401])
def test_mint_refuses_ttl_out_of_range(settings: ApiSettings, ttl: int) -> None:
    with pytest.raises(ValueError):
        mint_account_token(settings, ACCOUNT, ttl)


def test_mint_without_secret_is_refused() -> None:
    with pytest.raises(PermissionDeniedError, match="ABL_JWT_SECRET"):
        mint_account_token(ApiSettings(jwt_secret=None), ACCOUNT, 60)


def test_verify_without_secret_is_refused(settings: ApiSettings) -> None:
    token, _ = mint_account_token(settings, ACCOUNT, 60)
    assert "disabled" in _refused(ApiSettings(jwt_secret=None), token)


def test_expired_token_is_refused(settings: ApiSettings) -> None:
    now = int(time.time())
    token = jwt.encode(_claims(iat=now - 120, exp=now - 60), SECRET, algorithm="HS256")
    assert _refused(settings, token) == "invalid token: expired"


def test_token_not_yet_valid_is_refused(settings: ApiSettings) -> None:
    token = jwt.encode(_claims(nbf=int(time.time()) + 600), SECRET, algorithm="HS256")
    assert _refused(settings, token) == "invalid token: not yet valid"


def test_wrong_secret_is_refused(settings: ApiSettings) -> None:
    other = ApiSettings(
        jwt_secret=SecretStr("another-secret-" + "fedcba9876543210" * 4), jwt_issuer="abl-test"
    )
    token, _ = mint_account_token(other, ACCOUNT, 60)
    assert _refused(settings, token) == "invalid token: bad signature"


def test_tampered_payload_is_refused(settings: ApiSettings) -> None:
    token, _ = mint_account_token(settings, ACCOUNT, 60)
    header, _, signature = token.split(".")
    forged = _b64(json.dumps(_claims(sub="acct_victim")).encode())
    assert _refused(settings, f"{header}.{forged}.{signature}") == "invalid token: bad signature"


def test_wrong_issuer_is_refused(settings: ApiSettings) -> None:
    token = jwt.encode(_claims(iss="someone-else"), SECRET, algorithm="HS256")
    assert _refused(settings, token) == "invalid token: wrong issuer"


@pytest.mark.parametrize("claim", ["exp", "sub", "iss"])
def test_missing_required_claim_is_refused(settings: ApiSettings, claim: str) -> None:
    claims = _claims()
    del claims[claim]
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    assert _refused(settings, token) == f"invalid token: missing the {claim!r} claim"


@pytest.mark.parametrize("sub", ["", 42])
def test_subject_must_name_an_account(settings: ApiSettings, sub: object) -> None:
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(_claims(sub=sub)).encode())
    signature = jwt.api_jws.get_algorithm_by_name("HS256").sign(
        f"{header}.{payload}".encode(), SECRET.encode()
    )
    message = _refused(settings, f"{header}.{payload}.{_b64(signature)}")
    assert message.startswith("invalid token:")


def test_alg_none_is_refused(settings: ApiSettings) -> None:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(_claims()).encode())
    for token in (f"{header}.{payload}.", f"{header}.{payload}"):
        assert _refused(settings, token).startswith("invalid token:")


def test_a_token_without_iat_is_refused(settings: ApiSettings) -> None:
    """Without iat its lifetime is unknown, so the longest allowed cannot be enforced."""
    claims = _claims()
    del claims["iat"]
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    assert _refused(settings, token) == "invalid token: missing the 'iat' claim"


def test_a_token_living_longer_than_the_maximum_is_refused(settings: ApiSettings) -> None:
    short = settings.model_copy(update={"jwt_max_ttl_s": 600})
    now = int(time.time())
    exact = jwt.encode(_claims(iat=now, exp=now + 600), SECRET, algorithm="HS256")
    assert verify_account_token(short, exact) == ACCOUNT
    longer = jwt.encode(_claims(iat=now, exp=now + 601), SECRET, algorithm="HS256")
    message = _refused(short, longer)
    assert "601 s (exp - iat)" in message and "600 s allowed" in message
    # Backdating iat to look short-lived does not help: exp - iat is what counts.
    backdated = jwt.encode(_claims(iat=now - 3600, exp=now + 60), SECRET, algorithm="HS256")
    assert "3660 s" in _refused(short, backdated)


def test_a_token_is_revoked_by_its_jti_or_else_its_hash(settings: ApiSettings) -> None:
    with_jti = jwt.encode(_claims(jti="the-jti"), SECRET, algorithm="HS256")
    assert verify_token(settings, with_jti).revocation_id == "the-jti"
    without = jwt.encode(_claims(), SECRET, algorithm="HS256")
    digest = hashlib.sha256(without.encode()).hexdigest()
    assert verify_token(settings, without).revocation_id == f"sha256:{digest}"


def test_minting_refuses_a_lifetime_over_the_maximum(settings: ApiSettings) -> None:
    short = settings.model_copy(update={"jwt_max_ttl_s": 600})
    with pytest.raises(ValueError, match=r"1\.\.600"):
        mint_account_token(short, ACCOUNT, 601)
    token, _ = mint_account_token(short, ACCOUNT, 600)
    assert verify_token(short, token).account_id == ACCOUNT


@pytest.mark.parametrize("algorithm", ["HS512", "HS384"])
def test_other_hmac_size_is_refused(settings: ApiSettings, algorithm: str) -> None:
    token = jwt.encode(_claims(), SECRET, algorithm=algorithm)
    assert _refused(settings, token) == "invalid token: only HS256 and RS256 are accepted"


def test_rs256_token_is_refused_when_not_configured(settings: ApiSettings) -> None:
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(_claims(), private_key, algorithm="RS256")
    assert _refused(settings, token) == "invalid token: RS256 is not configured"


def test_rs256_hs256_confusion_is_refused() -> None:
    """A server whose secret is (mis)configured as an RSA public key must not accept tokens
    HMAC-signed with that public, hence known, key."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    settings = ApiSettings(jwt_secret=SecretStr(public_pem), jwt_issuer="abl-test")
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(_claims()).encode())
    # Sign by hand: PyJWT itself refuses to use a PEM key as an HMAC secret.
    signature = hmac.new(public_pem.encode(), f"{header}.{payload}".encode(), hashlib.sha256)
    token = f"{header}.{payload}.{_b64(signature.digest())}"
    assert _refused(settings, token).startswith("invalid token:")
    with pytest.raises(PermissionDeniedError, match="not usable"):
        mint_account_token(settings, ACCOUNT, 60)


@pytest.mark.parametrize("token", ["", "not-a-jwt", "a.b.c", "ak_live_looks_like_a_key"])
def test_garbage_is_refused(settings: ApiSettings, token: str) -> None:
    assert _refused(settings, token).startswith("invalid token:")

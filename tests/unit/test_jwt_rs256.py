"""RS256 account JWTs from an identity provider: PEM key, JWKS, audience, and forgeries."""

import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import SecretStr

from api.admin.jwt_tokens import verify_account_token
from api.errors import AuthenticationError
from api.settings import ApiSettings

ACCOUNT = "acct_rs256"
ISSUER = "https://idp.example"
AUDIENCE = "abl-inference"
HS_SECRET = "hs-secret-" + "0123456789abcdef" * 4


@pytest.fixture(scope="module")
def private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}


@pytest.fixture
def pem_settings(tmp_path: Path, private_key: rsa.RSAPrivateKey) -> ApiSettings:
    path = tmp_path / "idp.pem"
    path.write_bytes(_public_pem(private_key))
    return ApiSettings(
        jwt_public_key_file=path,
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        jwt_secret=SecretStr(HS_SECRET),
    )


@pytest.fixture
def jwks_settings(
    tmp_path: Path, private_key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey
) -> ApiSettings:
    path = tmp_path / "jwks.json"
    keys = [_jwk(other_key, "old"), _jwk(private_key, "current")]
    path.write_text(json.dumps({"keys": keys}))
    return ApiSettings(jwks_file=path, jwt_issuer=ISSUER, jwt_audience=None)


def _claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": ACCOUNT,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 60,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _refused(settings: ApiSettings, token: str) -> str:
    with pytest.raises(AuthenticationError) as info:
        verify_account_token(settings, token)
    return info.value.message


def test_pem_key_accepts_rs256(pem_settings: ApiSettings, private_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(_claims(), private_key, algorithm="RS256")
    assert verify_account_token(pem_settings, token) == ACCOUNT


def test_hs256_still_works_beside_rs256(pem_settings: ApiSettings) -> None:
    token = jwt.encode(_claims(), HS_SECRET, algorithm="HS256")
    assert verify_account_token(pem_settings, token) == ACCOUNT


def test_other_rsa_key_is_refused(pem_settings: ApiSettings, other_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(_claims(), other_key, algorithm="RS256")
    assert _refused(pem_settings, token) == "invalid token: bad signature"


def test_algorithm_confusion_is_refused(pem_settings: ApiSettings) -> None:
    """HS256 "signed" with the (public) RSA key as the HMAC secret: the classic forgery."""
    assert pem_settings.jwt_public_key_file is not None
    public_pem = pem_settings.jwt_public_key_file.read_bytes()
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(_claims()).encode())
    signature = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    token = f"{header}.{payload}.{_b64(signature)}"
    assert _refused(pem_settings, token) == "invalid token: bad signature"
    no_secret = pem_settings.model_copy(update={"jwt_secret": None})
    assert _refused(no_secret, token) == "invalid token: HS256 is not configured"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "", "RS512", "PS256", "ES256"])
def test_other_algorithms_are_refused(pem_settings: ApiSettings, alg: str) -> None:
    header = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = _b64(json.dumps(_claims()).encode())
    for token in (f"{header}.{payload}.", f"{header}.{payload}.c2lnbmF0dXJl"):
        message = _refused(pem_settings, token)
        assert message == "invalid token: only HS256 and RS256 are accepted"


def test_ec_key_claiming_rs256_is_refused(pem_settings: ApiSettings) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(_claims(), ec_key, algorithm="ES256")
    assert _refused(pem_settings, token).startswith("invalid token:")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"aud": "someone-else"}, "invalid token: wrong audience"),
        ({"aud": None}, "invalid token: missing the 'aud' claim"),
        ({"iss": "https://evil.example"}, "invalid token: wrong issuer"),
        ({"exp": None}, "invalid token: missing the 'exp' claim"),
        ({"exp": int(time.time()) - 3600}, "invalid token: expired"),
        ({"nbf": int(time.time()) + 3600}, "invalid token: not yet valid"),
        ({"sub": None}, "invalid token: missing the 'sub' claim"),
    ],
)
def test_claims_are_checked(
    pem_settings: ApiSettings,
    private_key: rsa.RSAPrivateKey,
    overrides: dict[str, object],
    message: str,
) -> None:
    claims = _claims()
    for name, value in overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    token = jwt.encode(claims, private_key, algorithm="RS256")
    assert _refused(pem_settings, token) == message


def test_jwks_picks_the_key_by_kid(
    jwks_settings: ApiSettings, private_key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey
) -> None:
    claims = _claims(aud=None)
    current = jwt.encode(claims, private_key, algorithm="RS256", headers={"kid": "current"})
    old = jwt.encode(claims, other_key, algorithm="RS256", headers={"kid": "old"})
    assert verify_account_token(jwks_settings, current) == ACCOUNT
    assert verify_account_token(jwks_settings, old) == ACCOUNT
    swapped = jwt.encode(claims, other_key, algorithm="RS256", headers={"kid": "current"})
    assert _refused(jwks_settings, swapped) == "invalid token: bad signature"


def test_jwks_unknown_or_missing_kid_is_refused(
    jwks_settings: ApiSettings, private_key: rsa.RSAPrivateKey
) -> None:
    claims = _claims(aud=None)
    unknown = jwt.encode(claims, private_key, algorithm="RS256", headers={"kid": "nope"})
    assert "no key with kid 'nope'" in _refused(jwks_settings, unknown)
    # Two keys in the set: a token without `kid` is ambiguous.
    bare = jwt.encode(claims, private_key, algorithm="RS256")
    assert "no key with kid None" in _refused(jwks_settings, bare)


def test_aud_is_refused_when_no_audience_is_configured(
    jwks_settings: ApiSettings, private_key: rsa.RSAPrivateKey
) -> None:
    """A token minted for another service must not be replayed here."""
    token = jwt.encode(_claims(), private_key, algorithm="RS256", headers={"kid": "current"})
    assert _refused(jwks_settings, token) == "invalid token: wrong audience"


def test_jwks_is_reloaded_when_the_file_changes(
    jwks_settings: ApiSettings, private_key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey
) -> None:
    assert jwks_settings.jwks_file is not None
    token = jwt.encode(
        _claims(aud=None), private_key, algorithm="RS256", headers={"kid": "current"}
    )
    assert verify_account_token(jwks_settings, token) == ACCOUNT
    jwks_settings.jwks_file.write_text(json.dumps({"keys": [_jwk(other_key, "current")]}))
    stat = jwks_settings.jwks_file.stat()
    # Make sure the modification time moves even on coarse-grained filesystems.
    os.utime(jwks_settings.jwks_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert _refused(jwks_settings, token) == "invalid token: bad signature"


def test_missing_key_file_is_a_configuration_error(
    tmp_path: Path, private_key: rsa.RSAPrivateKey
) -> None:
    settings = ApiSettings(jwt_public_key_file=tmp_path / "absent.pem", jwt_issuer="")
    token = jwt.encode(_claims(aud=None, iss=None), private_key, algorithm="RS256")
    assert _refused(settings, token) == "invalid token: JWT authentication is misconfigured"


def test_empty_issuer_setting_turns_the_check_off(
    pem_settings: ApiSettings, private_key: rsa.RSAPrivateKey
) -> None:
    settings = pem_settings.model_copy(update={"jwt_issuer": ""})
    token = jwt.encode(_claims(iss=None), private_key, algorithm="RS256")
    assert verify_account_token(settings, token) == ACCOUNT

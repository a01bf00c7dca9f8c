"""Account JWTs, accepted as `Authorization: Bearer` on inference.

Two kinds are verified: HS256 with `settings.jwt_secret` (what /admin/accounts/{id}/tokens mints)
and RS256 from an identity provider, with a PEM public key (`jwt_public_key_file`) or a JWKS file
(`jwks_file`, key chosen by `kid`). The token's `alg` only picks which configured key to try, and
the decoder is then pinned to that one algorithm with that one key: `alg: none`, other algorithms,
and HS256 tokens "signed" with the RSA public key (algorithm confusion) are all refused, because
an HMAC check only ever uses the shared secret. `exp`, `iat` and `sub` are required, and
`exp - iat` may not exceed `jwt_max_ttl_s`; `nbf` is checked when present; `iss` and `aud` are
checked (and required) when configured. A token is revoked by its `jti` (or, without one, by
its SHA-256): `revocation_id`, which the caller checks against the revocation list.
"""

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from api.errors import AuthenticationError, PermissionDeniedError
from api.settings import ApiSettings

HMAC_ALGORITHM = "HS256"
RSA_ALGORITHM = "RS256"
ALGORITHM = HMAC_ALGORITHM  # what this module mints
MAX_TTL_SECONDS = 86_400
# Seconds of clock difference tolerated on exp/nbf/iat between us and the token's issuer.
LEEWAY_SECONDS = 5


def _secret(settings: ApiSettings) -> str | None:
    if settings.jwt_secret is None:
        return None
    return settings.jwt_secret.get_secret_value() or None


def mint_account_token(
    settings: ApiSettings, account_id: str, ttl_seconds: int
) -> tuple[str, datetime]:
    """A signed JWT naming `account_id` (`sub`), valid for `ttl_seconds`, and its expiry."""
    secret = _secret(settings)
    if secret is None:
        raise PermissionDeniedError("JWT minting disabled: set ABL_JWT_SECRET")
    longest = min(MAX_TTL_SECONDS, settings.jwt_max_ttl_s)
    if not 1 <= ttl_seconds <= longest:
        raise ValueError(f"ttl_seconds must be within 1..{longest}")
    # Whole seconds: the claims are NumericDate integers and expires_at must match them.
    now = datetime.now(UTC).replace(microsecond=0)
    expires_at = now + timedelta(seconds=ttl_seconds)
    claims: dict[str, Any] = {
        "sub": account_id,
        "iat": now,
        "nbf": now,
        "exp": expires_at,
        "jti": secrets.token_urlsafe(16),
    }
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    try:
        token = jwt.encode(claims, secret, algorithm=ALGORITHM)
    except jwt.InvalidKeyError as exc:
        raise PermissionDeniedError(
            "JWT minting disabled: ABL_JWT_SECRET is not usable as an HMAC secret"
        ) from exc
    return token, expires_at


@lru_cache(maxsize=8)
def _pem_key(path: Path, mtime_ns: int) -> RSAPublicKey:
    key = load_pem_public_key(path.read_bytes())
    if not isinstance(key, RSAPublicKey):
        raise ValueError(f"{path} is not an RSA public key")
    return key


@lru_cache(maxsize=8)
def _jwks(path: Path, mtime_ns: int) -> dict[str | None, Any]:
    """RS256 signing keys of a JWKS file by `kid` (None for a key without one)."""
    document = json.loads(path.read_text())
    keys: dict[str | None, Any] = {}
    for entry in document.get("keys", []):
        if entry.get("kty") != "RSA" or entry.get("use", "sig") != "sig":
            continue
        if entry.get("alg", RSA_ALGORITHM) != RSA_ALGORITHM:
            continue
        keys[entry.get("kid")] = jwt.PyJWK.from_dict(entry, RSA_ALGORITHM).key
    return keys


def _rsa_key(settings: ApiSettings, kid: object) -> Any:
    """The RSA public key for a token's `kid`; AuthenticationError when none is configured."""
    try:
        if settings.jwks_file is not None:
            path = settings.jwks_file
            keys = _jwks(path, path.stat().st_mtime_ns)
            if kid is None and len(keys) == 1:
                return next(iter(keys.values()))
            if isinstance(kid, str | None) and kid in keys:
                return keys[kid]
            raise AuthenticationError(f"invalid token: no key with kid {kid!r} in the JWKS")
        if settings.jwt_public_key_file is not None:
            path = settings.jwt_public_key_file
            return _pem_key(path, path.stat().st_mtime_ns)
    except (OSError, ValueError, TypeError, jwt.PyJWTError) as exc:
        raise AuthenticationError("invalid token: JWT authentication is misconfigured") from exc
    raise AuthenticationError(f"invalid token: {RSA_ALGORITHM} is not configured")


def _key_for(settings: ApiSettings, header: dict[str, Any]) -> tuple[str, Any]:
    """(algorithm, key) to verify with: the token's `alg` picks one configured key, or none."""
    algorithm = header.get("alg")
    if algorithm == HMAC_ALGORITHM:
        secret = _secret(settings)
        if secret is None:
            raise AuthenticationError(f"invalid token: {HMAC_ALGORITHM} is not configured")
        return HMAC_ALGORITHM, secret
    if algorithm == RSA_ALGORITHM:
        return RSA_ALGORITHM, _rsa_key(settings, header.get("kid"))
    raise AuthenticationError(
        f"invalid token: only {HMAC_ALGORITHM} and {RSA_ALGORITHM} are accepted"
    )


def _configured(settings: ApiSettings) -> bool:
    return bool(_secret(settings) or settings.jwt_public_key_file is not None or settings.jwks_file)


@dataclass(frozen=True)
class VerifiedToken:
    """What a valid token says."""

    account_id: str
    # The `jti` claim, or `sha256:<hex>` of the token when it has none: what revokes it.
    revocation_id: str
    expires_at: datetime


def revocation_id_of(token: str, jti: object) -> str:
    """What identifies a token on the revocation list: its `jti`, else its SHA-256."""
    if isinstance(jti, str) and jti:
        return jti
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def verify_account_token(settings: ApiSettings, token: str) -> str:
    """The account id (`sub`) of a valid token; AuthenticationError otherwise."""
    return verify_token(settings, token).account_id


def verify_token(settings: ApiSettings, token: str) -> VerifiedToken:
    """The claims of a valid token (signature, times, lifetime, issuer, audience); not the
    revocation list, which needs the database. AuthenticationError otherwise."""
    if not _configured(settings):
        raise AuthenticationError("invalid token: JWT authentication is disabled")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError as exc:
        raise AuthenticationError(f"invalid token: {exc}") from exc
    algorithm, key = _key_for(settings, header)
    required = ["exp", "iat", "sub"]
    if settings.jwt_issuer:
        required.append("iss")
    if settings.jwt_audience:
        required.append("aud")
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            issuer=settings.jwt_issuer or None,
            audience=settings.jwt_audience,
            leeway=LEEWAY_SECONDS,
            options={"require": required},
        )
    except jwt.ExpiredSignatureError as exc:
        raise AuthenticationError("invalid token: expired") from exc
    except jwt.ImmatureSignatureError as exc:
        raise AuthenticationError("invalid token: not yet valid") from exc
    except jwt.InvalidIssuerError as exc:
        raise AuthenticationError("invalid token: wrong issuer") from exc
    except jwt.InvalidAudienceError as exc:
        raise AuthenticationError("invalid token: wrong audience") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise AuthenticationError(f"invalid token: missing the {exc.claim!r} claim") from exc
    except jwt.InvalidAlgorithmError as exc:
        raise AuthenticationError(f"invalid token: {exc}") from exc
    except jwt.InvalidSignatureError as exc:
        raise AuthenticationError("invalid token: bad signature") from exc
    except jwt.InvalidKeyError as exc:
        # A PEM/SSH key configured as the secret: PyJWT refuses it, and so do we.
        raise AuthenticationError("invalid token: JWT authentication is misconfigured") from exc
    except jwt.InvalidTokenError as exc:
        raise AuthenticationError(f"invalid token: {exc}") from exc
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise AuthenticationError("invalid token: 'sub' must name an account")
    lifetime = claims["exp"] - claims["iat"]
    if lifetime > settings.jwt_max_ttl_s:
        raise AuthenticationError(
            f"invalid token: it is valid for {lifetime:g} s (exp - iat), longer than the"
            f" {settings.jwt_max_ttl_s} s allowed"
        )
    return VerifiedToken(
        account_id=subject,
        revocation_id=revocation_id_of(token, claims.get("jti")),
        expires_at=datetime.fromtimestamp(claims["exp"], UTC),
    )

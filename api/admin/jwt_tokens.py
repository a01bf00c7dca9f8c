"""Account JWTs: minted by the admin API, accepted as `Authorization: Bearer` on inference.

HS256 only, with `settings.jwt_secret`. The verifier pins the algorithm list, so `alg: none`,
other HMAC sizes and RS256/HS256 confusion are refused before any signature check.
"""

import secrets
from datetime import UTC, datetime, timedelta

import jwt

from api.errors import AuthenticationError, PermissionDeniedError
from api.settings import ApiSettings

ALGORITHM = "HS256"
# Claims a token must carry; `iss` is checked against settings.jwt_issuer as well.
REQUIRED_CLAIMS = ("exp", "iat", "sub", "iss")
MAX_TTL_SECONDS = 86_400


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
    if not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
        raise ValueError(f"ttl_seconds must be within 1..{MAX_TTL_SECONDS}")
    # Whole seconds: the claims are NumericDate integers and expires_at must match them.
    now = datetime.now(UTC).replace(microsecond=0)
    expires_at = now + timedelta(seconds=ttl_seconds)
    claims = {
        "sub": account_id,
        "iss": settings.jwt_issuer,
        "iat": now,
        "nbf": now,
        "exp": expires_at,
        "jti": secrets.token_urlsafe(16),
    }
    try:
        token = jwt.encode(claims, secret, algorithm=ALGORITHM)
    except jwt.InvalidKeyError as exc:
        raise PermissionDeniedError(
            "JWT minting disabled: ABL_JWT_SECRET is not usable as an HMAC secret"
        ) from exc
    return token, expires_at


def verify_account_token(settings: ApiSettings, token: str) -> str:
    """The account id (`sub`) of a valid token; AuthenticationError otherwise."""
    secret = _secret(settings)
    if secret is None:
        raise AuthenticationError("invalid token: JWT authentication is disabled")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            issuer=settings.jwt_issuer,
            options={"require": list(REQUIRED_CLAIMS)},
        )
    except jwt.ExpiredSignatureError as exc:
        raise AuthenticationError("invalid token: expired") from exc
    except jwt.ImmatureSignatureError as exc:
        raise AuthenticationError("invalid token: not yet valid") from exc
    except jwt.InvalidIssuerError as exc:
        raise AuthenticationError("invalid token: wrong issuer") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise AuthenticationError(f"invalid token: missing the {exc.claim!r} claim") from exc
    except jwt.InvalidAlgorithmError as exc:
        raise AuthenticationError(f"invalid token: only {ALGORITHM} is accepted") from exc
    except jwt.InvalidSignatureError as exc:
        raise AuthenticationError("invalid token: bad signature") from exc
    except jwt.InvalidTokenError as exc:
        raise AuthenticationError(f"invalid token: {exc}") from exc
    except jwt.InvalidKeyError as exc:
        # A PEM/SSH key configured as the secret: PyJWT refuses it, and so do we.
        raise AuthenticationError("invalid token: JWT authentication is misconfigured") from exc
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise AuthenticationError("invalid token: 'sub' must name an account")
    return subject

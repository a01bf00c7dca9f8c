"""Settings of the API process."""

import re
from pathlib import Path

from pydantic import Field, SecretStr, model_validator

from contract.settings import CoreSettings

# The name ABL_ADMIN_TOKEN goes by in audit rows and ledger rows' created_by.
DEFAULT_ADMIN_NAME = "admin"
_ADMIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def parse_admin_tokens(value: str) -> dict[str, str]:
    """`name=token,name=token` as {name: token}; ValueError naming what is wrong."""
    tokens: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, sep, token = item.partition("=")
        name, token = name.strip(), token.strip()
        if not sep or not token:
            raise ValueError(f"{name or item!r}: expected name=token")
        if not _ADMIN_NAME.fullmatch(name):
            raise ValueError(f"{name!r}: a name is 1-64 letters, digits, '_', '.' or '-'")
        if name in tokens:
            raise ValueError(f"{name!r} is named twice")
        if token in tokens.values():
            raise ValueError(f"{name!r} has the same token as another name")
        tokens[name] = token
    return tokens


class ApiSettings(CoreSettings):
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: SecretStr | None = None
    # More admin tokens, each with a name that audit and ledger rows record:
    # `name=token,name=token` (ABL_ADMIN_TOKEN, when set, is named "admin").
    admin_tokens: SecretStr | None = None
    # Failed admin authentications from one client address allowed per window; past them the
    # address gets 429s until the window ends (api/admin/throttle.py).
    admin_auth_max_failures: int = Field(default=10, ge=1)
    # Seconds of that window, from the address's first failure.
    admin_auth_window_s: int = Field(default=300, ge=1)
    # HS256 secret for JWTs minted by /admin/accounts/{id}/tokens and accepted as Bearer.
    jwt_secret: SecretStr | None = None
    # PEM public key that verifies RS256 JWTs from an identity provider.
    jwt_public_key_file: Path | None = None
    # JWKS file that verifies RS256 JWTs by `kid` (wins over the PEM key; re-read on change).
    jwks_file: Path | None = None
    # `iss` JWTs must carry; "" turns the issuer check off.
    jwt_issuer: str = "abl"
    # `aud` JWTs must carry; unset: tokens that carry an `aud` are refused.
    jwt_audience: str | None = None
    # Longest lifetime (exp - iat, seconds) of a JWT accepted on /v1, minted or from an
    # identity provider; tokens without `iat` are refused.
    jwt_max_ttl_s: int = Field(default=86_400, gt=0)
    # Requests per minute of a key when neither it nor its account sets one (docs/access.md).
    default_requests_per_minute: int = Field(default=6_000, gt=0)
    # Input tokens per minute of a key when neither it nor its account sets one.
    default_input_tokens_per_minute: int = Field(default=4_000_000, gt=0)
    # Output tokens (max_tokens until a request ends) per minute of a key by default.
    default_output_tokens_per_minute: int = Field(default=1_000_000, gt=0)
    # Requests in flight at once per key by default.
    default_concurrent_requests: int = Field(default=512, gt=0)
    # Seconds of its per-minute rate a full bucket holds: 60 lets a whole minute's limit arrive
    # at once (Anthropic's token bucket); 1 enforces 60 requests/min as one per second.
    rate_limit_burst_s: float = Field(default=60.0, gt=0, le=60)
    # Longest the rate-limit script may take before the request is refused with a 529.
    rate_limit_timeout_s: float = Field(default=2.0, gt=0)
    # Longest a request may take end to end before it is cancelled.
    request_timeout_s: float = Field(default=600.0, gt=0)
    # Seconds between SSE pings while no token arrives.
    ping_interval_s: float = Field(default=5.0, gt=0)
    # How long a request waits for a worker to pick it up before a 529.
    queue_timeout_s: float = Field(default=30.0, gt=0)
    # Jobs waiting for a model beyond which new requests get a 529 at once; past it, an
    # account with fewer than its share (this / accounts waiting) may still queue, up to twice
    # as many in all.
    max_queued_per_model: int = Field(default=256, ge=1)
    # While no event arrives, how often to check the request's worker is alive.
    liveness_check_s: float = Field(default=1.0, gt=0)
    # Anthropic's limit for Messages and Token Counting.
    max_body_bytes: int = 32 * 1024 * 1024
    # Comma-separated models that each need a live worker for /readyz to answer 200;
    # empty: every model in the catalogue (api/health.py).
    ready_models: str = ""

    @model_validator(mode="after")
    def _admin_tokens_parse(self) -> "ApiSettings":
        self.admin_credentials()  # refuses a malformed list at startup, naming the problem
        return self

    def admin_credentials(self) -> dict[str, str]:
        """Every admin token by its name; empty: the admin API is disabled."""
        named = parse_admin_tokens(
            self.admin_tokens.get_secret_value() if self.admin_tokens else ""
        )
        token = self.admin_token.get_secret_value() if self.admin_token else ""
        if token:
            if DEFAULT_ADMIN_NAME in named:
                raise ValueError(f"ABL_ADMIN_TOKENS may not name {DEFAULT_ADMIN_NAME!r}")
            if token in named.values():
                raise ValueError("ABL_ADMIN_TOKEN is also in ABL_ADMIN_TOKENS")
            named[DEFAULT_ADMIN_NAME] = token
        return named

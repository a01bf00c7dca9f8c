"""Settings of the API process."""

from pathlib import Path

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from contract.settings import CoreSettings

# Shorter secrets are refused ("shorter than 32" is literal: 32 characters pass).
MIN_SECRET_CHARS = 32
PLACEHOLDER = "REPLACE_ME"
GENERATE_SECRET = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'


def secret_problem(variable: str, value: str) -> str | None:
    """Why `value` cannot be the secret `variable` (a placeholder, or too short), with how to
    make a good one; None when it can."""
    if PLACEHOLDER in value:
        reason = f"still holds a {PLACEHOLDER} placeholder"
    elif len(value) < MIN_SECRET_CHARS:
        reason = f"is {len(value)} characters long, shorter than {MIN_SECRET_CHARS}"
    else:
        return None
    return f"{variable} {reason}; generate one with: {GENERATE_SECRET}"


class ApiSettings(CoreSettings):
    # A refused secret is not echoed into the logs.
    model_config = SettingsConfigDict(**{**CoreSettings.model_config, "hide_input_in_errors": True})

    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: SecretStr | None = None
    # HS256 secret for JWTs minted by /admin/accounts/{id}/tokens and accepted as Bearer; at
    # least 32 characters, no REPLACE_ME (the process refuses to start otherwise).
    jwt_secret: SecretStr | None = None
    # PEM public key that verifies RS256 JWTs from an identity provider.
    jwt_public_key_file: Path | None = None
    # JWKS file that verifies RS256 JWTs by `kid` (wins over the PEM key; re-read on change).
    jwks_file: Path | None = None
    # `iss` JWTs must carry; "" turns the issuer check off.
    jwt_issuer: str = "abl"
    # `aud` JWTs must carry; unset: tokens that carry an `aud` are refused.
    jwt_audience: str | None = None
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
    # Jobs waiting in a model's queue beyond which new requests get a 529 at once.
    max_queued_per_model: int = Field(default=256, ge=1)
    # While no event arrives, how often to check the request's worker is alive.
    liveness_check_s: float = Field(default=1.0, gt=0)
    # Anthropic's limit for Messages and Token Counting.
    max_body_bytes: int = 32 * 1024 * 1024
    # JSON values (array elements and object members) a body may hold: bounds the memory and
    # time that parsing and validating one body take (api/request_body.py, docs/security.md).
    max_json_values: int = Field(default=100_000, ge=1)
    # Comma-separated models that each need a live worker for /readyz to answer 200;
    # empty: every model in the catalogue (api/health.py).
    ready_models: str = ""

    @field_validator("admin_token", "jwt_secret")
    @classmethod
    def _strong_secret(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        """Unset (or empty) turns the feature off; a placeholder or a short secret is refused,
        so the process does not start with a guessable credential."""
        if value is None or not value.get_secret_value():
            return None
        problem = secret_problem(f"ABL_{(info.field_name or '').upper()}", value.get_secret_value())
        if problem is not None:
            raise ValueError(problem)
        return value

"""Settings of the API process."""

from pathlib import Path

from pydantic import Field, SecretStr

from contract.settings import CoreSettings


class ApiSettings(CoreSettings):
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: SecretStr | None = None
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

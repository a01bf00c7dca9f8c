"""Settings of the API process."""

import re
from pathlib import Path

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

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
    # More admin tokens, each with a name that audit and ledger rows record:
    # `name=token,name=token` (ABL_ADMIN_TOKEN, when set, is named "admin").
    admin_tokens: SecretStr | None = None
    # Failed admin authentications from one client address allowed per window; past them the
    # address gets 429s until the window ends (api/admin/throttle.py).
    admin_auth_max_failures: int = Field(default=10, ge=1)
    # Seconds of that window, from the address's first failure.
    admin_auth_window_s: int = Field(default=300, ge=1)
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
    # JSON values (array elements and object members) a body may hold: bounds the memory and
    # time that parsing and validating one body take (api/request_body.py, docs/security.md).
    max_json_values: int = Field(default=100_000, ge=1)
    # Message Batches (docs/batches.md): the absolute base of `results_url`; unset: the URL the
    # request came in on.
    public_base_url: str | None = None
    # Requests a Message Batch may hold.
    batch_max_requests: int = Field(default=100_000, ge=1)
    # JSON values a batch's creation body may hold (its bytes: ABL_MAX_BODY_BYTES).
    batch_max_json_values: int = Field(default=4_000_000, ge=1)
    # A batch's requests not ended this long after its creation end `expired`.
    batch_expiry_s: float = Field(default=86_400.0, gt=0)
    # An ended batch's results are kept this long, then it is archived.
    batch_retention_s: float = Field(default=29 * 86_400.0, gt=0)
    # This process dispatches batch requests to workers (any number of replicas may).
    batch_dispatch: bool = True
    # Seconds between the dispatcher's passes.
    batch_dispatch_interval_s: float = Field(default=0.5, gt=0)
    # Batch requests in flight per model at most, all replicas together.
    batch_in_flight_per_model: int = Field(default=64, ge=1)
    # A batch request still queued this long after its dispatch while no job waits in its
    # lane lost its job (its worker died before claiming it): it is dispatched again.
    batch_lost_after_s: float = Field(default=15.0, gt=0)
    # Runs of a batch request whose worker died (or that failed on our side) before it errors.
    batch_max_attempts: int = Field(default=3, ge=1)
    # Automatic prompt caching: a request without cache_control breakpoints is cached as if it
    # marked its whole prompt (docs/caching.md); off: only what a request marks is cached.
    auto_prompt_cache: bool = False
    # Cache-aware routing: a request whose prompt prefix a live worker holds goes to that
    # worker's own lane while it holds fewer than this many waiting jobs, else to the shared
    # lanes (docs/caching.md). 0: off.
    prefix_route_max_queued: int = Field(default=4, ge=0)
    # Comma-separated models that each need a live worker for /readyz to answer 200;
    # empty: every model in the catalogue (api/health.py).
    ready_models: str = ""

    @model_validator(mode="after")
    def _admin_tokens_parse(self) -> "ApiSettings":
        # Refuses a malformed list, or a weak token in it, at startup, naming the problem.
        for name, token in self.admin_credentials().items():
            problem = secret_problem(f"ABL_ADMIN_TOKENS ({name})", token)
            if problem is not None:
                raise ValueError(problem)
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

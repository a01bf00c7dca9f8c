"""Settings of the API process."""

from pydantic import Field, SecretStr

from db.settings import CoreSettings


class ApiSettings(CoreSettings):
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: SecretStr | None = None
    # HS256 secret for JWTs minted by /admin/accounts/{id}/tokens and accepted as Bearer.
    jwt_secret: SecretStr | None = None
    jwt_issuer: str = "abl"
    # Longest a request may take end to end before it is cancelled.
    request_timeout_s: float = Field(default=600.0, gt=0)
    # Seconds between SSE pings while no token arrives.
    ping_interval_s: float = Field(default=5.0, gt=0)
    # Anthropic's limit for Messages and Token Counting.
    max_body_bytes: int = 32 * 1024 * 1024

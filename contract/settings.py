"""Settings every process shares: where the data, the database and Redis are."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CoreSettings(BaseSettings):
    """ABL_* environment shared by the API, the workers and the CLI."""

    model_config = SettingsConfigDict(env_prefix="ABL_", extra="ignore")

    data_dir: Path = Path(".abl")
    database_url: str | None = None
    redis_url: str | None = None
    # USD price of one credit; the seed's example (42 + 128 tokens at $5/M = 1 credit) needs $0.001.
    credit_price_usd: str = "0.001"
    # Extra model catalogue (JSON file); the default and test models are always present.
    models_file: Path | None = None
    default_max_tokens: int = Field(default=1024, ge=1)
    # A worker renews a lease on each request it runs; a lease left to expire means it died.
    worker_lease_s: float = Field(default=10.0, gt=0)
    # Interactive lanes per model: accounts are hashed onto them and workers take from them
    # round-robin, so one account's backlog cannot hold back everyone else's requests.
    # The API and every worker must use the same number.
    queue_lanes: int = Field(default=4, ge=1, le=64)

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    def require_database_url(self) -> str:
        if not self.database_url:
            raise RuntimeError(
                "ABL_DATABASE_URL is not set (make up sets it for embedded Postgres)"
            )
        return self.database_url

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise RuntimeError("ABL_REDIS_URL is not set (make up sets it for embedded Redis)")
        return self.redis_url

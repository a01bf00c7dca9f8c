"""The admin API over HTTP, for the `abl admin` commands: where it is, its token, its calls.

The CLI talks HTTP only: it never imports the API's own modules or needs its dependencies.
"""

from collections.abc import Iterator, Mapping
from typing import Any

import httpx
from httpx import USE_CLIENT_DEFAULT
from pydantic import SecretStr

from contract.settings import CoreSettings

# The file `make up` writes the admin token to, under ABL_DATA_DIR.
TOKEN_FILE = "admin_token"
# Largest page the API serves (api.admin.schemas.MAX_PAGE_SIZE).
_MAX_PAGE = 1000

Json = Any


class AdminClientSettings(CoreSettings):
    """Where the admin API is and the token for it (ABL_* environment)."""

    url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: SecretStr | None = None

    def base_url(self) -> str:
        if self.url:
            return self.url.rstrip("/")
        # A server bound to every interface is reached on loopback.
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def token(self) -> str | None:
        if self.admin_token is not None and self.admin_token.get_secret_value():
            return self.admin_token.get_secret_value()
        path = self.data_dir / TOKEN_FILE
        if path.is_file():
            return path.read_text().strip() or None
        return None


class AdminApiError(Exception):
    """The API answered with an error envelope (or something that is not JSON)."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(f"{status} {error_type}: {message}")


class AdminClient:
    """A thin synchronous client; every method returns the decoded JSON body."""

    def __init__(self, base_url: str, token: str, timeout: float = 30.0) -> None:
        self._http = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        )

    def close(self) -> None:
        self._http.close()

    def call(
        self,
        method: str,
        path: str,
        *,
        body: Json = None,
        params: Mapping[str, str | int] | None = None,
        timeout: float | None = None,
    ) -> Json:
        """The decoded body of a success; AdminApiError otherwise. `timeout`: seconds for
        this call instead of the client's."""
        response = self._http.request(
            method,
            path,
            json=body,
            params=params,
            timeout=USE_CLIENT_DEFAULT if timeout is None else timeout,
        )
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.is_success and data is not None:
            return data
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            error_type, message = error.get("type"), error.get("message")
            raise AdminApiError(response.status_code, str(error_type), str(message))
        raise AdminApiError(response.status_code, "http_error", response.text[:500])

    def ledger(self, account_id: str, limit: int | None) -> Iterator[Json]:
        """Entries newest first, following `next_before_id`; all of them when limit is None."""
        return self._pages(f"/admin/accounts/{account_id}/ledger", {}, limit)

    def audit(self, filters: Mapping[str, str], limit: int | None) -> Iterator[Json]:
        """Audit rows newest first, filtered; all of them when limit is None (or 0)."""
        return self._pages("/admin/audit", filters, limit or None)

    def _pages(
        self, path: str, filters: Mapping[str, str | int], limit: int | None
    ) -> Iterator[Json]:
        before_id: int | None = None
        remaining = limit
        while remaining is None or remaining > 0:
            size = _MAX_PAGE if remaining is None else min(remaining, _MAX_PAGE)
            params: dict[str, str | int] = {**filters, "limit": size}
            if before_id is not None:
                params["before_id"] = before_id
            page = self.call("GET", path, params=params)
            yield from page["data"]
            if remaining is not None:
                remaining -= len(page["data"])
            before_id = page["next_before_id"]
            if not page["has_more"] or before_id is None:
                return

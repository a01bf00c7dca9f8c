"""The admin API's one credential: `Authorization: Bearer $ABL_ADMIN_TOKEN`."""

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import AuthenticationError, PermissionDeniedError
from api.settings import ApiSettings

# auto_error=False: our own errors (Anthropic envelope) instead of FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, scheme_name="AdminToken")


def admin_settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


SettingsDep = Annotated[ApiSettings, Depends(admin_settings)]


def require_admin(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Refuse the request unless it carries the configured admin token."""
    expected = settings.admin_token.get_secret_value() if settings.admin_token else ""
    if not expected:
        raise PermissionDeniedError("admin API disabled: set ABL_ADMIN_TOKEN")
    if credentials is None:
        raise AuthenticationError("missing admin token: send Authorization: Bearer <token>")
    if not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise AuthenticationError("invalid admin token")


AdminDep = Depends(require_admin)
"""Router-level guard: `APIRouter(dependencies=[AdminDep])`."""

Admin = Annotated[None, AdminDep]
"""The same guard as a parameter annotation, for a route outside the admin router."""

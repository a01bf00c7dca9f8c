"""The admin API's one credential: `Authorization: Bearer $ABL_ADMIN_TOKEN`."""

import hmac
from typing import Annotated, NoReturn

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.credentials import credential_of, is_inference_credential
from api.errors import AuthenticationError, PermissionDeniedError
from api.settings import ApiSettings

# auto_error=False: our own errors (Anthropic envelope) instead of FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, scheme_name="AdminToken")


def admin_settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


SettingsDep = Annotated[ApiSettings, Depends(admin_settings)]


def require_admin(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Refuse the request unless it carries the configured admin token."""
    expected = settings.admin_token.get_secret_value() if settings.admin_token else ""
    if not expected:
        raise PermissionDeniedError("admin API disabled: set ABL_ADMIN_TOKEN")
    if credentials is None:
        _refuse(request, settings, "missing admin token: send Authorization: Bearer <token>")
    if not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        _refuse(request, settings, "invalid admin token")


async def verify_admin(request: Request) -> None:
    """`require_admin` outside FastAPI's dependencies: api/gate.py runs it on the headers
    before the body is read (a refusal may read the database, hence the thread)."""
    credentials = await _bearer(request)
    await run_in_threadpool(require_admin, request, admin_settings(request), credentials)


def _refuse(request: Request, settings: ApiSettings, message: str) -> NoReturn:
    """403 for valid credentials without the right (an API key, an account JWT), else 401."""
    try:
        credential = credential_of(request)
    except AuthenticationError:
        raise AuthenticationError(message) from None
    if is_inference_credential(settings, credential):
        raise PermissionDeniedError("API keys and account tokens cannot use the admin API")
    raise AuthenticationError(message)


AdminDep = Depends(require_admin)
"""Router-level guard: `APIRouter(dependencies=[AdminDep])`."""

Admin = Annotated[None, AdminDep]
"""The same guard as a parameter annotation, for a route outside the admin router."""

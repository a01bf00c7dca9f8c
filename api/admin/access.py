"""The admin API's credentials: `Authorization: Bearer <token>`, one of the named admin tokens
(ABL_ADMIN_TOKENS, and ABL_ADMIN_TOKEN named "admin"). Wrong tokens are throttled per client
address (api/admin/throttle.py); the name of the token used is what audit rows record."""

import hmac
from dataclasses import dataclass
from typing import Annotated, NoReturn

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.admin.throttle import AdminThrottle
from api.credentials import credential_of, is_inference_credential
from api.errors import AuthenticationError, PermissionDeniedError, request_id_of
from api.settings import ApiSettings

# auto_error=False: our own errors (Anthropic envelope) instead of FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, scheme_name="AdminToken")
# What the throttle counts a request under when the server cannot tell its address.
UNKNOWN_ADDRESS = "unknown"


def admin_settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


SettingsDep = Annotated[ApiSettings, Depends(admin_settings)]


@dataclass(frozen=True)
class AdminIdentity:
    """Who made an admin request: the name of the token, from where, under which request id."""

    name: str
    client_address: str
    request_id: str

    @property
    def created_by(self) -> str:
        """`created_by` of the ledger rows this admin writes."""
        return f"admin:{self.name}"


def matching_name(tokens: dict[str, str], presented: str) -> str | None:
    """The name of the token `presented` is, comparing against every one in constant time."""
    found = None
    for name, token in tokens.items():
        if hmac.compare_digest(presented.encode(), token.encode()):
            found = name
    return found


async def require_admin(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> AdminIdentity:
    """The admin behind the request, or the error that refuses it."""
    tokens = settings.admin_credentials()
    if not tokens:
        raise PermissionDeniedError("admin API disabled: set ABL_ADMIN_TOKEN or ABL_ADMIN_TOKENS")
    throttle: AdminThrottle = request.app.state.admin_throttle
    address = request.client.host if request.client else UNKNOWN_ADDRESS
    failures = await throttle.check(address)
    if credentials is None:
        await _refuse(request, settings, "missing admin token: send Authorization: Bearer <token>")
    name = matching_name(tokens, credentials.credentials)
    if name is None:
        await _refuse(request, settings, "invalid admin token", throttle, address)
    if failures:
        await throttle.succeeded(address)
    return AdminIdentity(name, address, request_id_of(request))


async def verify_admin(request: Request) -> AdminIdentity:
    """`require_admin` outside FastAPI's dependencies: api/gate.py runs it on the headers
    before the body is read."""
    credentials = await _bearer(request)
    return await require_admin(request, admin_settings(request), credentials)


async def _refuse(
    request: Request,
    settings: ApiSettings,
    message: str,
    throttle: AdminThrottle | None = None,
    address: str = UNKNOWN_ADDRESS,
) -> NoReturn:
    """403 for valid credentials without the right (an API key, an account JWT), else 401;
    a wrong token (a guess) counts against the address when `throttle` is given."""
    try:
        credential = credential_of(request)
    except AuthenticationError:
        raise AuthenticationError(message) from None
    if await run_in_threadpool(is_inference_credential, settings, credential):
        raise PermissionDeniedError("API keys and account tokens cannot use the admin API")
    if throttle is not None:
        await throttle.failed(address)
    raise AuthenticationError(message)


AdminDep = Depends(require_admin)
"""Router-level guard: `APIRouter(dependencies=[AdminDep])`."""

Admin = Annotated[AdminIdentity, AdminDep]
"""The admin behind the request, as a parameter (the guard runs once per request)."""

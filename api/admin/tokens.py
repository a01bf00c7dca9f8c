"""Revoking JWTs one by one: `POST /admin/tokens/revoke` puts a token's `jti` on the revocation
list until the token expires; every API replica refuses it from its next request on (the check
is part of the statement that reads the token's account, api/credentials.py)."""

from datetime import UTC, datetime, timedelta

from fastapi import APIRouter
from sqlalchemy import delete, func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from api.admin.access import Admin, AdminDep, SettingsDep
from api.admin.audit import record
from api.admin.jwt_tokens import LEEWAY_SECONDS, VerifiedToken, verify_token
from api.admin.schemas import TokenRevoke, TokenRevoked
from api.errors import AuthenticationError, InvalidRequestError
from api.request_body import BodyRoute
from api.settings import ApiSettings
from db.models import RevokedToken
from db.session import transaction

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep], route_class=BodyRoute)


def _identify(settings: ApiSettings, body: TokenRevoke) -> tuple[str, datetime, str | None]:
    """(revocation id, expiry, account) of what the body names."""
    if body.token is not None:
        try:
            token: VerifiedToken = verify_token(settings, body.token)
        except AuthenticationError as exc:
            raise InvalidRequestError(f"token: nothing to revoke: {exc.message}") from None
        return token.revocation_id, token.expires_at, token.account_id
    assert body.jti is not None
    longest = datetime.now(UTC) + timedelta(seconds=settings.jwt_max_ttl_s)
    return body.jti, body.expires_at or longest, None


@router.post("/tokens/revoke")
def revoke_token(body: TokenRevoke, settings: SettingsDep, admin: Admin) -> TokenRevoked:
    """Refuse a JWT from now on; revoking it again answers the first revocation."""
    jti, expires_at, account_id = _identify(settings, body)
    with transaction(settings.require_database_url()) as session:
        _prune(session)
        session.execute(
            insert(RevokedToken)
            .values(
                jti=jti,
                expires_at=expires_at,
                account_id=account_id,
                reason=body.reason,
                revoked_by=admin.created_by,
            )
            .on_conflict_do_nothing(index_elements=["jti"])
        )
        row = session.get(RevokedToken, jti)
        assert row is not None
        details = {"expires_at": row.expires_at.isoformat(), "reason": body.reason}
        record(session, admin, "token.revoke", jti, details)
        return TokenRevoked(
            jti=row.jti,
            account_id=row.account_id,
            expires_at=row.expires_at,
            revoked_at=row.revoked_at,
            revoked_by=row.revoked_by,
            reason=row.reason,
        )


def _prune(session: Session) -> None:
    """Forget revocations of tokens that have expired anyway (and are refused as expired)."""
    horizon = func.now() - timedelta(seconds=LEEWAY_SECONDS)
    session.execute(delete(RevokedToken).where(RevokedToken.expires_at < horizon))

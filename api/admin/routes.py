"""Admin API: accounts, credits, keys, account JWTs, the ledger, request records, reconcile.

Plain `def` routes: FastAPI runs them in its threadpool, and each one is a single database
transaction (`db.session.transaction`); the `db` functions never commit. Every change is
recorded in the audit log (api/admin/audit.py) in its own transaction, naming the admin token.
"""

from typing import Annotated

from fastapi import APIRouter, Body, Query
from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from api.admin.access import Admin, AdminDep, SettingsDep
from api.admin.audit import record
from api.admin.jwt_tokens import mint_account_token, verify_token
from api.admin.schemas import (
    DEFAULT_PAGE_SIZE,
    AccountCreate,
    AccountOut,
    AccountPage,
    AccountUpdate,
    CreditsAdd,
    CreditsOut,
    KeyCreate,
    KeyCreated,
    KeyList,
    KeyOut,
    KeyRevoked,
    KeyUpdate,
    LedgerEntryOut,
    LedgerPage,
    PageSize,
    RateLimits,
    ReconcileOut,
    RequestOut,
    TokenCreate,
    TokenOut,
)
from api.errors import InvalidRequestError, NotFoundError
from api.request_body import BodyRoute
from db.accounts import create_account, create_api_key, revoke_key
from db.ledger import AccountUnavailable, InsufficientCredits, append_balance_entry
from db.models import Account, ApiKey, LedgerEntry, Request
from db.pages import keyset_page
from db.reconcile import reconcile
from db.session import transaction

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep], route_class=BodyRoute)


def _account(session: Session, account_id: str) -> Account:
    account = session.get(Account, account_id)
    if account is None:
        raise NotFoundError(f"account {account_id!r} not found")
    return account


def _limits(limits: RateLimits | None) -> dict[str, int] | None:
    return (limits.as_column() or None) if limits is not None else None


@router.post("/accounts", status_code=201)
def create_account_route(body: AccountCreate, settings: SettingsDep, admin: Admin) -> AccountOut:
    """A new account; initial credits are a `grant` ledger entry."""
    with transaction(settings.require_database_url()) as session:
        account = create_account(session, body.name, body.credits, created_by=admin.created_by)
        account.rate_limits = _limits(body.rate_limits)
        account.shared_rate_limits = _limits(body.shared_rate_limits)
        session.flush()
        record(session, admin, "account.create", account.id, body.model_dump(mode="json"))
        return AccountOut.of(account)


@router.get("/accounts")
def list_accounts(
    settings: SettingsDep,
    limit: Annotated[PageSize, Query()] = DEFAULT_PAGE_SIZE,
    after_id: Annotated[str | None, Query()] = None,
) -> AccountPage:
    """Accounts, oldest first; pass the previous page's `next_after_id` as `after_id`."""
    with transaction(settings.require_database_url()) as session:
        query = select(Account).order_by(Account.created_at, Account.id)
        if after_id is not None:
            cursor = session.get(Account, after_id)
            if cursor is None:
                raise InvalidRequestError(f"after_id: account {after_id!r} not found")
            query = query.where(
                tuple_(Account.created_at, Account.id) > tuple_(cursor.created_at, cursor.id)
            )
        page = keyset_page(session, query, limit)
        last = page.next_cursor_row
        return AccountPage(
            data=[AccountOut.of(a) for a in page.rows],
            has_more=page.has_more,
            next_after_id=last.id if last is not None else None,
        )


@router.get("/accounts/{account_id}")
def get_account(account_id: str, settings: SettingsDep) -> AccountOut:
    with transaction(settings.require_database_url()) as session:
        return AccountOut.of(_account(session, account_id))


@router.patch("/accounts/{account_id}")
def update_account(
    account_id: str, body: AccountUpdate, settings: SettingsDep, admin: Admin
) -> AccountOut:
    """Rename, disable or enable an account, or set its credentials' default rate limits or
    its shared budget (both apply to existing keys from their next request)."""
    sent = body.model_fields_set
    with transaction(settings.require_database_url()) as session:
        account = _account(session, account_id)
        if body.name is not None:
            account.name = body.name
        if body.disabled is not None:
            account.disabled = body.disabled
        if "rate_limits" in sent:
            account.rate_limits = _limits(body.rate_limits)
        if "shared_rate_limits" in sent:
            account.shared_rate_limits = _limits(body.shared_rate_limits)
        session.flush()
        changes = body.model_dump(mode="json", include=sent)
        record(session, admin, "account.update", account.id, changes)
        return AccountOut.of(account)


@router.post("/accounts/{account_id}/credits")
def add_credits(
    account_id: str, body: CreditsAdd, settings: SettingsDep, admin: Admin
) -> CreditsOut:
    """Positive amounts are a `grant`, negative ones an `adjustment`."""
    kind = "grant" if body.amount > 0 else "adjustment"
    with transaction(settings.require_database_url()) as session:
        try:
            entry = append_balance_entry(
                session,
                account_id,
                kind,
                body.amount,
                reason=body.reason,
                created_by=admin.created_by,
            )
        except AccountUnavailable as exc:
            raise NotFoundError(f"account {account_id!r} not found") from exc
        except InsufficientCredits as exc:
            raise InvalidRequestError(
                f"amount: {body.amount} would take the balance below the reserved credits; "
                f"at most {exc.available} credits can be removed now"
            ) from exc
        account = _account(session, account_id)
        # The balance moved in a Core UPDATE; the identity map may hold the old row.
        session.refresh(account)
        details = {"amount": body.amount, "reason": body.reason, "ledger_entry_id": entry.id}
        record(session, admin, "credits.add", account_id, details)
        out = AccountOut.of(account)
        return CreditsOut(**out.model_dump(), ledger_entry=LedgerEntryOut.model_validate(entry))


@router.post("/accounts/{account_id}/keys", status_code=201)
def create_key(account_id: str, body: KeyCreate, settings: SettingsDep, admin: Admin) -> KeyCreated:
    """A new API key; the plaintext is in this response only. The key stores only the limits
    sent; the others are its account's, read on each request (so they follow the account)."""
    with transaction(settings.require_database_url()) as session:
        account = _account(session, account_id)
        new = create_api_key(
            session,
            account.id,
            name=body.name,
            rate_limits=_limits(body.rate_limits),
            expires_at=body.expires_at,
        )
        key = new.key
        record(session, admin, "key.create", key.id, body.model_dump(mode="json"))
        return KeyCreated(
            id=key.id,
            key=new.plaintext,
            prefix=key.prefix,
            name=key.name,
            account_id=key.account_id,
            rate_limits=key.rate_limits,
            created_at=key.created_at,
            expires_at=key.expires_at,
        )


@router.get("/accounts/{account_id}/keys")
def list_keys(account_id: str, settings: SettingsDep) -> KeyList:
    """All the account's keys, revoked ones included, oldest first; never the secret."""
    with transaction(settings.require_database_url()) as session:
        _account(session, account_id)
        keys = session.scalars(
            select(ApiKey)
            .where(ApiKey.account_id == account_id)
            .order_by(ApiKey.created_at, ApiKey.id)
        )
        return KeyList(data=[KeyOut.model_validate(k) for k in keys])


@router.patch("/keys/{key_id}")
def update_key(key_id: str, body: KeyUpdate, settings: SettingsDep, admin: Admin) -> KeyOut:
    """Rename a key, replace its own rate limits, or change its expiry."""
    sent = body.model_fields_set
    with transaction(settings.require_database_url()) as session:
        key = session.get(ApiKey, key_id)
        if key is None:
            raise NotFoundError(f"key {key_id!r} not found")
        if key.revoked_at is not None:
            raise InvalidRequestError(f"key {key_id!r} is revoked")
        if body.name is not None:
            key.name = body.name
        if "rate_limits" in sent:
            key.rate_limits = _limits(body.rate_limits)
        if "expires_at" in sent:
            key.expires_at = body.expires_at
        session.flush()
        record(session, admin, "key.update", key.id, body.model_dump(mode="json", include=sent))
        return KeyOut.model_validate(key)


@router.delete("/keys/{key_id}")
def revoke_key_route(key_id: str, settings: SettingsDep, admin: Admin) -> KeyRevoked:
    """Revoke a key; revoking it again answers the original revocation time."""
    with transaction(settings.require_database_url()) as session:
        key = revoke_key(session, key_id)
        if key is None:
            raise NotFoundError(f"key {key_id!r} not found")
        assert key.revoked_at is not None
        record(session, admin, "key.revoke", key.id)
        return KeyRevoked(id=key.id, revoked_at=key.revoked_at)


@router.post("/accounts/{account_id}/tokens", status_code=201)
def mint_token(
    account_id: str,
    settings: SettingsDep,
    admin: Admin,
    body: Annotated[TokenCreate | None, Body()] = None,
) -> TokenOut:
    """A JWT whose `sub` is the account, usable as `Authorization: Bearer` on /v1."""
    ttl_seconds = (body or TokenCreate()).ttl_seconds
    if ttl_seconds > settings.jwt_max_ttl_s:
        raise InvalidRequestError(
            f"ttl_seconds: {ttl_seconds} > {settings.jwt_max_ttl_s}, the longest lifetime"
            " a token may have (ABL_JWT_MAX_TTL_S)"
        )
    with transaction(settings.require_database_url()) as session:
        _account(session, account_id)
        token, expires_at = mint_account_token(settings, account_id, ttl_seconds)
        jti = verify_token(settings, token).revocation_id
        details = {"ttl_seconds": ttl_seconds, "expires_at": expires_at.isoformat()}
        record(session, admin, "token.mint", account_id, {**details, "jti": jti})
    return TokenOut(token=token, expires_at=expires_at, account_id=account_id, jti=jti)


@router.get("/accounts/{account_id}/ledger")
def account_ledger(
    account_id: str,
    settings: SettingsDep,
    limit: Annotated[PageSize, Query()] = DEFAULT_PAGE_SIZE,
    before_id: Annotated[int | None, Query(ge=1)] = None,
) -> LedgerPage:
    """Ledger entries, newest first; pass `next_before_id` as `before_id` for older ones."""
    with transaction(settings.require_database_url()) as session:
        _account(session, account_id)
        query = (
            select(LedgerEntry)
            .where(LedgerEntry.account_id == account_id)
            .order_by(LedgerEntry.id.desc())
        )
        if before_id is not None:
            query = query.where(LedgerEntry.id < before_id)
        page = keyset_page(session, query, limit)
        last = page.next_cursor_row
        return LedgerPage(
            data=[LedgerEntryOut.model_validate(e) for e in page.rows],
            has_more=page.has_more,
            next_before_id=last.id if last is not None else None,
        )


@router.get("/requests/{request_id}")
def get_request(request_id: str, settings: SettingsDep) -> RequestOut:
    """The request row as stored, with its reserve/release/charge ledger entries."""
    with transaction(settings.require_database_url()) as session:
        row = session.get(Request, request_id)
        if row is None:
            raise NotFoundError(f"request {request_id!r} not found")
        entries = session.scalars(
            select(LedgerEntry).where(LedgerEntry.request_id == request_id).order_by(LedgerEntry.id)
        )
        return RequestOut.of(row, list(entries))


@router.get("/reconcile")
def reconcile_route(settings: SettingsDep) -> ReconcileOut:
    """Check balances and reserves against the ledger and the open requests, every ledger row
    against the one before it, every request against its ledger rows, and the daily rollup
    against the requests."""
    with transaction(settings.require_database_url()) as session:
        # One snapshot for all four checks: settlements committing meanwhile are either wholly
        # in it or wholly out of it.
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        return ReconcileOut.of(reconcile(session))

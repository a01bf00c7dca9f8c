"""Accounts and API keys. Functions take a session and never commit."""

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Table, bindparam, exists, or_, select, update
from sqlalchemy.orm import Session

from db.ledger import append_balance_entry
from db.models import Account, ApiKey, RevokedToken

KEY_PREFIX = "ak_"
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def public_id(prefix: str, length: int = 24) -> str:
    """A random prefixed id such as acct_3f... (base62)."""
    return prefix + "".join(secrets.choice(_BASE62) for _ in range(length))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_account(
    session: Session, name: str, credits: int = 0, *, created_by: str | None = None
) -> Account:
    account = Account(id=public_id("acct_"), name=name, credit_balance=0, reserved_credits=0)
    session.add(account)
    session.flush()
    if credits:
        append_balance_entry(
            session, account.id, "grant", credits, reason="initial credits", created_by=created_by
        )
        session.refresh(account)
    return account


@dataclass(frozen=True)
class NewKey:
    key: ApiKey
    plaintext: str  # shown once, never stored


def create_api_key(
    session: Session,
    account_id: str,
    *,
    name: str | None = None,
    rate_limits: dict[str, Any] | None = None,
    expires_at: datetime | None = None,
) -> NewKey:
    # 32 random bytes, URL-safe: 43 characters after the prefix.
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=public_id("key_"),
        account_id=account_id,
        name=name,
        key_hash=hash_key(plaintext),
        prefix=plaintext[:10],
        rate_limits=rate_limits,
        expires_at=expires_at,
    )
    session.add(key)
    session.flush()
    return NewKey(key=key, plaintext=plaintext)


_KEYS: Table = ApiKey.__table__  # type: ignore[assignment]
_ACCOUNTS: Table = Account.__table__  # type: ignore[assignment]
# Built once: a request's authentication is one Core statement, no ORM (docs/benchmarks.md).
_FIND_KEY = (
    select(
        _KEYS.c.id,
        _KEYS.c.prefix,
        _KEYS.c.rate_limits,
        _KEYS.c.key_hash,
        _KEYS.c.revoked_at,
        _KEYS.c.expires_at,
        _KEYS.c.last_used_at,
        _ACCOUNTS.c.id.label("account_id"),
        _ACCOUNTS.c.disabled,
        _ACCOUNTS.c.rate_limits.label("account_rate_limits"),
        _ACCOUNTS.c.shared_rate_limits.label("account_shared_limits"),
    )
    .join(_ACCOUNTS, _ACCOUNTS.c.id == _KEYS.c.account_id)
    .where(_KEYS.c.key_hash == bindparam("digest"))
)


@dataclass(frozen=True)
class LiveKey:
    """What authenticating a request needs from a live key and its account."""

    id: str
    prefix: str
    rate_limits: dict[str, Any] | None
    last_used_at: datetime | None
    account_id: str
    account_disabled: bool
    account_rate_limits: dict[str, Any] | None
    account_shared_limits: dict[str, Any] | None


def find_live_key(connection: Session | Connection, plaintext: str) -> LiveKey | None:
    """The live key and its account's state, or None (unknown, revoked or expired)."""
    digest = hash_key(plaintext)
    row = connection.execute(_FIND_KEY, {"digest": digest}).first()
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        return None
    now = datetime.now(UTC)
    if row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now):
        return None
    return LiveKey(
        row.id,
        row.prefix,
        row.rate_limits,
        row.last_used_at,
        row.account_id,
        row.disabled,
        row.account_rate_limits,
        row.account_shared_limits,
    )


_REVOKED: Table = RevokedToken.__table__  # type: ignore[assignment]
# A JWT's account and whether the token is revoked, in one statement (the revocation check
# costs no round trip of its own: docs/access.md).
_FIND_TOKEN_ACCOUNT = select(
    _ACCOUNTS.c.id,
    _ACCOUNTS.c.disabled,
    _ACCOUNTS.c.rate_limits,
    _ACCOUNTS.c.shared_rate_limits,
    exists().where(_REVOKED.c.jti == bindparam("revocation_id")).label("revoked"),
).where(_ACCOUNTS.c.id == bindparam("account_id"))


@dataclass(frozen=True)
class TokenAccount:
    """What authenticating a JWT needs from its account and the revocation list."""

    id: str
    disabled: bool
    rate_limits: dict[str, Any] | None
    shared_limits: dict[str, Any] | None
    revoked: bool


def find_token_account(
    connection: Session | Connection, account_id: str, revocation_id: str
) -> TokenAccount | None:
    """The account a JWT names and whether the token is revoked; None: no such account."""
    params = {"account_id": account_id, "revocation_id": revocation_id}
    row = connection.execute(_FIND_TOKEN_ACCOUNT, params).first()
    if row is None:
        return None
    return TokenAccount(row.id, row.disabled, row.rate_limits, row.shared_rate_limits, row.revoked)


# last_used_at is kept to this precision: a key used within it is not written again, so a
# request's authentication reads only and needs no commit.
TOUCH_PRECISION = timedelta(seconds=60)


def needs_touch(last_used_at: datetime | None, now: datetime) -> bool:
    return last_used_at is None or last_used_at < now - TOUCH_PRECISION


def touch_key(session: Session | Connection, key_id: str) -> None:
    now = datetime.now(UTC)
    session.execute(
        update(_KEYS)
        .where(
            _KEYS.c.id == key_id,
            or_(_KEYS.c.last_used_at.is_(None), _KEYS.c.last_used_at < now - TOUCH_PRECISION),
        )
        .values(last_used_at=now)
    )


def revoke_key(session: Session, key_id: str) -> ApiKey | None:
    key = session.get(ApiKey, key_id)
    if key is not None and key.revoked_at is None:
        key.revoked_at = datetime.now(UTC)
        session.flush()
    return key

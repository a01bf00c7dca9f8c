"""Accounts and API keys. Functions take a session and never commit."""

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from db.ledger import append_balance_entry
from db.models import Account, ApiKey

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


def find_key(session: Session, plaintext: str) -> tuple[ApiKey, Account] | None:
    """The live key and its account, or None (unknown, revoked or expired)."""
    digest = hash_key(plaintext)
    row = session.execute(
        select(ApiKey, Account).join(Account).where(ApiKey.key_hash == digest)
    ).first()
    if row is None:
        return None
    key, account = row
    if not hmac.compare_digest(key.key_hash, digest):
        return None
    now = datetime.now(UTC)
    if key.revoked_at is not None or (key.expires_at is not None and key.expires_at <= now):
        return None
    return key, account


# last_used_at is kept to this precision: within it, the update matches no row, so the
# request's auth transaction writes nothing and commits without waiting for a WAL flush.
TOUCH_PRECISION = timedelta(seconds=60)


def touch_key(session: Session, key_id: str) -> None:
    now = datetime.now(UTC)
    session.execute(
        update(ApiKey)
        .where(
            ApiKey.id == key_id,
            or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - TOUCH_PRECISION),
        )
        .values(last_used_at=now)
    )


def revoke_key(session: Session, key_id: str) -> ApiKey | None:
    key = session.get(ApiKey, key_id)
    if key is not None and key.revoked_at is None:
        key.revoked_at = datetime.now(UTC)
        session.flush()
    return key

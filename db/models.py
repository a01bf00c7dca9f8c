"""ORM models: accounts, API keys, requests, the append-only credit ledger, daily usage,
message batches."""

from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

REQUEST_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
# Kinds that move the balance vs. kinds that move the reserved amount.
BALANCE_KINDS = ("grant", "charge", "refund", "adjustment")
RESERVATION_KINDS = ("reserve", "release")
LEDGER_KINDS = BALANCE_KINDS + RESERVATION_KINDS


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _now() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class Account(Base):
    __tablename__ = "account"
    __table_args__ = (
        CheckConstraint("reserved_credits >= 0", name="reserved_non_negative"),
        CheckConstraint("reserved_credits <= credit_balance", name="reserved_within_balance"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    credit_balance: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    reserved_credits: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    disabled: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    # Per-credential defaults: what each key (and the account's JWTs, together) may use unless
    # the key sets its own; read at request time, so lowering them applies to existing keys.
    rate_limits: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # One budget shared by all the account's credentials (keys and JWTs); NULL: none.
    shared_rate_limits: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _now()


class ApiKey(Base):
    __tablename__ = "api_key"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("account.id"), nullable=False, index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    # SHA-256 of the whole key, hex; the key itself is never stored.
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    prefix: Mapped[str] = mapped_column(String(20), nullable=False)
    # The key's own limits only (fields it overrides); the account's fill the rest per request.
    rate_limits: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _now()
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Request(Base):
    __tablename__ = "request"
    __table_args__ = (
        CheckConstraint(
            "status IN ('queued','running','succeeded','failed','cancelled')", name="status_valid"
        ),
        CheckConstraint("credits_charged <= credits_reserved", name="charge_within_reservation"),
        CheckConstraint("credit_price_usd > 0", name="credit_price_positive"),
        CheckConstraint(
            "cache_read_input_tokens >= 0 AND cache_creation_input_tokens >= 0"
            " AND cache_read_input_tokens + cache_creation_input_tokens <= input_tokens",
            name="cache_tokens_within_input",
        ),
        Index("ix_request_account_id_created_at", "account_id", "created_at"),
        Index(
            "ix_request_open",
            "status",
            "created_at",
            postgresql_where="status IN ('queued','running')",
        ),
        # Usage reports read the partial days at the ends of a range here (docs/billing.md).
        Index("ix_request_created_at", "created_at"),
        Index("ix_request_batch_id", "batch_id", postgresql_where="batch_id IS NOT NULL"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    message_id: Mapped[str] = mapped_column(String(40), nullable=False, unique=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("account.id"), nullable=False)
    api_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_key.id"), index=True)
    model: Mapped[str] = mapped_column(String(256), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    stream: Mapped[bool] = mapped_column(Boolean, nullable=False)
    max_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    input_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    output_tokens: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    # Of the input tokens, those read from the prompt cache and those written to it (the
    # worker's count, set at settlement; revision 0020).
    cache_read_input_tokens: Mapped[int] = mapped_column(
        Integer, nullable=False, default=0, server_default="0"
    )
    cache_creation_input_tokens: Mapped[int] = mapped_column(
        Integer, nullable=False, default=0, server_default="0"
    )
    stop_reason: Mapped[str | None] = mapped_column(String(32))
    stop_sequence: Mapped[str | None] = mapped_column(Text)
    credits_reserved: Mapped[int] = mapped_column(BigInteger, nullable=False)
    credits_charged: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(20, 9), nullable=False, default=Decimal(0))
    # The prices in force at admission, which settlement charges (db/ledger.py): USD per million
    # input / output tokens and USD per credit. NULL only on requests admitted before they were
    # stored (revision 0004). Cache reads and writes cost the input price times their
    # multiplier (the model's, stored at admission); the batch multiplier is room; NULL is 1.
    input_price_per_mtok: Mapped[Decimal | None] = mapped_column(Numeric(20, 9))
    output_price_per_mtok: Mapped[Decimal | None] = mapped_column(Numeric(20, 9))
    credit_price_usd: Mapped[Decimal | None] = mapped_column(Numeric(20, 9))
    cache_read_multiplier: Mapped[Decimal | None] = mapped_column(Numeric(10, 4))
    cache_write_multiplier: Mapped[Decimal | None] = mapped_column(Numeric(10, 4))
    batch_multiplier: Mapped[Decimal | None] = mapped_column(Numeric(10, 4))
    # The Message Batch this request ran an item of (NULL: interactive); no foreign key, so
    # usage by batch outlives the batch's deletion.
    batch_id: Mapped[str | None] = mapped_column(String(40))
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = _now()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class LedgerEntry(Base):
    """Append-only (a trigger refuses UPDATE and DELETE; the application's role may only
    INSERT and SELECT). Balance kinds sum to the balance; reservation kinds sum to the reserve;
    each row's balance_after / reserved_after is the previous row's plus its amount."""

    __tablename__ = "ledger_entry"
    __table_args__ = (
        CheckConstraint(
            "kind IN ('grant','charge','refund','adjustment','reserve','release')",
            name="kind_valid",
        ),
        # One reserve, one charge and one release per request: settlement retried or
        # redelivered can never charge twice.
        Index(
            "uq_ledger_entry_request_id_kind",
            "request_id",
            "kind",
            unique=True,
            postgresql_where="request_id IS NOT NULL",
        ),
        Index("ix_ledger_entry_account_id_id", "account_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("account.id"), nullable=False)
    request_id: Mapped[str | None] = mapped_column(ForeignKey("request.id"))
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    # Signed: credits added to (or, negative, taken from) the balance or the reserve by kind.
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    balance_after: Mapped[int] = mapped_column(BigInteger, nullable=False)
    reserved_after: Mapped[int] = mapped_column(BigInteger, nullable=False)
    reason: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = _now()


class DailyUsage(Base):
    """Settled requests summed per UTC day (of `created_at`), account, key and model.

    `settle_request` adds each request in its settlement's transaction, so these rows always
    equal the sums over the request rows; usage reports read them for whole days.
    """

    __tablename__ = "daily_usage"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("account.id"), primary_key=True)
    # "" for a request authenticated by JWT (no key): a primary key column cannot be NULL.
    api_key_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, nullable=False)
    input_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    output_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    credits_charged: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(20, 9), nullable=False)
    # Of input_tokens, those read from and written to the prompt cache (revision 0020).
    cache_read_input_tokens: Mapped[int] = mapped_column(
        BigInteger, nullable=False, default=0, server_default="0"
    )
    cache_creation_input_tokens: Mapped[int] = mapped_column(
        BigInteger, nullable=False, default=0, server_default="0"
    )


class RevokedToken(Base):
    """A JWT refused before its expiry, by `jti`; kept until the token would have expired."""

    __tablename__ = "revoked_token"

    jti: Mapped[str] = mapped_column(String(200), primary_key=True)
    # When the token expires (its `exp`, or the longest lifetime a token may have when only the
    # jti was given); past it the row may be deleted.
    expires_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, index=True
    )
    account_id: Mapped[str | None] = mapped_column(String(40))
    reason: Mapped[str | None] = mapped_column(Text)
    revoked_by: Mapped[str] = mapped_column(String(200), nullable=False)
    revoked_at: Mapped[datetime] = _now()


class AdminAudit(Base):
    """Append-only record of each change made through the admin API, and by which credential."""

    __tablename__ = "admin_audit"
    __table_args__ = (Index("ix_admin_audit_admin_id", "admin", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    # The name of the admin token used (ABL_ADMIN_TOKENS; ABL_ADMIN_TOKEN is "admin").
    admin: Mapped[str] = mapped_column(String(200), nullable=False)
    # What was done, e.g. account.create, credits.add, key.update, token.revoke.
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    # The id the action was about (an account, key or jti), when there is one.
    target: Mapped[str | None] = mapped_column(String(200), index=True)
    # The request's body as the API understood it, secrets left out.
    details: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    client_address: Mapped[str | None] = mapped_column(String(100))
    request_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = _now()


BATCH_STATUSES = ("in_progress", "canceling", "ended")
# An item is pending (not yet given to a worker), dispatched (a request of it is open), or ended
# with one of Anthropic's four result types.
ITEM_OPEN = ("pending", "dispatched")
ITEM_ENDED = ("succeeded", "errored", "canceled", "expired")


class MessageBatch(Base):
    """A Message Batch (Anthropic's batch API): its requests are `BatchRequest` rows."""

    __tablename__ = "message_batch"
    __table_args__ = (
        CheckConstraint(
            "processing_status IN ('in_progress','canceling','ended')",
            name="processing_status_valid",
        ),
        Index("ix_message_batch_account_id_created_at", "account_id", "created_at", "id"),
        Index(
            "ix_message_batch_open",
            "processing_status",
            postgresql_where="processing_status <> 'ended'",
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # msgbatch_...
    account_id: Mapped[str] = mapped_column(ForeignKey("account.id"), nullable=False)
    api_key_id: Mapped[str | None] = mapped_column(String(40))
    processing_status: Mapped[str] = mapped_column(String(16), nullable=False)
    request_count: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = _now()
    # Items not ended by then end `expired` (ABL_BATCH_EXPIRY_S after creation).
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_initiated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Results dropped (ABL_BATCH_RETENTION_S after it ended); the counts stay.
    archived_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class BatchRequest(Base):
    """One request of a batch: its params, the request running it, then its result."""

    __tablename__ = "batch_request"
    __table_args__ = (
        CheckConstraint(
            "status IN ('pending','dispatched','succeeded','errored','canceled','expired')",
            name="status_valid",
        ),
        Index(
            "ix_batch_request_open",
            "status",
            "model",
            "batch_id",
            "position",
            postgresql_where="status IN ('pending','dispatched')",
        ),
        Index(
            "ix_batch_request_request_id",
            "request_id",
            unique=True,
            postgresql_where="request_id IS NOT NULL",
        ),
        UniqueConstraint("batch_id", "custom_id", name="uq_batch_request_batch_id_custom_id"),
    )

    batch_id: Mapped[str] = mapped_column(
        ForeignKey("message_batch.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)  # order in the batch
    custom_id: Mapped[str] = mapped_column(String(64), nullable=False)
    # The params' model as the client wrote it (dispatch goes model by model); NULL: none.
    model: Mapped[str | None] = mapped_column(String(256))
    # The Messages request as sent (JSON text: jsonb refuses \u0000); NULL once archived.
    params: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    # The request (row of `request`) of the current or last attempt.
    request_id: Mapped[str | None] = mapped_column(String(40))
    # Attempts whose worker died (or that failed on the platform's side) before this one.
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    # JSON text. succeeded: the worker's events of the answer (api/anthropic/batches.py
    # builds the Message); errored: {"type", "message"}; NULL otherwise, and once archived.
    result: Mapped[str | None] = mapped_column(Text)
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

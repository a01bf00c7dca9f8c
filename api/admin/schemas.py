"""Request and response bodies of the admin API (ours, not Anthropic's wire format)."""

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from db.models import Account, LedgerEntry, Request
from db.reconcile import Reconciliation

# The ledger's columns are BIGINT; anything near that is a typo, not a grant.
MAX_CREDIT_AMOUNT = 10**15
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

Name = Annotated[str, Field(min_length=1, max_length=200)]
Reason = Annotated[str, Field(min_length=1, max_length=2000)]
PageSize = Annotated[int, Field(ge=1, le=MAX_PAGE_SIZE)]


class _Body(BaseModel):
    """Request bodies refuse unknown fields: a misspelt limit must not pass silently."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class RateLimits(_Body):
    """Rate limits; a field left out is not set here (for a key: its account's value applies;
    for an account's shared budget: that kind is not limited by it)."""

    requests_per_minute: int | None = Field(default=None, gt=0)
    input_tokens_per_minute: int | None = Field(default=None, gt=0)
    output_tokens_per_minute: int | None = Field(default=None, gt=0)
    concurrent_requests: int | None = Field(default=None, gt=0)

    def as_column(self) -> dict[str, int]:
        """The JSONB value stored on the row: only the limits that are set."""
        return self.model_dump(exclude_none=True)


class AccountCreate(_Body):
    name: Name
    credits: int = Field(default=0, ge=0, le=MAX_CREDIT_AMOUNT)
    # Each credential's defaults (a key's own values override them field by field).
    rate_limits: RateLimits | None = None
    # One budget all the account's keys and JWTs spend from together, on top of their own.
    shared_rate_limits: RateLimits | None = None


class AccountUpdate(_Body):
    """Only the fields sent change; `rate_limits: null` clears the account's defaults and
    `shared_rate_limits: null` its shared budget."""

    name: Name | None = None
    disabled: bool | None = None
    rate_limits: RateLimits | None = None
    shared_rate_limits: RateLimits | None = None


class CreditsAdd(_Body):
    amount: int = Field(ge=-MAX_CREDIT_AMOUNT, le=MAX_CREDIT_AMOUNT)
    reason: Reason | None = None

    @field_validator("amount")
    @classmethod
    def _non_zero(cls, value: int) -> int:
        if value == 0:
            raise PydanticCustomError("value_error", "must not be zero")
        return value


class KeyCreate(_Body):
    name: Name | None = None
    rate_limits: RateLimits | None = None
    expires_at: AwareDatetime | None = None

    @field_validator("expires_at")
    @classmethod
    def _in_future(cls, value: datetime | None) -> datetime | None:
        if value is not None and value <= datetime.now(UTC):
            raise PydanticCustomError("value_error", "must be in the future")
        return value


class KeyUpdate(_Body):
    """Only the fields sent change. `rate_limits` replaces the key's own limits (null: none, so
    its account's apply); `expires_at: null` makes it never expire."""

    name: Name | None = None
    rate_limits: RateLimits | None = None
    expires_at: AwareDatetime | None = None

    @field_validator("expires_at")
    @classmethod
    def _in_future(cls, value: datetime | None) -> datetime | None:
        if value is not None and value <= datetime.now(UTC):
            raise PydanticCustomError("value_error", "must be in the future")
        return value


class TokenCreate(_Body):
    ttl_seconds: int = Field(default=3600, ge=1, le=86_400)


class TokenRevoke(_Body):
    """The token itself, or its `jti` (with its expiry when known)."""

    jti: str | None = Field(default=None, min_length=1, max_length=200)
    token: str | None = Field(default=None, min_length=1)
    expires_at: AwareDatetime | None = Field(
        default=None,
        description="with jti: when the token expires; default: the longest a token may live",
    )
    reason: Reason | None = None

    @model_validator(mode="after")
    def _one_of(self) -> "TokenRevoke":
        if (self.jti is None) == (self.token is None):
            raise ValueError("send exactly one of jti and token")
        if self.token is not None and self.expires_at is not None:
            raise ValueError("expires_at goes with jti; a token carries its own")
        return self


class TokenRevoked(BaseModel):
    jti: str
    account_id: str | None
    expires_at: datetime
    revoked_at: datetime
    revoked_by: str
    reason: str | None


class AccountOut(BaseModel):
    id: str
    name: str
    credits: int
    reserved_credits: int
    available_credits: int
    disabled: bool
    created_at: datetime
    rate_limits: dict[str, Any] | None
    shared_rate_limits: dict[str, Any] | None

    @classmethod
    def of(cls, account: Account) -> "AccountOut":
        return cls(
            id=account.id,
            name=account.name,
            credits=account.credit_balance,
            reserved_credits=account.reserved_credits,
            available_credits=account.credit_balance - account.reserved_credits,
            disabled=account.disabled,
            created_at=account.created_at,
            rate_limits=account.rate_limits,
            shared_rate_limits=account.shared_rate_limits,
        )


class AccountPage(BaseModel):
    data: list[AccountOut]
    has_more: bool
    next_after_id: str | None


class LedgerEntryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    account_id: str
    kind: str
    amount: int
    balance_after: int
    reserved_after: int
    request_id: str | None
    reason: str | None
    created_by: str | None
    created_at: datetime


class LedgerPage(BaseModel):
    data: list[LedgerEntryOut]
    has_more: bool
    next_before_id: int | None


class CreditsOut(AccountOut):
    """The account after the movement, and the ledger row that made it."""

    ledger_entry: LedgerEntryOut


class KeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    prefix: str
    name: str | None
    account_id: str
    rate_limits: dict[str, Any] | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class KeyCreated(BaseModel):
    id: str
    key: str = Field(description="The secret, shown once; only its hash is stored.")
    prefix: str
    name: str | None
    account_id: str
    rate_limits: dict[str, Any] | None
    created_at: datetime
    expires_at: datetime | None


class KeyList(BaseModel):
    data: list[KeyOut]


class KeyRevoked(BaseModel):
    id: str
    revoked_at: datetime


class TokenOut(BaseModel):
    token: str
    expires_at: datetime
    account_id: str
    jti: str = Field(description="What POST /admin/tokens/revoke takes to revoke this token.")


class RequestOut(BaseModel):
    """Every column of the request row, and the ledger rows it caused (oldest first)."""

    id: str
    message_id: str
    account_id: str
    api_key_id: str | None
    model: str
    status: str
    stream: bool
    max_tokens: int
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    stop_reason: str | None
    stop_sequence: str | None
    credits_reserved: int
    credits_charged: int
    # Serialised as a string: money never passes through a float.
    cost_usd: Decimal
    error: str | None
    worker: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    ledger_entries: list[LedgerEntryOut]

    @field_serializer("cost_usd")
    def _plain_decimal(self, value: Decimal) -> str:
        # NUMERIC(20, 9) reads back as 0E-9 or 0.000850000; answer 0 and 0.00085.
        return format(value.normalize(), "f")

    @classmethod
    def of(cls, row: Request, entries: list[LedgerEntry]) -> "RequestOut":
        columns = {c.key: getattr(row, c.key) for c in Request.__mapper__.column_attrs}
        return cls(**columns, ledger_entries=[LedgerEntryOut.model_validate(e) for e in entries])


class DiscrepancyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    account_id: str
    balance: int
    ledger_balance: int
    reserved: int
    ledger_reserved: int
    open_reservations: int


class ChainBreakOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    account_id: str
    entry_id: int
    kind: str
    amount: int
    balance_after: int
    expected_balance_after: int
    reserved_after: int
    expected_reserved_after: int


class RequestMismatchOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    request_id: str
    account_id: str
    status: str
    credits_reserved: int
    credits_charged: int
    reserve_amount: int | None
    release_amount: int | None
    charge_amount: int | None


class UsageMismatchOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    source: str = Field(description="requests: the sums over the requests; rollup: as stored")
    day: str
    account_id: str
    api_key_id: str
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    credits_charged: int
    cost_usd: str
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


class ReconcileOut(BaseModel):
    """Every check of db/reconcile.py; each list holds at most 1000 findings."""

    ok: bool
    accounts_checked: int
    # Balances and reserves against the ledger's sums and the open requests.
    discrepancies: list[DiscrepancyOut]
    # Ledger rows whose running totals do not follow from the row before.
    chain_breaks: list[ChainBreakOut]
    # Requests whose reserve, release or charge row disagrees with the request.
    request_mismatches: list[RequestMismatchOut]
    # daily_usage rows that differ from the sums over the requests.
    usage_mismatches: list[UsageMismatchOut]

    @classmethod
    def of(cls, report: Reconciliation) -> "ReconcileOut":
        return cls(
            ok=report.ok,
            accounts_checked=report.accounts_checked,
            discrepancies=[DiscrepancyOut.model_validate(d) for d in report.balances],
            chain_breaks=[ChainBreakOut.model_validate(c) for c in report.chain_breaks],
            request_mismatches=[
                RequestMismatchOut.model_validate(r) for r in report.request_mismatches
            ],
            usage_mismatches=[UsageMismatchOut.model_validate(u) for u in report.usage_mismatches],
        )

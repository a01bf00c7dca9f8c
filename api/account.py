"""`GET /v1/account`: the caller's own credits. An API key or an account JWT sees its account
and no other: the account comes from the credential, never from the request."""

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.credentials import PrincipalDep
from api.deps import PlatformDep
from api.errors import NotFoundError
from db.models import Account
from db.session import transaction

router = APIRouter(tags=["account"])


class AccountBalance(BaseModel):
    type: Literal["account"] = "account"
    id: str
    name: str
    credits: int = Field(description="The balance: every grant minus every charge.")
    reserved_credits: int = Field(description="Held for requests in flight (their worst case).")
    available_credits: int = Field(description="What a new request can reserve: credits - held.")
    credit_price_usd: str
    api_key_id: str | None = Field(description="The key that asked; null for a JWT.")


@router.get("/v1/account")
def get_account(principal: PrincipalDep, platform: PlatformDep) -> AccountBalance:
    """The authenticated account's balance, reserved and available credits."""
    with transaction(platform.database_url) as session:
        account = session.get(Account, principal.account_id)
        if account is None:
            raise NotFoundError("account not found")
        return AccountBalance(
            id=account.id,
            name=account.name,
            credits=account.credit_balance,
            reserved_credits=account.reserved_credits,
            available_credits=account.credit_balance - account.reserved_credits,
            credit_price_usd=platform.settings.credit_price_usd,
            api_key_id=principal.api_key_id,
        )

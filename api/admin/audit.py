"""The admin audit log: every change made through the admin API, and which admin token made it.

`record` adds a row in the caller's transaction, so a change and its audit row commit together
or not at all. `GET /admin/audit` pages through them, newest first.
"""

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.admin.access import AdminDep, AdminIdentity, SettingsDep
from api.admin.schemas import DEFAULT_PAGE_SIZE, PageSize
from api.request_body import BodyRoute
from db.models import AdminAudit
from db.pages import keyset_page
from db.session import transaction

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep], route_class=BodyRoute)


def record(
    session: Session,
    admin: AdminIdentity,
    action: str,
    target: str | None,
    details: dict[str, Any] | None = None,
) -> None:
    """One audit row for a change made in `session`'s transaction (never a secret in it)."""
    session.add(
        AdminAudit(
            admin=admin.name,
            action=action,
            target=target,
            details=details,
            client_address=admin.client_address,
            request_id=admin.request_id,
        )
    )


class AuditOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    admin: str
    action: str
    target: str | None
    details: dict[str, Any] | None
    client_address: str | None
    request_id: str | None
    created_at: datetime


class AuditPage(BaseModel):
    data: list[AuditOut]
    has_more: bool
    next_before_id: int | None


@router.get("/audit")
def audit_log(
    settings: SettingsDep,
    admin: Annotated[str | None, Query(description="name of the admin token")] = None,
    action: Annotated[str | None, Query(description="e.g. credits.add, key.update")] = None,
    target: Annotated[str | None, Query(description="account, key or token id")] = None,
    since: Annotated[datetime | None, Query()] = None,
    until: Annotated[datetime | None, Query()] = None,
    limit: Annotated[PageSize, Query()] = DEFAULT_PAGE_SIZE,
    before_id: Annotated[int | None, Query(ge=1)] = None,
) -> AuditPage:
    """Admin actions, newest first; pass `next_before_id` as `before_id` for older ones."""
    with transaction(settings.require_database_url()) as session:
        rows = select(AdminAudit).order_by(AdminAudit.id.desc())
        for column, value in (
            (AdminAudit.admin, admin),
            (AdminAudit.action, action),
            (AdminAudit.target, target),
        ):
            if value is not None:
                rows = rows.where(column == value)
        if since is not None:
            rows = rows.where(AdminAudit.created_at >= since)
        if until is not None:
            rows = rows.where(AdminAudit.created_at < until)
        if before_id is not None:
            rows = rows.where(AdminAudit.id < before_id)
        page = keyset_page(session, rows, limit)
        last = page.next_cursor_row
        return AuditPage(
            data=[AuditOut.model_validate(row) for row in page.rows],
            has_more=page.has_more,
            next_before_id=last.id if last is not None else None,
        )

"""admin audit log

`admin_audit`: one row per change made through the admin API, naming the admin credential that
made it. Append-only like the ledger: the application's role may only INSERT and SELECT, and
the trigger of revision 0003 refuses UPDATE and DELETE.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27 09:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "admin_audit",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("admin", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=200), nullable=True),
        sa.Column("details", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("client_address", sa.String(length=100), nullable=True),
        sa.Column("request_id", sa.String(length=40), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_admin_audit")),
    )
    op.create_index("ix_admin_audit_admin_id", "admin_audit", ["admin", "id"], unique=False)
    op.create_index(op.f("ix_admin_audit_target"), "admin_audit", ["target"], unique=False)
    op.execute("REVOKE UPDATE ON admin_audit FROM abl_app")
    op.execute(
        "CREATE TRIGGER admin_audit_append_only BEFORE UPDATE OR DELETE ON admin_audit"
        " FOR EACH ROW EXECUTE FUNCTION refuse_change()"
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_admin_audit_target"), table_name="admin_audit")
    op.drop_index("ix_admin_audit_admin_id", table_name="admin_audit")
    op.drop_table("admin_audit")

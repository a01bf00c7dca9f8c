"""an account-wide budget shared by all its credentials

`account.shared_rate_limits` (same fields as `rate_limits`; NULL: none) is one budget that every
key and JWT of the account spends from together, on top of each credential's own.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 09:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "account",
        sa.Column("shared_rate_limits", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("account", "shared_rate_limits")

"""usage report index and statistics

A covering index on request.created_at lets a usage report over a time range read the index
alone (index-only scan); the ndistinct statistics on its grouping columns let the planner
size the hash aggregate right (it otherwise expects one group per row and sorts instead).
Measured in docs/billing.md.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 19:10:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The expression must match db.usage's day column exactly for the planner to use the statistics.
USAGE_STATISTICS = (
    "CREATE STATISTICS st_request_usage (ndistinct) "
    "ON account_id, api_key_id, model, (CAST(timezone('UTC', created_at) AS date)) "
    "FROM request"
)


def upgrade() -> None:
    op.create_index(
        "ix_request_created_at_usage",
        "request",
        ["created_at"],
        unique=False,
        postgresql_include=[
            "account_id",
            "api_key_id",
            "model",
            "status",
            "input_tokens",
            "output_tokens",
            "credits_charged",
            "cost_usd",
        ],
    )
    op.execute(USAGE_STATISTICS)
    op.execute("ANALYZE request")


def downgrade() -> None:
    op.execute("DROP STATISTICS IF EXISTS st_request_usage")
    op.drop_index("ix_request_created_at_usage", table_name="request")

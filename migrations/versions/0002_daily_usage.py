"""daily usage rollup

`daily_usage` holds settled requests summed per UTC day, account, key and model; from now on
`settle_request` adds each request to it in the settlement's transaction. The usage reports
read it for whole days and read `request` (by the new created_at index) only for the partial
days at the ends of a range. Measured in docs/billing.md. Backfilled from the settled requests.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 19:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The same sums settle_request keeps (db/ledger.py, _SETTLE), for the requests settled so far.
BACKFILL = """
INSERT INTO daily_usage (day, account_id, api_key_id, model, requests, input_tokens,
    output_tokens, credits_charged, cost_usd)
SELECT CAST(timezone('UTC', created_at) AS date), account_id, coalesce(api_key_id, ''), model,
    count(*), sum(input_tokens), sum(output_tokens), sum(credits_charged), sum(cost_usd)
FROM request
WHERE status IN ('succeeded', 'failed', 'cancelled')
GROUP BY 1, 2, 3, 4
"""


def upgrade() -> None:
    op.create_table(
        "daily_usage",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("api_key_id", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("credits_charged", sa.BigInteger(), nullable=False),
        sa.Column("cost_usd", sa.Numeric(precision=20, scale=9), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["account.id"], name=op.f("fk_daily_usage_account_id_account")
        ),
        sa.PrimaryKeyConstraint(
            "day", "account_id", "api_key_id", "model", name=op.f("pk_daily_usage")
        ),
    )
    op.create_index("ix_request_created_at", "request", ["created_at"], unique=False)
    op.execute(BACKFILL)


def downgrade() -> None:
    op.drop_index("ix_request_created_at", table_name="request")
    op.drop_table("daily_usage")

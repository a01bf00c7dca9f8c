"""prompt cache usage on requests and daily usage

A request's prompt tokens read from the prompt cache and written to it (issue 17), counted on
its row and summed into its day's `daily_usage` row by the settlement. `request.input_tokens`
stays the whole prompt; the rest (uncached) is input_tokens minus both. The prices of cache
reads and writes are the multipliers of revision 0004 (of the input price), stored at admission.

Revision ID: 0020
Revises: 0009
Create Date: 2026-12-02 10:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("cache_read_input_tokens", "cache_creation_input_tokens")


def upgrade() -> None:
    for name in COLUMNS:
        op.add_column("request", sa.Column(name, sa.Integer(), nullable=False, server_default="0"))
        op.add_column(
            "daily_usage", sa.Column(name, sa.BigInteger(), nullable=False, server_default="0")
        )
    op.create_check_constraint(
        op.f("ck_request_cache_tokens_within_input"),
        "request",
        "cache_read_input_tokens >= 0 AND cache_creation_input_tokens >= 0"
        " AND cache_read_input_tokens + cache_creation_input_tokens <= input_tokens",
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_request_cache_tokens_within_input"), "request", type_="check")
    for name in reversed(COLUMNS):
        op.drop_column("daily_usage", name)
        op.drop_column("request", name)

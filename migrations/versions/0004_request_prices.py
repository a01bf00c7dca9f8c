"""prices on the request row

The prices in force when a request is admitted (USD per million input and output tokens, USD per
credit) are stored on its row, and its settlement charges them, whatever catalogue or credit
price the settling worker has. The multipliers are room for cache and batch pricing (NULL: 1).
Rows admitted before this revision keep NULL prices; one still open when the new code settles it
is charged at the settling worker's prices, as before, and never more than its hold.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 09:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PRICES = ("input_price_per_mtok", "output_price_per_mtok", "credit_price_usd")
MULTIPLIERS = ("cache_read_multiplier", "cache_write_multiplier", "batch_multiplier")


def upgrade() -> None:
    for name in PRICES:
        op.add_column("request", sa.Column(name, sa.Numeric(precision=20, scale=9), nullable=True))
    for name in MULTIPLIERS:
        op.add_column("request", sa.Column(name, sa.Numeric(precision=10, scale=4), nullable=True))
    op.create_check_constraint(
        op.f("ck_request_credit_price_positive"), "request", "credit_price_usd > 0"
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_request_credit_price_positive"), "request", type_="check")
    for name in (*MULTIPLIERS, *PRICES):
        op.drop_column("request", name)

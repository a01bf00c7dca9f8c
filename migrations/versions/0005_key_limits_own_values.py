"""keys keep only their own rate limits

Until now creating a key copied its account's limits into the key's row, so lowering the
account's limits later changed nothing for its existing keys. From now on a key stores only the
limits it sets itself, and the account's fill the rest at request time. This revision removes,
from every key, each limit equal to its account's limit of the same name. An explicit key limit
that happened to equal the account's is removed too: the key then follows its account's value,
which is the same today but will move with the account from now on.

Downgrade copies the account's current limits back under each key's own (the old shape).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 09:20:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CLEAR_COPIES = """
UPDATE api_key AS k
SET rate_limits = (
    SELECT nullif(coalesce(jsonb_object_agg(own.key, own.value), '{}'::jsonb), '{}'::jsonb)
    FROM jsonb_each(k.rate_limits) AS own
    WHERE (a.rate_limits -> own.key) IS DISTINCT FROM own.value
)
FROM account AS a
WHERE a.id = k.account_id AND k.rate_limits IS NOT NULL AND a.rate_limits IS NOT NULL
"""
COPY_BACK = """
UPDATE api_key AS k
SET rate_limits = a.rate_limits || coalesce(k.rate_limits, '{}'::jsonb)
FROM account AS a
WHERE a.id = k.account_id AND a.rate_limits IS NOT NULL AND a.rate_limits <> '{}'::jsonb
"""


def upgrade() -> None:
    op.execute(CLEAR_COPIES)


def downgrade() -> None:
    op.execute(COPY_BACK)

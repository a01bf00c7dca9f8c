"""message batches

`message_batch`: one row per Message Batch (Anthropic's batch API); `batch_request`: one row per
request in it, its params kept until the batch is archived, its outcome written in the same
transaction as the settlement of the request that ran it (db/batch_steps.py). Params and results
are JSON text, not jsonb: a client's JSON may hold a NUL character (\u0000), which jsonb
refuses. `request.batch_id` says which batch a request ran for (NULL: interactive); no foreign
key, so usage by batch survives the batch's deletion. The application's role may delete
batches (DELETE endpoint).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 10:40:00.000000
"""

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _at(name: str, nullable: bool = True) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "message_batch",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("api_key_id", sa.String(length=40), nullable=True),
        sa.Column("processing_status", sa.String(length=16), nullable=False),
        sa.Column("request_count", sa.Integer(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        _at("expires_at", nullable=False),
        _at("ended_at"),
        _at("cancel_initiated_at"),
        _at("archived_at"),
        sa.CheckConstraint(
            "processing_status IN ('in_progress','canceling','ended')",
            name=op.f("ck_message_batch_processing_status_valid"),
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["account.id"], name=op.f("fk_message_batch_account_id_account")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_message_batch")),
    )
    op.create_index(
        "ix_message_batch_account_id_created_at",
        "message_batch",
        ["account_id", "created_at", "id"],
        unique=False,
    )
    op.create_index(
        "ix_message_batch_open",
        "message_batch",
        ["processing_status"],
        unique=False,
        postgresql_where=sa.text("processing_status <> 'ended'"),
    )
    op.create_table(
        "batch_request",
        sa.Column("batch_id", sa.String(length=40), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("custom_id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=True),
        sa.Column("params", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("request_id", sa.String(length=40), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("result", sa.Text(), nullable=True),
        _at("dispatched_at"),
        _at("ended_at"),
        sa.CheckConstraint(
            "status IN ('pending','dispatched','succeeded','errored','canceled','expired')",
            name=op.f("ck_batch_request_status_valid"),
        ),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["message_batch.id"],
            name=op.f("fk_batch_request_batch_id_message_batch"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("batch_id", "position", name=op.f("pk_batch_request")),
        sa.UniqueConstraint("batch_id", "custom_id", name="uq_batch_request_batch_id_custom_id"),
    )
    op.create_index(
        "ix_batch_request_open",
        "batch_request",
        ["status", "model", "batch_id", "position"],
        unique=False,
        postgresql_where=sa.text("status IN ('pending','dispatched')"),
    )
    op.create_index(
        "ix_batch_request_request_id",
        "batch_request",
        ["request_id"],
        unique=True,
        postgresql_where=sa.text("request_id IS NOT NULL"),
    )
    op.add_column("request", sa.Column("batch_id", sa.String(length=40), nullable=True))
    op.create_index(
        "ix_request_batch_id",
        "request",
        ["batch_id"],
        unique=False,
        postgresql_where=sa.text("batch_id IS NOT NULL"),
    )
    op.execute("GRANT DELETE ON message_batch, batch_request TO abl_app")


def downgrade() -> None:
    op.drop_index("ix_request_batch_id", table_name="request")
    op.drop_column("request", "batch_id")
    op.drop_index("ix_batch_request_request_id", table_name="batch_request")
    op.drop_index("ix_batch_request_open", table_name="batch_request")
    op.drop_table("batch_request")
    op.drop_index("ix_message_batch_open", table_name="message_batch")
    op.drop_index("ix_message_batch_account_id_created_at", table_name="message_batch")
    op.drop_table("message_batch")

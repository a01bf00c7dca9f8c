"""the application's role, and an append-only ledger

The application connects as a role that owns nothing: `abl_app` (a group role; the login role of
ABL_DATABASE_URL is `abl_app` itself or a member of it). It may SELECT, INSERT and UPDATE the
tables it writes, only SELECT and INSERT ledger rows, and use the sequences; default privileges
give it the same on tables that later revisions create (as this owner role: migrations must keep
running as the same role). A trigger refuses UPDATE and DELETE of ledger rows to everyone, the
owner included; TRUNCATE (the owner's, for tests) is not a row operation and still works.

The role is created here when it is missing and the migrating role may create roles; otherwise
this revision stops and says what to run. Downgrade revokes the privileges and drops the
trigger; it leaves the role, which belongs to the whole server (other databases may use it).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 09:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ENSURE_ROLE = """
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'abl_app') THEN
        BEGIN
            CREATE ROLE abl_app NOLOGIN;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE EXCEPTION 'role abl_app does not exist and % may not create it', current_user
                USING HINT = 'as a superuser: CREATE ROLE abl_app NOLOGIN; GRANT abl_app TO '
                    '<the user of ABL_DATABASE_URL>; then migrate again';
        END;
    END IF;
END
$$
"""
# Written by the application; ledger_entry is only ever appended to.
WRITTEN = ("account", "api_key", "request", "daily_usage")
REFUSE_CHANGE = """
CREATE FUNCTION refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$
"""


def upgrade() -> None:
    op.execute(ENSURE_ROLE)
    op.execute(f"GRANT SELECT, INSERT, UPDATE ON {', '.join(WRITTEN)} TO abl_app")
    op.execute("GRANT SELECT, INSERT ON ledger_entry TO abl_app")
    op.execute("GRANT USAGE, SELECT ON SEQUENCE ledger_entry_id_seq TO abl_app")
    op.execute("ALTER DEFAULT PRIVILEGES GRANT SELECT, INSERT, UPDATE ON TABLES TO abl_app")
    op.execute("ALTER DEFAULT PRIVILEGES GRANT USAGE, SELECT ON SEQUENCES TO abl_app")
    op.execute(REFUSE_CHANGE)
    op.execute(
        "CREATE TRIGGER ledger_entry_append_only BEFORE UPDATE OR DELETE ON ledger_entry"
        " FOR EACH ROW EXECUTE FUNCTION refuse_change()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER ledger_entry_append_only ON ledger_entry")
    op.execute("DROP FUNCTION refuse_change()")
    op.execute("ALTER DEFAULT PRIVILEGES REVOKE USAGE, SELECT ON SEQUENCES FROM abl_app")
    op.execute("ALTER DEFAULT PRIVILEGES REVOKE SELECT, INSERT, UPDATE ON TABLES FROM abl_app")
    op.execute("REVOKE ALL ON SEQUENCE ledger_entry_id_seq FROM abl_app")
    op.execute(f"REVOKE ALL ON {', '.join(WRITTEN)}, ledger_entry FROM abl_app")

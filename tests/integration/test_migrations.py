"""The Alembic revisions upgrade and downgrade cleanly and match the ORM models."""

import json

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, text

from db.migrate import downgrade, upgrade
from db.models import Base


def test_upgrade_downgrade_upgrade(scratch_database: str) -> None:
    upgrade(scratch_database)
    engine = create_engine(scratch_database)
    try:
        tables = set(inspect(engine).get_table_names())
        assert {"account", "api_key", "request", "ledger_entry"} <= tables
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        downgrade(scratch_database)
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(scratch_database)
        assert "ledger_entry" in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_keys_lose_the_limits_copied_from_their_account(scratch_database: str) -> None:
    """Revision 0005: a key keeps only the limits that differ from its account's."""
    upgrade(scratch_database, "0004")
    engine = create_engine(scratch_database)
    account = {"requests_per_minute": 10, "input_tokens_per_minute": 100}
    keys = {
        "key_copied": account,
        "key_override": {**account, "requests_per_minute": 50},
        "key_own": {"concurrent_requests": 3},
        "key_none": None,
    }
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO account (id, name, credit_balance, reserved_credits, disabled,"
                    " rate_limits) VALUES ('acct_m', 'm', 0, 0, false, CAST(:limits AS jsonb))"
                ),
                {"limits": json.dumps(account)},
            )
            for key_id, limits in keys.items():
                conn.execute(
                    text(
                        "INSERT INTO api_key (id, account_id, key_hash, prefix, rate_limits)"
                        " VALUES (:id, 'acct_m', :id, 'ak_', CAST(:limits AS jsonb))"
                    ),
                    {"id": key_id, "limits": None if limits is None else json.dumps(limits)},
                )
        upgrade(scratch_database, "0005")
        assert _key_limits(engine) == {
            "key_copied": None,
            "key_override": {"requests_per_minute": 50},
            "key_own": {"concurrent_requests": 3},
            "key_none": None,
        }
        downgrade(scratch_database, "0004")
        assert _key_limits(engine) == {
            "key_copied": account,
            "key_override": {**account, "requests_per_minute": 50},
            "key_own": {**account, "concurrent_requests": 3},
            "key_none": account,
        }
    finally:
        engine.dispose()


def _key_limits(engine: Engine) -> dict[str, object]:
    with engine.connect() as conn:
        return {row.id: row.rate_limits for row in conn.execute(text("SELECT * FROM api_key"))}

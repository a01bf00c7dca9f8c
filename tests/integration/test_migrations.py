"""The Alembic revision upgrades and downgrades cleanly and matches the ORM models."""

import uuid

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import make_url

from db.migrate import downgrade, upgrade
from db.models import Base
from infra.launcher.stack import Stack


@pytest.fixture
def scratch_database(stack: Stack):
    assert stack.database_url is not None
    url = make_url(stack.database_url)
    name = f"abl_migrate_{uuid.uuid4().hex[:8]}"
    admin_dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield url.set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


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

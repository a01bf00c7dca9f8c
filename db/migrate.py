"""Apply or roll back the Alembic migrations in migrations/ programmatically."""

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url

from db.roles import ensure_app_login, warn_unrestricted

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: a literal % in the URL must be doubled.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)


def migrate(database_url: str, migration_database_url: str | None) -> None:
    """Upgrade to head as the owner role (ABL_MIGRATION_DATABASE_URL), after making sure the
    application's role (ABL_DATABASE_URL) can log in as a member of `abl_app`. Without an owner
    URL the application's own role migrates, with a warning: it then owns the tables."""
    if migration_database_url is None:
        warn_unrestricted(make_url(database_url).username)
        upgrade(database_url)
        return
    ensure_app_login(migration_database_url, database_url)
    upgrade(migration_database_url)

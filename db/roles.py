"""The database roles: the owner that migrates, and the application's role that owns nothing.

`abl_app` is the group role the migrations grant the application's privileges to
(migrations/versions/0003_app_role.py). The login role of ABL_DATABASE_URL is `abl_app` itself
or a member of it; `ensure_app_login` makes it so, as the owner role, before migrating.
"""

import logging

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

log = logging.getLogger("abl.db")

APP_ROLE = "abl_app"


class RoleSetupError(RuntimeError):
    """The application's login role is missing and the migrating role may not create it."""


def libpq_dsn(database_url: str) -> str:
    """A SQLAlchemy URL (`postgresql+psycopg://...`) as a libpq connection string."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


def ensure_app_login(migration_url: str, database_url: str) -> None:
    """As the owner role: the group role `abl_app`, and database_url's user able to log in
    with its password and a member of `abl_app`. A role that exists keeps its password."""
    app = make_url(database_url)
    user = app.username
    if not user:
        raise RoleSetupError("ABL_DATABASE_URL names no user")
    with psycopg.connect(libpq_dsn(migration_url), autocommit=True) as conn:
        current = conn.execute("SELECT current_user").fetchone()
        if current is not None and current[0] == user:
            warn_unrestricted(user)
            return
        try:
            if user == APP_ROLE:
                _ensure_role(conn, APP_ROLE, _login(app.password))
                return
            _ensure_role(conn, APP_ROLE, sql.SQL("NOLOGIN"))
            _ensure_role(conn, user, _login(app.password))
            if not _member(conn, user):
                conn.execute(
                    sql.SQL("GRANT {} TO {}").format(sql.Identifier(APP_ROLE), sql.Identifier(user))
                )
        except psycopg.errors.InsufficientPrivilege as exc:
            raise RoleSetupError(
                f"the migration role may not create or grant roles ({exc}); as a superuser run"
                f" CREATE ROLE {APP_ROLE} NOLOGIN; CREATE ROLE {user} LOGIN PASSWORD '...';"
                f" GRANT {APP_ROLE} TO {user}; then migrate again"
            ) from exc


def _login(password: str | None) -> sql.Composable:
    if not password:
        return sql.SQL("LOGIN")
    return sql.SQL("LOGIN PASSWORD {}").format(sql.Literal(password))


def _ensure_role(conn: psycopg.Connection, role: str, attributes: sql.Composable) -> None:
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone() is None:
        conn.execute(sql.SQL("CREATE ROLE {} {}").format(sql.Identifier(role), attributes))


def _member(conn: psycopg.Connection, user: str) -> bool:
    row = conn.execute("SELECT pg_has_role(%s, %s, 'MEMBER')", [user, APP_ROLE]).fetchone()
    return bool(row and row[0])


def warn_unrestricted(user: str | None) -> None:
    log.warning(
        "migrating as %s, the role the application connects as: it owns the tables, so only the"
        " ledger's trigger keeps them append-only. Set ABL_MIGRATION_DATABASE_URL to the owner"
        " role and ABL_DATABASE_URL to a role that is a member of %s (docs/billing.md).",
        user,
        APP_ROLE,
    )

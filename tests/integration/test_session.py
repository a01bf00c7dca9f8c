"""The request path's connection pool on a real Postgres: a connection cut by a database restart
costs the step nothing (it runs again on a new connection)."""

from collections.abc import Iterator

import pytest
from sqlalchemy import Connection, text
from sqlalchemy.exc import OperationalError

import db.session
from infra.launcher.stack import Stack


@pytest.fixture
def url(stack: Stack) -> Iterator[str]:
    """A database URL whose hot pool is this test's alone (the cache is keyed by URL)."""
    assert stack.database_url
    url = stack.database_url + ("&" if "?" in stack.database_url else "?") + "application_name=t"
    yield url
    db.session._hot_engine(url).dispose()
    db.session._hot_engine.cache_clear()


def backend_pid(conn: Connection) -> int:
    return int(conn.execute(text("select pg_backend_pid()")).scalar_one())


def test_a_cut_connection_fails_a_bare_statement(url: str) -> None:
    """Without the retry, no ping: the first statement on a cut connection fails."""
    engine = db.session._hot_engine(url)
    with engine.connect() as conn:
        first = backend_pid(conn)
    cut(url, [first])
    with pytest.raises(OperationalError), engine.connect() as conn:
        backend_pid(conn)


def test_in_autocommit_runs_the_step_again_on_a_new_connection(url: str) -> None:
    first = db.session.in_autocommit(url, backend_pid)
    cut(url, [first])
    calls: list[int] = []

    def step(conn: Connection) -> int:
        calls.append(1)
        return backend_pid(conn)

    again = db.session.in_autocommit(url, step)
    assert again != first and len(calls) == 2


def test_in_autocommit_does_not_retry_other_errors(url: str) -> None:
    calls: list[int] = []

    def bad(conn: Connection) -> None:
        calls.append(1)
        conn.execute(text("select 1/0"))

    with pytest.raises(Exception, match="division by zero"):
        db.session.in_autocommit(url, bad)
    assert len(calls) == 1


def cut(url: str, pids: list[int]) -> None:
    """What a database restart does to these connections (checked in to the pool)."""
    admin = db.session.get_engine.__wrapped__(url, pool_size=1)
    try:
        with admin.connect() as conn:
            for pid in pids:
                assert conn.execute(text("select pg_terminate_backend(:p)"), {"p": pid}).scalar()
    finally:
        admin.dispose()

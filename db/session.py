"""Engines and sessions. Functions in db/ take a session and never commit; callers own it."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")


@lru_cache(maxsize=8)
def get_engine(database_url: str, pool_size: int = 10) -> Engine:
    return create_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=20,
        pool_pre_ping=True,
        pool_recycle=1800,
    )


@lru_cache(maxsize=8)
def _hot_engine(database_url: str) -> Engine:
    """The pool of the request path's one-statement steps (`in_autocommit`): no ping before
    each use, which cost a round trip as long as the statement itself under load
    (docs/benchmarks.md); a connection found cut is replaced and the step run again instead."""
    return create_engine(
        database_url, pool_size=10, max_overflow=20, pool_use_lifo=True, pool_recycle=1800
    )


@lru_cache(maxsize=8)
def get_sessionmaker(database_url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(database_url), expire_on_commit=False)


@contextmanager
def transaction(database_url: str) -> Iterator[Session]:
    """One session, committed on success, rolled back on error."""
    with get_sessionmaker(database_url).begin() as session:
        yield session


@contextmanager
def _autocommit(database_url: str) -> Iterator[Connection]:
    """One Core connection in autocommit: each statement is its own transaction, committed in
    its own round trip. For the hot paths whose work is one statement (the key check, the
    admission, the claim, the settlement): no BEGIN and COMMIT round trips, and the row locks
    they take (the account's) are held only while the server runs the statement, never while
    a busy client gets round to sending COMMIT (docs/benchmarks.md)."""
    engine = _hot_engine(database_url)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        yield conn


def in_autocommit(database_url: str, work: Callable[[Connection], T]) -> T:
    """`work` on an autocommit connection (`_autocommit`); once more on a new one if that
    connection turns out to have been cut (a database restart; the pool then replaces every
    connection it holds). `work` must be safe to repeat: a read, or statements that change
    nothing the second time (the claim and the settlement are conditional on the
    request's status; the admission's insert of the same request id fails as a whole)."""
    try:
        with _autocommit(database_url) as conn:
            return work(conn)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    with _autocommit(database_url) as conn:
        return work(conn)

"""Engines and sessions. Functions in db/ take a session and never commit; callers own it."""

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker


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
def get_sessionmaker(database_url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(database_url), expire_on_commit=False)


@contextmanager
def transaction(database_url: str) -> Iterator[Session]:
    """One session, committed on success, rolled back on error."""
    with get_sessionmaker(database_url).begin() as session:
        yield session


@contextmanager
def connection(database_url: str) -> Iterator[Connection]:
    """One Core connection in a transaction, committed on success: for hot paths whose
    statements are prebuilt Core, without an ORM session's bookkeeping."""
    with get_engine(database_url).begin() as conn:
        yield conn

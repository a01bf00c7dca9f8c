"""Keyset pagination: one page of an ordered query, and whether more rows follow it."""

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    rows: list[T]
    has_more: bool

    @property
    def next_cursor_row(self) -> T | None:
        """The row the next page starts after, or None on the last page."""
        return self.rows[-1] if self.has_more else None


def keyset_page(session: Session, query: "Select[Any]", limit: int) -> Page[Any]:
    """The first `limit` rows of `query` (already filtered past the cursor and ordered).

    One row more is read to learn whether another page follows, instead of a count.
    """
    rows = list(session.scalars(query.limit(limit + 1)))
    return Page(rows[:limit], len(rows) > limit)

"""The `anthropic-version` request header: optional, and every dated version is accepted.

The seed's own examples send none, so a missing header is fine. SDK 0.x and curl users send
2023-06-01, SDK 2.x sends 2026-10-21; both get the same behaviour (the seed's request shape,
which already accepts the union of both). Any other well-formed date is accepted as a version
newer than this server, so a newer client keeps working; a value that is not one date (a typo,
or a proxy's duplicated "2023-06-01, 2023-06-01") is a 400 in the real API's words.
"""

import re
from datetime import date
from typing import Annotated

from fastapi import Header, Request

from api.errors import InvalidRequestError

KNOWN_VERSIONS = ("2023-06-01", "2026-10-21")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def is_valid_version(value: str) -> bool:
    """A calendar date written YYYY-MM-DD."""
    if not _DATE.fullmatch(value):
        return False
    try:
        date.fromisoformat(value)
    except ValueError:
        return False
    return True


def check_anthropic_version(
    request: Request,
    anthropic_version: Annotated[
        str | None,
        Header(description=f"Optional; {' and '.join(KNOWN_VERSIONS)} are the known versions."),
    ] = None,
) -> None:
    """400 unless the header is absent, empty or one well-formed version date."""
    values = [v.strip() for v in request.headers.getlist("anthropic-version") if v.strip()]
    if not values:
        return
    if len(values) == 1 and is_valid_version(values[0]):
        return
    shown = ", ".join(values)
    raise InvalidRequestError(f'anthropic-version: "{shown}" is not a valid version')

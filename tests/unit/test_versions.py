"""`anthropic-version`: optional, every well-formed date accepted, garbage refused."""

import pytest
from starlette.requests import Request

from api.errors import InvalidRequestError
from api.versions import KNOWN_VERSIONS, check_anthropic_version, is_valid_version


def _request(*values: str) -> Request:
    headers = [(b"anthropic-version", v.encode()) for v in values]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers})


@pytest.mark.parametrize("values", [(), ("",), ("2023-06-01",), ("2026-10-21",), ("2031-02-03",)])
def test_accepted(values: tuple[str, ...]) -> None:
    check_anthropic_version(_request(*values))


@pytest.mark.parametrize(
    "values",
    [
        ("garbage",),
        ("2023-06-01, 2023-06-01",),
        ("2023-06-01", "2026-10-21"),
        ("2023-13-01",),
        ("2023-6-1",),
        ("2023-06-01T00:00:00Z",),
    ],
)
def test_refused_with_the_real_message(values: tuple[str, ...]) -> None:
    with pytest.raises(InvalidRequestError) as info:
        check_anthropic_version(_request(*values))
    assert info.value.message.startswith('anthropic-version: "')
    assert info.value.message.endswith('" is not a valid version')


def test_known_versions_are_valid() -> None:
    assert all(is_valid_version(v) for v in KNOWN_VERSIONS)

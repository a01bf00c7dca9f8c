"""The API refuses to start with a guessable admin token or JWT secret (docs/security.md)."""

import pytest
from pydantic import ValidationError

from api.settings import MIN_SECRET_CHARS, ApiSettings, secret_problem

GOOD = "x" * MIN_SECRET_CHARS


@pytest.mark.parametrize("variable", ["ABL_ADMIN_TOKEN", "ABL_JWT_SECRET"])
def test_a_weak_secret_in_the_environment_stops_the_api(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for weak, why in [
        ("REPLACE_ME_admin_token", "placeholder"),
        (GOOD[:-1], "31 characters long, shorter than 32"),
        (f"REPLACE_ME{GOOD}", "placeholder"),
    ]:
        monkeypatch.setenv(variable, weak)
        with pytest.raises(ValidationError) as info:
            ApiSettings()
        message = str(info.value)
        assert variable in message and why in message
        assert "secrets.token_urlsafe(32)" in message  # how to make a good one
        assert weak not in message  # the refused secret is not echoed into the logs


def test_32_characters_pass_and_unset_means_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ABL_ADMIN_TOKEN", GOOD)
    monkeypatch.setenv("ABL_JWT_SECRET", "")
    settings = ApiSettings()
    assert settings.admin_token is not None and settings.admin_token.get_secret_value() == GOOD
    assert settings.jwt_secret is None


def test_secret_problem_names_the_variable() -> None:
    assert secret_problem("ABL_X", GOOD) is None
    problem = secret_problem("ABL_X (from /data/x)", "short")
    assert problem is not None and problem.startswith("ABL_X (from /data/x) is 5 characters")

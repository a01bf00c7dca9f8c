"""The README's configuration table is generated from the settings classes and kept current."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings

from infra.cli.settings_doc import (
    BEGIN,
    END,
    env_names,
    field_comments,
    render,
    replace_table,
    rows,
)

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_table_is_current() -> None:
    text = README.read_text()
    assert replace_table(text) == text, (
        "README.md's configuration table is out of date:"
        " run python -m infra.cli.settings_doc README.md"
    )
    table = text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()
    assert table == render()


def test_every_variable_is_explained() -> None:
    for row in rows():
        assert row.meaning, f"{row.env} has no description (a comment above the field will do)"
        assert row.readers


def test_operator_contract_names_are_settings() -> None:
    contract = {
        "ABL_PORT",
        "ABL_HOST",
        "ABL_ADMIN_TOKEN",
        "ABL_DATA_DIR",
        "ABL_WORKERS",
        "ABL_DATABASE_URL",
        "ABL_REDIS_URL",
    }
    assert contract <= env_names()
    assert {"ABL_METRICS_PORT", "ABL_READY_MODELS", "ABL_WORKER_LEASE_S"} <= env_names()


class _Sample(BaseSettings):
    plain: int = 1
    # The first of a group,
    # described on two lines.
    first: int = 2
    second: int = 3

    # Alone.
    alone: str = "x"
    described: str = Field(default="y", description="From the field.")


def test_comments_attach_to_their_field_and_group() -> None:
    comments = field_comments(_Sample)
    assert "plain" not in comments
    assert comments["first"] == ("The first of a group, described on two lines.", True)
    assert comments["second"] == ("The first of a group, described on two lines.", False)
    assert comments["alone"] == ("Alone.", True)
    assert comments["described"] == ("Alone.", False)  # its description wins in rows()

"""The catalogue: the two built-in models, an operator's entries, and what an entry may say."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from contract.catalog import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_ID,
    TEST_MODEL,
    TEST_MODEL_ID,
    ModelSpec,
    load_catalog,
)

PRICES = {"input_price_per_mtok": "1", "output_price_per_mtok": "2"}


def test_both_built_in_models_are_always_there() -> None:
    catalog = load_catalog()
    assert [m.id for m in catalog.all()] == [DEFAULT_MODEL_ID, TEST_MODEL_ID]
    default, tiny = catalog.get(DEFAULT_MODEL_ID), catalog.get(TEST_MODEL_ID)
    assert default is DEFAULT_MODEL and tiny is TEST_MODEL
    assert (default.build, default.context_window, default.max_output_tokens) == (
        "smollm2-135m-instruct",
        8192,
        4096,
    )
    assert (tiny.build, tiny.context_window, tiny.max_output_tokens) == ("tiny", 65_536, 4096)
    assert default.max_tokens_policy == tiny.max_tokens_policy == "clamp"
    assert (default.folder, default.queue, tiny.folder, tiny.queue) == (
        DEFAULT_MODEL_ID,
        DEFAULT_MODEL_ID,
        TEST_MODEL_ID,
        TEST_MODEL_ID,
    )


def test_an_operator_entry_adds_a_model_or_replaces_a_built_in_one(tmp_path: Path) -> None:
    models = tmp_path / "models.json"
    entries = [
        {"id": "mine", "gguf_file": "mine.gguf", "context_window": 4096, "max_output_tokens": 512},
        {**TEST_MODEL.model_dump(mode="json"), "max_tokens_policy": "reject"},
    ]
    models.write_text(json.dumps([{**PRICES, **e} for e in entries]))
    catalog = load_catalog(models)
    mine = catalog.get("mine")
    assert mine is not None
    # Display name, folder and queue default to the id; a relative gguf_file lies in models/.
    assert (mine.display_name, mine.folder, mine.queue) == ("mine", "mine", "mine")
    assert mine.gguf_path(tmp_path) == tmp_path / "mine.gguf"
    assert mine.path(tmp_path) == tmp_path / "mine"
    replaced = catalog.get(TEST_MODEL_ID)
    assert replaced is not None and replaced.max_tokens_policy == "reject"
    assert len(catalog.all()) == 3


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"gguf_file": "a.gguf", "build": "tiny"}, "gguf_file or build, not both"),
        ({"gguf_file": "a.bin"}, "is not a .gguf file"),
        ({"max_tokens_policy": "truncate"}, "max_tokens_policy"),
        ({"default_temperature": 2.5}, "default_temperature"),
        ({"default_top_p": 0}, "default_top_p"),
    ],
)
def test_what_an_entry_may_not_say(fields: dict[str, object], said: str) -> None:
    with pytest.raises(ValidationError, match=said):
        ModelSpec.model_validate(
            {"id": "x", "context_window": 8, "max_output_tokens": 8, **PRICES, **fields}
        )

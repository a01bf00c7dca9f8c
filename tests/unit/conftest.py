"""Fixtures for the engine-side unit tests: the default model, built once per session."""

from pathlib import Path

import pytest

from workers.models.tiny import build_default_model


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model, built offline into a temporary folder (a few seconds)."""
    return build_default_model(tmp_path_factory.mktemp("models") / "abliterated-model")

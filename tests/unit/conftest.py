"""Fixtures for the engine-side unit tests: the test model (abl-tiny), built once per session."""

from pathlib import Path

import pytest

from workers.models.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test model, built offline into a temporary folder (a few seconds)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "abl-tiny")

"""Fixtures for every test: the default model's folder (converted once per machine)."""

import pytest

from model_store.default_model import ensure_default_model


@pytest.fixture(scope="session")
def model_dir():
    return ensure_default_model()

"""Fixtures for every test: the default model's folder (converted once per machine); and
under pytest-xdist (`make test`), every integration test in one group."""

import pytest

from model_store.default_model import ensure_default_model


@pytest.fixture(scope="session")
def model_dir():
    return ensure_default_model()


def pytest_collection_modifyitems(config, items):
    """Under `-n 2 --dist loadgroup` the integration tests run one after another in one
    process (each starts real stacks that need the machine's cores and ports), and the
    unit tests fill the other (docs/development.md)."""
    group = pytest.mark.xdist_group("integration")
    for item in items:
        if item.path.parent.name == "integration":
            item.add_marker(group)

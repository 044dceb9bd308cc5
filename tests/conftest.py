"""Fixtures shared by every test folder. Helpers (configs, models) are in ``tests/helpers.py``."""

from __future__ import annotations

import pytest

from tests.helpers import tiny_config


def pytest_configure(config: pytest.Config) -> None:
    # Soak and leak checks: part of the default run (and of .ci/run); deselect with -m "not slow".
    config.addinivalue_line("markers", "slow: takes more than a few seconds (soak, leak, timeout and notebook checks)")


@pytest.fixture
def llama_config():
    return tiny_config("llama")

"""Fixtures shared by every test folder. Helpers (configs, models) are in ``tests/helpers.py``."""

from __future__ import annotations

import pytest

from tests.helpers import tiny_config


@pytest.fixture
def llama_config():
    return tiny_config("llama")

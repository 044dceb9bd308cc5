"""Fixtures of the CPU tests of ``ipcbridge.vllm`` (the fakes are in ``vllm_fakes``)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.vllm import vllm_fakes as F


@pytest.fixture
def config() -> Any:
    return F.tiny_config()


@pytest.fixture
def worker(config: Any) -> F.FakeWorker:
    return F.make_worker(config)

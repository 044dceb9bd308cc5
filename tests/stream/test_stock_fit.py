"""Note [vLLM's receiver is not transactional]: a model that does not fit a stock engine is refused on the
trainer, before the first byte, because vLLM's receiver would fail halfway through its load."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from ipcbridge import BridgeError
from ipcbridge.stream import api
from tests.helpers import tiny_config


def model_of(**overrides: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return AutoModelForCausalLM.from_config(cfg)


def in_process_llm(config: Any) -> Any:
    """What the check reads of a vllm.LLM: ``llm_engine.model_config.hf_config``."""
    return SimpleNamespace(llm_engine=SimpleNamespace(model_config=SimpleNamespace(hf_config=config)))


class FakeReceiver:
    """An engine that also runs ipcbridge's extension: it announces its tensors ('vllm' layout)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from ipcbridge import mapping

        tensors = mapping.to_vllm(dict(model.state_dict()), model.config)
        self.specs = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
        self.closed = False

    def stream_layout(self) -> tuple[list[Any], int]:
        return self.specs, 0

    def close(self) -> None:
        self.closed = True


@pytest.fixture(autouse=True)
def no_extension(monkeypatch) -> None:
    """Engines without ipcbridge's extension, unless a test says otherwise."""
    monkeypatch.setattr(api, "_ipcbridge_endpoint", lambda target, required: None)


def test_an_in_process_engine_of_another_shape_is_refused_naming_the_parameter() -> None:
    engine = in_process_llm(tiny_config("llama"))
    api.check_stock_fit(engine, model_of())  # the same config fits
    with pytest.raises(BridgeError, match=r"6 parameter\(s\) differ, e\.g\. model\.layers\.0\.mlp\.down_proj\.weight: "
                       r"\(64, 128\) in the trainer's model, \(64, 96\) .* not transactional.*Fix: stream the model"):
        api.check_stock_fit(engine, model_of(intermediate_size=128))


def test_the_engines_own_tensors_are_asked_where_it_runs_the_extension(monkeypatch) -> None:
    receiver = FakeReceiver(model_of())
    monkeypatch.setattr(api, "_ipcbridge_endpoint", lambda target, required: receiver)
    api.check_stock_fit(object(), model_of())
    assert receiver.closed
    receiver.closed = False
    with pytest.raises(BridgeError, match=r"does not fit the engine's weights"):
        api.check_stock_fit(object(), model_of(intermediate_size=128))
    assert receiver.closed  # the check's endpoint is not left open when it refuses


def test_an_engine_that_cannot_be_asked_is_logged_not_refused(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="ipcbridge.stream.api"):
        api.check_stock_fit(SimpleNamespace(), model_of())
    assert "cannot check that the model fits" in caplog.text


def test_a_caller_that_found_no_extension_is_not_asked_again(monkeypatch) -> None:
    monkeypatch.setattr(api, "_ipcbridge_endpoint", lambda target, required: pytest.fail("asked twice"))
    api.check_stock_fit(in_process_llm(tiny_config("llama")), model_of(), ask_extension=False)


def test_an_endpoint_the_caller_passed_is_checked_but_not_closed(monkeypatch) -> None:
    receiver = FakeReceiver(model_of())
    monkeypatch.setattr(api, "_ipcbridge_endpoint", lambda target, required: target)
    api.check_stock_fit(receiver, model_of())
    assert not receiver.closed

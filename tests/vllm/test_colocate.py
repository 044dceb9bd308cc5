"""``VllmEngine``'s start-up arguments (no engine started): the model directory it writes, and which worker
extension it asks vLLM for."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from ipcbridge.errors import BridgeError
from ipcbridge.hf import write_model_dir
from ipcbridge.vllm.colocate import VllmEngine
from ipcbridge.vllm.extension import EXTENSION_QUALNAME
from ipcbridge.vllm.testing import TESTING_EXTENSION_QUALNAME
from tests.vllm import vllm_fakes as F


def read(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def test_write_model_dir(tmp_path: Any, config: Any) -> None:
    d = read(write_model_dir(config, str(tmp_path)))
    assert d["architectures"] == ["LlamaForCausalLM"] and d["vocab_size"] == 100
    sub = tmp_path / "q"
    sub.mkdir()
    d = read(write_model_dir({"model_type": "qwen3", "vocab_size": 7}, str(sub)))
    assert d["architectures"] == ["Qwen3ForCausalLM"]
    with pytest.raises(BridgeError, match="model_type"):
        write_model_dir({"vocab_size": 7}, str(sub))


def test_bare_config_with_hf_init_uses_the_testing_extension(config: Any) -> None:
    eng = VllmEngine(config, init="hf")
    try:
        model, kwargs = eng.llm_kwargs_for_start()
        assert kwargs["worker_extension_cls"] == TESTING_EXTENSION_QUALNAME
        assert kwargs["load_format"] == "dummy" and read(model)["model_type"] == "llama"
        assert kwargs["attention_backend"] == "FLEX_ATTENTION"  # head_dim 16 < 32
        assert kwargs["max_model_len"] == 128  # capped at the config's positions
    finally:
        eng.close()
    assert not os.path.exists(model)  # close() removes the temporary model directory


@pytest.mark.parametrize("source", ["config-dummy", "path"])
def test_otherwise_the_production_extension(config: Any, source: str) -> None:
    eng = VllmEngine(config, init="dummy") if source == "config-dummy" else VllmEngine("/models/llama")
    try:
        _, kwargs = eng.llm_kwargs_for_start()
        assert kwargs["worker_extension_cls"] == EXTENSION_QUALNAME
    finally:
        eng.close()


def test_extension_override_must_be_ours(config: Any) -> None:
    eng = VllmEngine(config, init="dummy", worker_extension_cls=TESTING_EXTENSION_QUALNAME)
    try:
        assert eng.llm_kwargs_for_start()[1]["worker_extension_cls"] == TESTING_EXTENSION_QUALNAME
        eng.llm_kwargs["worker_extension_cls"] = "collections.OrderedDict"
        with pytest.raises(BridgeError, match="subclass"):
            eng.llm_kwargs_for_start()
        eng.init = "hf"
        eng.llm_kwargs["worker_extension_cls"] = EXTENSION_QUALNAME  # cannot re-initialise the weights
        with pytest.raises(BridgeError, match="init='dummy'"):
            eng.llm_kwargs_for_start()
        eng.llm_kwargs["worker_extension_cls"] = F.FakeWorker  # a subclass of the testing extension
        assert eng.llm_kwargs_for_start()[1]["worker_extension_cls"] is F.FakeWorker
    finally:
        eng.close()


def test_bad_init_refused(config: Any) -> None:
    with pytest.raises(ValueError, match="init"):
        VllmEngine(config, init="zeros")

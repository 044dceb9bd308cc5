"""TRL's colocate shape: a vllm.LLM whose worker runs in the trainer's own process, attached without IPC.

On CPU the LLM is a duck-typed stand-in with vLLM's in-process structure (``llm_engine.model_executor
.driver_worker.worker.model_runner.model``) holding vLLM-layout parameters; the real one runs in
``test_trl_inprocess_gpu`` (``-m vllm``) and ``benchmarks/bench_trl.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import ipcbridge
from ipcbridge import BridgeError
from ipcbridge.vllm import inprocess
from tests.helpers import tiny_config
from tests.vllm.vllm_fakes import vllm_module, vllm_state


class _FakeLLM:
    def __init__(self, config, multiprocess: bool = False) -> None:
        self.model = vllm_module(vllm_state(config))
        worker = SimpleNamespace(model_runner=SimpleNamespace(model=self.model))
        mc = SimpleNamespace(hf_config=config, quantization=None, enable_sleep_mode=False)
        pc = SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1)
        executor = None if multiprocess else SimpleNamespace(driver_worker=SimpleNamespace(worker=worker))
        self.llm_engine = SimpleNamespace(model_executor=executor,
                                          vllm_config=SimpleNamespace(model_config=mc, parallel_config=pc))
        self.resets = 0
        self.reset_result: bool = True

    def reset_prefix_cache(self) -> bool:
        self.resets += 1
        return self.reset_result


@pytest.fixture
def allow_cpu(monkeypatch):
    # The policy refuses CPU weights for real vLLM (offloading); the stand-in's weights are on the CPU.
    monkeypatch.setattr(inprocess, "refusal_reason", lambda facts: None)


def test_attaches_to_the_very_tensors_and_fences(allow_cpu) -> None:
    cfg = tiny_config("qwen2", tied=True)
    llm = _FakeLLM(cfg)
    bridge = ipcbridge.connect(inprocess.endpoint_for(llm))
    try:
        served = dict(llm.model.named_parameters())
        qkv = served["model.layers.0.self_attn.qkv_proj.weight"]
        q = bridge.model.model.layers[0].self_attn.q_proj.weight
        assert q.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
        assert bridge.trainer_weight_bytes() == 0 and bridge.parameters_outside_engine() == []
        opt = torch.optim.SGD(bridge.model.parameters(), lr=1.0)
        q.grad = torch.ones_like(q)
        before = qkv[0, 0].item()
        with bridge.update():
            opt.step()
        assert qkv[0, 0].item() == pytest.approx(before - 1.0)  # the engine's own tensor moved
        assert llm.resets == 1 and bridge.weight_version == 1 == inprocess.inprocess_worker(llm)._ipcbridge_weight_version
        # a second bridge continues the engine's version sequence, shares its gate
        other = ipcbridge.connect(inprocess.endpoint_for(llm))
        with other.update():
            pass
        assert other.weight_version == 2
        other.close()
    finally:
        bridge.close()


def test_a_failed_reset_is_an_error_after_the_version_moved_on(allow_cpu) -> None:
    llm = _FakeLLM(tiny_config("qwen2", tied=True))
    llm.reset_result = False  # what vLLM answers while requests still hold blocks
    bridge = ipcbridge.connect(inprocess.endpoint_for(llm))
    try:
        with pytest.raises(BridgeError, match="reset_prefix_cache reported failure"), bridge.update():
            pass
        assert inprocess.inprocess_worker(llm)._ipcbridge_weight_version == 1  # the weights may have changed
        llm.reset_result = True
        with bridge.update():
            pass
        assert bridge.weight_version == 2
    finally:
        bridge.close()


def test_a_multiprocess_llm_is_not_in_process() -> None:
    llm = _FakeLLM(tiny_config("llama"), multiprocess=True)
    assert inprocess.inprocess_worker(llm) is None
    with pytest.raises(BridgeError, match="another process"):
        inprocess.InProcessLLMEndpoint(llm)


def test_the_policy_still_refuses(monkeypatch) -> None:
    llm = _FakeLLM(tiny_config("llama"))
    llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size = 2
    with pytest.raises(BridgeError, match="tensor"):
        inprocess.InProcessLLMEndpoint(llm)


def test_one_version_sequence_with_a_cross_process_endpoint_on_the_same_llm(allow_cpu) -> None:
    # An LLMEndpoint of this LLM counts versions in this process (Note [an in-process engine's version is
    # counted here]); the in-process endpoint continues from them, and they from it.
    from ipcbridge.vllm.base import engine_record

    llm = _FakeLLM(tiny_config("qwen2", tied=True))
    ep = inprocess.endpoint_for(llm)
    bridge = ipcbridge.connect(ep)
    try:
        engine_record(llm).version = 7  # counted by the other endpoint, not yet told to the worker
        assert ep.engine_weight_version() == 7 == inprocess.inprocess_worker(llm)._ipcbridge_weight_version
        with bridge.update():
            pass
        assert bridge.weight_version == 8 == engine_record(llm).version == engine_record(llm).synced
        engine_record(llm).heard(3)
        assert engine_record(llm).version == 8  # never back
    finally:
        bridge.close()


"""TRL on ipcbridge with a ``vllm.LLM`` whose EngineCore runs in its own process (vLLM V1's default
multiprocessing; ``-m vllm``): TRL's colocate generation path calls ``llm.generate`` in the trainer's
process, the model lives in the EngineCore child, and the fence and ``sync_weights``' check travel through
the worker extension's ``collective_rpc``. Run alone: ``python -m pytest -m vllm tests/integrations/test_trl_vllm_llm.py``.
"""

from __future__ import annotations

import os

import pytest

import ipcbridge

pytestmark = pytest.mark.vllm


def test_grpo_trains_a_separate_process_llm(tmp_path) -> None:
    from tests.vllm import vllm_helpers as H

    H.require_vllm()
    pytest.importorskip("trl")
    from ipcbridge.vllm.colocate import VllmEngine
    from ipcbridge.vllm.inprocess import inprocess_worker
    from tests.integrations.test_trl_vllm import _grpo, _summary

    # kv_reset="salted" (VllmEngine's default): no prefix-cache reset, so TRL's prompts must carry the salt.
    with VllmEngine(H.tiny_config("qwen2"), gpu_memory_utilization=0.25, logprobs_mode="processed_logprobs") as engine:
        assert inprocess_worker(engine.llm) is None  # the model is in the EngineCore child
        bridge = ipcbridge.connect(engine, check=True)
        try:
            assert bridge.endpoint.info()["pid"] != os.getpid() and bridge.endpoint.kv_reset == "salted"
            v0 = bridge.weight_version
            trainer = _grpo(bridge, tmp_path, steps=3)
            assert trainer.generation.kind == "vllm"
            trainer.train()
            report = bridge.check()
            res = {**_summary(trainer, bridge), "v0": v0, "check_ok": report.ok,
                   "parity_mean": report.logprob_mean_abs_diff, "trainer_weight_bytes": report.trainer_weight_bytes}
            H.record("trl_separate_process_llm", **res)
            assert res["weight_version"] == res["engine_version"] == v0 + 3
            assert report.ok and report.trainer_weight_bytes == 0
            assert all(r is not None and abs(r - 1.0) < 0.1 for r in res["is_ratio"])
            assert max(res["sync_ms"]) < 100
        finally:
            bridge.close()

"""``colocated_llm`` starts the ``vllm.LLM`` TRL's colocate mode would start: checked on CPU against a stand-in
``vllm`` module that records its arguments (the real start runs in ``test_trl_vllm.py``, ``-m vllm``)."""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Any

import pytest
from trl import GRPOConfig

from ipcbridge.integrations.trl import colocated_llm


class _LLM:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


def test_colocated_llm_takes_trls_arguments_and_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    fake = ModuleType("vllm")
    fake.LLM = _LLM  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", fake)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        # setenv first, so the undo removes what colocated_llm sets: a WORLD_SIZE left in the environment
        # would make every later transformers.Trainer in this process start torch.distributed.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    args = GRPOConfig(output_dir=str(tmp_path), use_vllm=True, vllm_mode="colocate", per_device_train_batch_size=4,
                      num_generations=4, vllm_gpu_memory_utilization=0.25, report_to=[],
                      use_cpu=True, bf16=False)
    llm = colocated_llm("/models/tiny", args, seed=7)
    kw = llm.kwargs
    assert kw["model"] == "/models/tiny" and kw["distributed_executor_backend"] == "external_launcher"
    assert kw["gpu_memory_utilization"] == 0.25 and kw["tensor_parallel_size"] == 1
    assert kw["max_num_seqs"] == args.per_device_train_batch_size * args.steps_per_generation
    assert kw["logprobs_mode"] == "processed_logprobs" and kw["enable_sleep_mode"] is False
    assert kw["seed"] == 7  # an override wins
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1" and os.environ.get("MASTER_PORT")

"""TRL on ipcbridge with real vLLM in TRL's colocate shape: the LLM in this very process (``-m vllm``).

Run alone (it starts vLLM with ``external_launcher``, which joins a torch.distributed world of one in the
pytest process): ``python -m pytest -m vllm tests/integrations/test_trl_vllm.py``.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.vllm


def test_grpo_trains_the_in_process_llm(tmp_path) -> None:
    pytest.importorskip("trl")
    pytest.importorskip("vllm.entrypoints.llm", reason="needs vllm>=0.25.1,<0.34 and a GPU (GPU machine)")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import GRPOConfig

    import ipcbridge
    from benchmarks.bench_trl import write_model
    from ipcbridge.integrations.trl import GRPOTrainer, colocated_llm
    from ipcbridge.vllm.inprocess import InProcessLLMEndpoint

    model_dir = tmp_path / "model"
    write_model(model_dir, tiny=True)
    args = GRPOConfig(output_dir=str(tmp_path / "out"), use_vllm=True, max_steps=2, per_device_train_batch_size=8,
                      num_generations=4, max_completion_length=8, learning_rate=1e-3, bf16=True, report_to=[],
                      save_strategy="no", disable_tqdm=True, vllm_gpu_memory_utilization=0.2,
                      vllm_max_model_length=256)
    llm = colocated_llm(str(model_dir), args, enforce_eager=True)
    before = torch.cuda.memory_allocated()
    bridge = ipcbridge.connect(InProcessLLMEndpoint(llm), check=True)  # parity with vLLM's own logprobs
    assert torch.cuda.memory_allocated() - before < 1 << 20 and bridge.trainer_weight_bytes() == 0
    served = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    qkv = dict(served.named_parameters())["model.layers.0.self_attn.qkv_proj.weight"]
    snapshot = qkv.detach().clone()
    trainer = GRPOTrainer(bridge, reward_funcs=lambda completion_ids, **_: [float(len(c)) for c in completion_ids],
                          args=args, processing_class=PreTrainedTokenizerFast.from_pretrained(model_dir),
                          train_dataset=Dataset.from_dict({"prompt": ["w5 w6 w7"] * 16}), master_weights="remainder")
    trainer.train()
    assert not torch.equal(qkv, snapshot)  # vLLM's own tensor was trained
    assert bridge.weight_version == 2 == InProcessLLMEndpoint(llm).engine_weight_version()
    assert len(trainer.generation.sync_seconds) == 2 and max(trainer.generation.sync_seconds) < 0.05
    bridge.close()

"""TRL on ipcbridge with real vLLM (``-m vllm``): TRL's colocate shape (the LLM in this very process), and
``vllm serve`` by URL (started in the background as ``tests/vllm/test_vllm_serve.py`` starts it).

Run each test alone (the first starts vLLM with ``external_launcher``, which joins a torch.distributed world
of one in the pytest process): ``python -m pytest -m vllm tests/integrations/test_trl_vllm.py::<test>``.
The separate-process ``LLM`` is in ``test_trl_vllm_llm.py``.
"""

from __future__ import annotations

import pytest
import torch

import ipcbridge

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


# ---- vllm serve by URL (Note [three engines, one generation class] in ipcbridge.integrations.trl) ---------


@pytest.fixture(scope="module")
def serve_url():
    from tests.vllm import vllm_helpers as H

    H.require_vllm()
    pytest.importorskip("trl")
    with H.vllm_serve("trl_serve", "--logprobs-mode", "processed_logprobs", gpu_memory_utilization=0.25,
                      log="vllm_serve_trl.log") as url:
        yield url


def _grpo(bridge, tmp_path, steps: int):
    from datasets import Dataset
    from trl import GRPOConfig

    from ipcbridge.integrations.trl import GRPOTrainer
    from tests.integrations.test_trl import _example

    ex = _example()  # its word-level tokenizer: ids < 64, inside the tiny models' vocabularies
    args = GRPOConfig(output_dir=str(tmp_path / "out"), use_vllm=True, max_steps=steps, per_device_train_batch_size=8,
                      num_generations=4, max_completion_length=8, learning_rate=1e-3, bf16=True, report_to=[],
                      save_strategy="no", disable_tqdm=True, logging_steps=1, vllm_server_timeout=120.0)
    return GRPOTrainer(bridge, reward_funcs=lambda completion_ids, **_: [float(len(c)) for c in completion_ids],
                       args=args, processing_class=ex.tokenizer(),
                       train_dataset=Dataset.from_dict({"prompt": ex.PROMPTS * 4}))


def _summary(trainer, bridge) -> dict:
    hist = [h for h in trainer.state.log_history if "reward" in h]
    return {"rewards": [h["reward"] for h in hist],
            "is_ratio": [h.get("sampling/importance_sampling_ratio/mean") for h in hist],
            "sync_ms": [round(1e3 * s, 3) for s in trainer.generation.sync_seconds],
            "weight_version": bridge.weight_version, "engine_version": bridge.endpoint.engine_weight_version()}


def test_grpo_trains_vllm_serve_by_url(serve_url: str, tmp_path) -> None:
    """GRPOTrainer(ipcbridge.connect(url)): TRL's completions come from POST /v1/completions, each step is a
    fence on the server, the served weights are the trained ones (parity after training), and TRL's
    importance-sampling ratio stays ~1 (the server samples with the weights the trainer scores with)."""
    from ipcbridge.integrations import trl_serve
    from tests.vllm import vllm_helpers as H

    bridge = ipcbridge.connect(serve_url)
    try:
        with bridge.update():
            H.init_weights(bridge.model, seed=0)  # vLLM's dummy weights give ~0 logits
        v0 = bridge.weight_version
        mode = trl_serve.served_logprobs_mode(bridge.endpoint)
        trainer = _grpo(bridge, tmp_path, steps=3)
        assert trainer.generation.kind == "http"
        trainer.train()
        report = bridge.check()
        res = {**_summary(trainer, bridge), "v0": v0, "logprobs_mode": mode, "check_ok": report.ok,
               "parity_mean": report.logprob_mean_abs_diff, "trainer_weight_bytes": report.trainer_weight_bytes}
        H.record("trl_serve", **res)
        assert res["weight_version"] == res["engine_version"] == v0 + 3
        assert report.ok and report.trainer_weight_bytes == 0
        assert len(res["rewards"]) == 3 and all(r is not None and abs(r - 1.0) < 0.1 for r in res["is_ratio"])
        assert mode in ("processed_logprobs", None)  # None: this vLLM's /server_info did not say (recorded)
    finally:
        bridge.close()

"""TRL's GRPOTrainer on ipcbridge: the example learns, sync_weights is a check, and misuse is refused."""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl", reason="needs trl (pip install -e '.[test]')")

import ipcbridge
from ipcbridge import BridgeError
from ipcbridge.integrations import trl as bridge_trl
from tests.helpers import tiny_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trl_grpo.py"


def _example():
    spec = importlib.util.spec_from_file_location("trl_grpo_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_learns_and_never_copies() -> None:
    """A shortened examples/trl_grpo.py: the reward rises, every step was one fence (the engine's version is
    the step count) and TRL's importance-sampling ratio stays 1: the engine generated with the weights the
    trainer computed its logprobs with."""
    r = _example().run(steps=6)
    rewards = r["rewards"]
    assert len(rewards) == 6
    assert statistics.fmean(rewards[-2:]) > statistics.fmean(rewards[:2]) + 0.05, rewards
    assert r["weight_version"] == r["bridge_version"] == 6
    assert len(r["sync_seconds"]) == 6 and max(r["sync_seconds"]) < 0.5
    assert all(abs(x - 1.0) < 1e-3 for x in r["is_ratio"]), r["is_ratio"]


@pytest.fixture(scope="module")
def engine():
    with ipcbridge.LocalEngine(tiny_config("qwen2", tied=True, eos_token_id=5), device="cpu") as e:
        yield e


def _args(tmp_path, **kw):
    from trl import GRPOConfig

    base = dict(output_dir=str(tmp_path), use_vllm=True, max_steps=1, per_device_train_batch_size=4, num_generations=4,
                max_completion_length=4, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                disable_tqdm=True)
    return GRPOConfig(**{**base, **kw})


def _trainer(bridge, tmp_path, **kw):
    from datasets import Dataset

    return bridge_trl.GRPOTrainer(bridge, reward_funcs=lambda completion_ids, **_: [0.0] * len(completion_ids),
                                  args=_args(tmp_path, **kw), train_dataset=Dataset.from_dict({"prompt": ["a b"] * 8}),
                                  processing_class=_example().tokenizer())


def test_sync_weights_refuses_a_foreign_writer(engine, tmp_path) -> None:
    """Another bridge fencing the same engine moves its version: TRL's completions would be off-policy."""
    bridge, other = ipcbridge.connect(engine), ipcbridge.connect(engine)
    try:
        trainer = _trainer(bridge, tmp_path)
        trainer.generation.sync_weights()  # same version: a check, no copy
        with other.update():
            pass
        with pytest.raises(BridgeError, match="another bridge or trainer"):
            trainer.generation.sync_weights()
    finally:
        bridge.close()
        other.close()


def test_sync_weights_publishes_unfenced_writes_and_refuses_a_cast(engine, tmp_path) -> None:
    bridge = ipcbridge.connect(engine)
    try:
        trainer = _trainer(bridge, tmp_path)
        v = bridge.weight_version
        with torch.no_grad():
            next(bridge.model.parameters()).mul_(1.0)  # an in-place write outside the fence
        trainer.generation.sync_weights()
        assert bridge.weight_version == v + 1 == engine.weight_version
        bridge.model.to(torch.float64)
        with pytest.raises(BridgeError, match="no longer alias"):
            bridge_trl.check_served(bridge)  # the first sync's full walk
        with pytest.raises(BridgeError, match="no longer lie in"):
            _trainer(bridge, tmp_path)  # a new trainer: BridgeCallback refuses at once
        with pytest.raises(BridgeError, match="no longer alias"), bridge.update():  # later syncs: the fence's
            pass
    finally:
        bridge.close()


def test_generation_is_refused_loudly_for_settings_the_engine_lacks(engine, tmp_path) -> None:
    bridge = ipcbridge.connect(engine)
    try:
        with pytest.raises(BridgeError, match="repetition_penalty"):
            _trainer(bridge, tmp_path, repetition_penalty=1.2)
        with pytest.raises(BridgeError, match="generation_kwargs"):
            _trainer(bridge, tmp_path, generation_kwargs={"frequency_penalty": 0.5})
        with pytest.raises(BridgeError, match="use_vllm=True"):
            _trainer(bridge, tmp_path, use_vllm=False)
        from transformers import AutoModelForCausalLM

        with pytest.raises(BridgeError, match=r"must be bridge\.model"):
            bridge_trl.GRPOTrainer(bridge, reward_funcs=[], args=_args(tmp_path),
                                   model=AutoModelForCausalLM.from_config(bridge.model.config))
        with pytest.raises(TypeError, match="Bridge"):
            bridge_trl.GRPOTrainer(bridge.model, reward_funcs=[], args=_args(tmp_path))
        # TRL's own class is back after every construction, failed ones included.
        from trl.generation.vllm_generation import VLLMGeneration
        from trl.trainer import grpo_trainer

        assert grpo_trainer.VLLMGeneration is VLLMGeneration
    finally:
        bridge.close()


def test_a_closed_bridge_or_an_unknown_master_mode_is_refused_before_trl_runs(engine, tmp_path) -> None:
    """A closed bridge has model None: TRL would be handed model=None and fail deep in its own code; an
    unknown master_weights mode would only fail at train(), after everything was built."""
    from trl.trainer import grpo_trainer

    original = grpo_trainer.VLLMGeneration
    bridge = ipcbridge.connect(engine)
    try:
        with pytest.raises(BridgeError, match="master_weights='fp64'"):
            bridge_trl.GRPOTrainer(bridge, reward_funcs=[], args=_args(tmp_path), master_weights="fp64")
    finally:
        bridge.close()
    with pytest.raises(BridgeError, match="closed"):
        bridge_trl.GRPOTrainer(bridge, reward_funcs=[], args=_args(tmp_path))
    assert grpo_trainer.VLLMGeneration is original


def test_the_local_generation_contract(engine, tmp_path) -> None:
    """TRL's (prompt_ids, completion_ids, logprobs, logprob_token_ids), runs of a prompt as one n-request,
    logprobs after the temperature (what TRL's trainer side computes)."""
    bridge = ipcbridge.connect(engine)
    try:
        gen = _trainer(bridge, tmp_path, temperature=0.7).generation
        prompts = [[1, 2, 3]] * 4 + [[4, 5]] * 4
        p, c, lp, ids = gen.generate(prompts, None, 4)
        assert p == prompts and len(c) == len(lp) == len(ids) == 8
        assert all(len(x) == len(y) == len(z) for x, y, z in zip(c, lp, ids, strict=True))
        assert all(t == [tok] for row, toks in zip(ids, c, strict=True) for t, tok in zip(row, toks, strict=True))
        scored = engine.score([1, 2, 3], c[0])  # raw logprobs; the processed ones are after T=0.7
        assert any(abs(a - b[0]) > 1e-3 for a, b in zip(scored, lp[0], strict=True))
    finally:
        bridge.close()


def test_a_second_engine_is_refused() -> None:
    """trl.GRPOTrainer(model=bridge.model, use_vllm=True) builds TRL's own engine, a copy: refused."""
    bridge = SimpleNamespace(model=object())
    TrlGeneration = type("VLLMGeneration", (), {"__module__": "trl.generation.vllm_generation"})
    trainer = SimpleNamespace(use_vllm=True, vllm_generation=TrlGeneration(), model=bridge.model)
    with pytest.raises(BridgeError, match="second vLLM engine"):
        bridge_trl.refuse_second_engine(trainer, bridge)
    bridge_trl.refuse_second_engine(SimpleNamespace(use_vllm=False, model=bridge.model), bridge)


def test_in_runs() -> None:
    assert bridge_trl._in_runs([[1]] * 4 + [[2]] * 4, 4)
    assert not bridge_trl._in_runs([[1], [2], [1], [2]], 2)
    assert not bridge_trl._in_runs([[1]] * 3, 2)


def test_our_own_generation_is_not_a_second_engine(engine, tmp_path) -> None:
    bridge = ipcbridge.connect(engine)
    try:
        trainer = _trainer(bridge, tmp_path)
        bridge_trl.refuse_second_engine(trainer, bridge)  # BridgeGeneration: no second engine
    finally:
        bridge.close()

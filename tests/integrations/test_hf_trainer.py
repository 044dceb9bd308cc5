"""BridgeCallback: a transformers Trainer's optimizer steps are fenced weight updates."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

import ipcbridge
from ipcbridge import BridgeError
from ipcbridge.integrations.hf_trainer import BridgeCallback

PROMPT = [3, 14, 15, 92]


class _Data(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor(PROMPT + [7] * 6)
        return {"input_ids": ids, "labels": ids}


def test_trainer_steps_reach_the_engine(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    with ipcbridge.LocalEngine(tiny_config("llama"), device="cpu") as engine:
        bridge = ipcbridge.connect(engine)
        before = engine.generate([PROMPT], max_tokens=6)[0]
        args = TrainingArguments(
            output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-2,
            report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
        )
        Trainer(model=bridge.model, args=args, train_dataset=_Data(), callbacks=[BridgeCallback(bridge)]).train()
        after = engine.generate([PROMPT], max_tokens=6)[0]
        assert bridge.weight_version == 3 == after.weight_version
        assert after.token_ids != before.token_ids and after.token_ids.count(7) > before.token_ids.count(7)
        assert len(bridge.fence_seconds) == 3
        bridge.close()


def test_training_a_different_model_is_refused() -> None:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    weights = ipcbridge.mapping.to_vllm(dict(AutoModelForCausalLM.from_config(cfg).state_dict()), cfg)
    bridge = ipcbridge.connect(ipcbridge.export(weights, cfg))
    other = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(BridgeError, match=r"pass model=bridge\.model"):
        BridgeCallback(bridge).on_train_begin(None, None, None, model=other)

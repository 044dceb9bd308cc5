"""BridgeCallback: a transformers Trainer's optimizer steps are fenced weight updates."""

from __future__ import annotations

import pytest
import torch

import ipcbridge
from ipcbridge import BridgeError
from ipcbridge.integrations.hf_trainer import BridgeCallback
from tests.helpers import tiny_config

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


class _BoomAdamW(torch.optim.AdamW):
    """An optimizer whose second step raises, as a NaN check or an OOM would."""

    steps = 0

    def step(self, closure=None):
        type(self).steps += 1
        if type(self).steps == 2:
            raise RuntimeError("boom in optimizer.step")
        return super().step(closure)


def test_a_step_that_raises_releases_the_pause(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    with ipcbridge.LocalEngine(tiny_config("llama"), device="cpu") as engine:
        bridge = ipcbridge.connect(engine)
        args = TrainingArguments(
            output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
            report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
        )
        opt = _BoomAdamW(bridge.model.parameters(), lr=1e-3)
        trainer = Trainer(model=bridge.model, args=args, train_dataset=_Data(), optimizers=(opt, None),
                          callbacks=[BridgeCallback(bridge)])
        with pytest.raises(RuntimeError, match=r"boom in optimizer\.step"):
            trainer.train()
        assert engine.paused_by is None  # released at once, not at the lease's end
        assert engine.weight_version == bridge.weight_version == 2  # both fences resumed, each moved it
        engine.generate([PROMPT], max_tokens=2)
        bridge.close()

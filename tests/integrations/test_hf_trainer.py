"""BridgeCallback: a transformers Trainer's optimizer steps are fenced weight updates."""

from __future__ import annotations

import pytest
import torch

import ipcbridge
from ipcbridge import BridgeError
from ipcbridge.integrations.hf_trainer import BridgeCallback
from ipcbridge.logprobs import greedy
from tests.helpers import reference_model, tiny_config

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


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=5e-2,
                report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


def test_resume_from_checkpoint_and_load_best_model_write_the_engine_inside_a_fence(tmp_path) -> None:
    from transformers import Trainer

    with ipcbridge.LocalEngine(tiny_config("llama"), device="cpu") as engine:
        bridge = ipcbridge.connect(engine)
        args = _args(tmp_path, save_strategy="steps", save_steps=2)
        Trainer(model=bridge.model, args=args, train_dataset=_Data(), callbacks=[BridgeCallback(bridge)]).train()
        ckpt = tmp_path / "checkpoint-2"
        head = bridge.model.lm_head.weight
        saved = head.detach().clone()
        with bridge.update(), torch.no_grad():
            head.zero_()  # the engine now serves other weights than the checkpoint's
        version = engine.weight_version
        trainer = Trainer(model=bridge.model, args=args, train_dataset=_Data(), callbacks=[BridgeCallback(bridge)])
        trainer.train(resume_from_checkpoint=str(ckpt))  # at step 2 of 2: loads, then no step is left
        assert engine.weight_version == bridge.weight_version == version + 1  # the load's own fence
        assert torch.equal(head.detach(), saved) and bridge.unfenced_writes() == []
        assert engine.generate([PROMPT], max_tokens=4)[0].token_ids == greedy(bridge.model, PROMPT, 4)

        with bridge.update(), torch.no_grad():
            head.zero_()
        trainer.state.best_model_checkpoint = str(ckpt)  # as load_best_model_at_end leaves it
        trainer._load_best_model()
        assert torch.equal(head.detach(), saved) and engine.weight_version == version + 3
        bridge.close()


def test_a_callback_added_after_init_cannot_resume_unfenced(tmp_path) -> None:
    from transformers import Trainer

    cfg = tiny_config("llama")
    weights = ipcbridge.mapping.to_vllm(dict(reference_model(cfg).state_dict()), cfg)
    bridge = ipcbridge.connect(ipcbridge.export(weights, cfg))
    args = _args(tmp_path, save_strategy="steps", save_steps=2)
    Trainer(model=bridge.model, args=args, train_dataset=_Data(), callbacks=[BridgeCallback(bridge)]).train()
    trainer = Trainer(model=bridge.model, args=args, train_dataset=_Data())
    trainer.add_callback(BridgeCallback(bridge))  # too late for the load: no event runs before it
    with pytest.raises(BridgeError, match=r"load_state_dict\(\) writes parameters .* outside `update\(\)`"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    bridge.close()


def test_full_eval_casts_are_refused(tmp_path) -> None:
    from transformers import Trainer

    cfg = tiny_config("llama")
    weights = ipcbridge.mapping.to_vllm(dict(reference_model(cfg).state_dict()), cfg)
    bridge = ipcbridge.connect(ipcbridge.export(weights, cfg))
    with pytest.raises(BridgeError, match=r"bf16_full_eval=True\) casts the model"):
        Trainer(model=bridge.model, args=_args(tmp_path, bf16_full_eval=True), callbacks=[BridgeCallback(bridge)])
    bridge.close()

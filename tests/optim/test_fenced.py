"""master_weights on weights an engine serves: fenced steps, and transformers.Trainer driving it."""

from __future__ import annotations

import pytest
import torch

import ipcbridge
from ipcbridge import BridgeError
from ipcbridge.optim import master_weights
from tests.helpers import reference_model, tiny_config, vllm_weights

pytestmark = pytest.mark.filterwarnings("ignore::ipcbridge.PrecisionWarning")  # heeded: master_weights below


def bf16_bridge() -> tuple[ipcbridge.Bridge, dict[str, torch.Tensor]]:
    cfg = tiny_config("llama")
    weights = {k: t.to(torch.bfloat16) for k, t in vllm_weights(reference_model(cfg), cfg).items()}
    return ipcbridge.connect(ipcbridge.export(weights, cfg)), weights


def _backward(model: torch.nn.Module) -> None:
    tokens = torch.tensor([[3, 14, 15, 92, 65, 35]])
    model(input_ids=tokens, labels=tokens).loss.backward()


def test_a_step_outside_update_is_refused_and_inside_it_writes_the_served_weights():
    bridge, weights = bf16_bridge()
    opt = master_weights(torch.optim.AdamW(bridge.model.parameters(), lr=1e-6))
    _backward(bridge.model)
    served = weights["model.layers.0.self_attn.qkv_proj.weight"].clone()
    with pytest.raises(BridgeError, match=r"update\(\)"):
        opt.step()
    assert torch.equal(served, weights["model.layers.0.self_attn.qkv_proj.weight"])  # nothing written
    assert all(s.remainder.eq(0).all() for s in opt.slots())  # nor any master
    with bridge.update():
        opt.step()
    assert bridge.weight_version == 1
    assert bridge.parameters_outside_engine() == [] and bridge.trainer_weight_bytes() == 0
    assert any(s.remainder.ne(0).any() for s in opt.slots())  # lr 1e-6: the updates live in the remainders
    bridge.close()
    with pytest.raises(BridgeError, match="closed"):
        opt.step()


def test_transformers_trainer_steps_the_wrapper_with_a_scheduler(tmp_path):
    from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup

    from ipcbridge.integrations.hf_trainer import BridgeCallback
    from tests.integrations.test_hf_trainer import PROMPT, _Data

    with ipcbridge.LocalEngine(tiny_config("llama"), device="cpu", dtype="bfloat16") as engine:
        bridge = ipcbridge.connect(engine)
        opt = master_weights(torch.optim.AdamW(bridge.model.parameters(), lr=3e-2))
        sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=4)
        args = TrainingArguments(
            output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[], use_cpu=True,
            save_strategy="no", logging_strategy="no", disable_tqdm=True,
        )
        before = engine.generate([PROMPT], max_tokens=6)[0]
        Trainer(model=bridge.model, args=args, train_dataset=_Data(), optimizers=(opt, sched),
                callbacks=[BridgeCallback(bridge)]).train()
        after = engine.generate([PROMPT], max_tokens=6)[0]
        assert after.weight_version == bridge.weight_version == 4
        assert after.token_ids.count(7) > before.token_ids.count(7)
        assert sched.get_last_lr()[0] == 0.0
        bridge.close()

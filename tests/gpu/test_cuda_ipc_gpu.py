"""The core over real CUDA IPC, on the GPU machine: `python -m pytest -m gpu tests`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import ipcbridge
from ipcbridge.logprobs import sequence_logprobs
from tests.helpers import tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PROMPT = [3, 14, 15, 92]


@pytest.fixture(scope="module")
def engine():
    with ipcbridge.LocalEngine(tiny_config("llama", vocab_size=1000, hidden_size=256, head_dim=64,
                                           intermediate_size=512), device="cuda", seed=0) as eng:
        yield eng


def test_attach_over_cuda_ipc_allocates_no_weight_memory(engine) -> None:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    bridge = ipcbridge.connect(engine)
    delta = torch.cuda.memory_allocated() - before
    report = bridge.check(prompt=PROMPT)
    print(f"\ncuda_ipc attach: {bridge.attach_seconds * 1e3:.1f} ms, memory_allocated delta {delta} B "
          f"(rotary buffers), model weights {report.model_weight_bytes} B, parity max {report.logprob_max_abs_diff}")
    assert bridge.transport == "cuda_ipc" and engine.pid != os.getpid()
    assert report.ok and report.trainer_weight_bytes == 0 == bridge.trainer_weight_bytes()
    assert delta < 0.01 * report.model_weight_bytes
    assert {p.device.type for p in bridge.model.parameters()} == {"cuda"}
    bridge.close()


def test_attached_logits_equal_the_engines_forward(engine) -> None:
    bridge = ipcbridge.connect(engine)
    completion = engine.generate([PROMPT], max_tokens=8)[0].token_ids
    ours = sequence_logprobs(bridge.model, PROMPT, completion)
    theirs = engine.score(PROMPT, completion)
    print(f"\nlogprobs trainer vs engine: max |d| = {max(abs(a - b) for a, b in zip(ours, theirs, strict=False))}")
    assert ours == theirs  # same GPU, same kernels, same bytes: bit-identical
    bridge.close()


def test_trainer_write_is_seen_in_the_next_generation(engine) -> None:
    bridge = ipcbridge.connect(engine)
    before = engine.generate([PROMPT], max_tokens=8)[0]
    head = bridge.model.lm_head.weight
    saved = head.detach().clone()
    with bridge.update(), torch.no_grad():
        head.zero_()
        head[42] = 1.0
        head[43] = -1.0
    after = engine.generate([PROMPT], max_tokens=8)[0]
    print(f"\ngreedy before {before.token_ids} (v{before.weight_version}) after {after.token_ids} (v{after.weight_version})")
    assert set(after.token_ids) <= {42, 43} and after.weight_version == before.weight_version + 1
    with bridge.update(), torch.no_grad():
        head.copy_(saved)
    assert engine.generate([PROMPT], max_tokens=8)[0].token_ids == before.token_ids
    bridge.close()


def test_optimizer_step_updates_served_weights(engine) -> None:
    bridge = ipcbridge.connect(engine)
    model = bridge.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([PROMPT + [7] * 8], device="cuda")
    loss = -torch.log_softmax(model(ids).logits[0, 3:-1].float(), -1)[:, 7].mean()
    loss.backward()
    with bridge.update():
        opt.step()
    out = engine.generate([PROMPT], max_tokens=8)[0]
    model.eval()
    assert out.token_ids == engine.generate([PROMPT], max_tokens=8)[0].token_ids
    assert engine.score(PROMPT, out.token_ids) == sequence_logprobs(model, PROMPT, out.token_ids)
    bridge.close()


def test_demo_over_cuda_ipc() -> None:
    out = subprocess.run([sys.executable, "-m", "ipcbridge", "demo", "--json", "--steps", "30"],
                         capture_output=True, text=True, timeout=300, check=True)
    s = json.loads(out.stdout)
    print("\ndemo:", out.stdout)
    assert s["transport"] == "cuda_ipc" and s["trainer_weight_bytes"] == 0
    assert s["reward_last"] > s["reward_first"] + 0.3

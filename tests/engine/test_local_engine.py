"""The embedded engine end to end: two processes, shared weights, fenced updates, faults."""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from pathlib import Path

import pytest
import torch

import ipcbridge
from ipcbridge import EngineError
from ipcbridge.engine import protocol
from ipcbridge.logprobs import greedy
from tests.helpers import reference_model, tiny_config

PROMPT = [3, 14, 15, 92]


@pytest.fixture(scope="module")
def engine():
    with ipcbridge.LocalEngine(tiny_config("llama"), seed=1, device="cpu") as eng:
        yield eng


@pytest.fixture(scope="module")
def bridge(engine):
    b = ipcbridge.connect(engine, check=True)
    yield b
    b.close()



def test_two_processes_share_the_weights(engine, bridge) -> None:
    assert engine.pid != os.getpid()
    assert bridge.transport == "shm"
    report = bridge.check(prompt=PROMPT)
    assert report.ok and report.trainer_weight_bytes == 0
    assert report.engine_tensors_used == report.engine_tensors == 15
    assert report.logprob_max_abs_diff < 1e-4


def test_greedy_and_logprobs_match_the_attached_model(engine, bridge) -> None:
    out = engine.generate([PROMPT], max_tokens=6)[0]
    assert out.token_ids == greedy(bridge.model, PROMPT, 6)
    lp = ipcbridge.bridge.sequence_logprobs(bridge.model, PROMPT, out.token_ids)
    assert torch.allclose(torch.tensor(lp), torch.tensor(out.logprobs), atol=1e-4)


def test_sampling_is_repeatable_with_a_seed(engine) -> None:
    a = engine.generate([PROMPT, [1, 2]], max_tokens=8, temperature=1.0, seed=5)
    b = engine.generate([PROMPT, [1, 2]], max_tokens=8, temperature=1.0, seed=5)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_update_changes_the_next_generation_as_the_trainer_predicts(engine, bridge) -> None:
    engine.generate([PROMPT], max_tokens=4)  # fills the prefix cache with KV of the current weights
    version = bridge.weight_version
    torch.manual_seed(0)
    with bridge.update(), torch.no_grad():
        for p in bridge.model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    assert bridge.weight_version == engine.weight_version == version + 1
    expected = greedy(bridge.model, PROMPT, 6)
    out = engine.generate([PROMPT], max_tokens=6)[0]
    assert out.weight_version == version + 1
    assert out.token_ids == expected  # a stale prefix cache would have started from the old weights' KV
    assert engine.stats()["prefix_drops"] >= 1


def test_generation_waits_for_the_fence(engine, bridge) -> None:
    paused = threading.Event()
    result = {}

    def generate() -> None:
        paused.wait(10)
        result["out"] = engine.generate([PROMPT], max_tokens=4)[0]
        result["t"] = time.monotonic()

    t = threading.Thread(target=generate)
    t.start()
    with bridge.update():
        paused.set()
        time.sleep(0.5)  # the engine is paused: the request above must wait at the gate
        with torch.no_grad():
            bridge.model.lm_head.weight.mul_(-1.0)
        t_written = time.monotonic()
    t.join(30)
    assert result["t"] > t_written
    assert result["out"].weight_version == bridge.weight_version
    assert result["out"].token_ids == greedy(bridge.model, PROMPT, 4)


def test_a_failing_step_still_resumes_the_engine(engine, bridge) -> None:
    version = bridge.weight_version
    with pytest.raises(RuntimeError, match="boom"), bridge.update():
        raise RuntimeError("boom")
    assert engine.generate([PROMPT], max_tokens=1)[0].weight_version == version + 1


def test_wrong_token_is_refused(engine) -> None:
    with pytest.raises(EngineError, match="wrong token"):
        protocol.call(engine.socket_path, "not-the-token", "ping", timeout=5)


def test_bad_prompt_is_an_error_and_the_engine_lives_on(engine) -> None:
    with pytest.raises(EngineError, match=r"token ids in \[0, 100\)"):
        engine.generate([[100000]], max_tokens=2)
    assert engine.alive and engine.generate([PROMPT], max_tokens=1)


def test_private_socket_directory(engine) -> None:
    assert stat.S_IMODE(os.stat(os.path.dirname(engine.socket_path)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(engine.socket_path).st_mode) == 0o600


def test_engine_killed_before_attach() -> None:
    eng = ipcbridge.LocalEngine(tiny_config("llama"), device="cpu")
    workdir = os.path.dirname(eng.socket_path)
    os.kill(eng.pid, signal.SIGKILL)
    eng._proc.wait(10)
    t0 = time.monotonic()
    with pytest.raises(EngineError, match="has exited"):
        ipcbridge.connect(eng)
    assert time.monotonic() - t0 < 5
    eng.close()
    assert not os.path.exists(workdir)


def test_engine_killed_while_attached() -> None:
    eng = ipcbridge.LocalEngine(tiny_config("llama"), device="cpu")
    b = ipcbridge.connect(eng)
    before = b.model(torch.tensor([PROMPT])).logits
    os.kill(eng.pid, signal.SIGKILL)
    eng._proc.wait(10)
    ran = False
    with pytest.raises(EngineError, match="exited"), b.update():
        ran = True
    assert not ran  # the step never ran against an engine that cannot be fenced
    # the trainer's views outlive the engine: the mapping stays valid, nothing crashes
    assert torch.equal(b.model(torch.tensor([PROMPT])).logits, before)
    b.close()
    eng.close()


@pytest.mark.slow
def test_hung_engine_times_out() -> None:
    eng = ipcbridge.LocalEngine(tiny_config("llama"), device="cpu", request_timeout=1.0)
    try:
        os.kill(eng.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(EngineError, match="did not answer"):
            eng.generate([PROMPT], max_tokens=1)
        assert time.monotonic() - t0 < 5
    finally:
        os.kill(eng.pid, signal.SIGCONT)
        eng.close()
    assert not eng.alive


def test_engine_from_a_local_checkpoint(tmp_path) -> None:
    cfg = tiny_config("qwen3", tied=True)
    ref = reference_model(cfg)
    ref.save_pretrained(tmp_path)
    with ipcbridge.LocalEngine(tmp_path, device="cpu") as eng:
        assert eng.generate([PROMPT], max_tokens=5)[0].token_ids == greedy(ref, PROMPT, 5)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        ipcbridge.LocalEngine(tmp_path / "missing")


@pytest.mark.slow
def test_engine_exits_and_cleans_up_when_its_trainer_dies() -> None:
    import subprocess
    import sys

    code = (
        "import sys, os, ipcbridge\n"
        "sys.path.insert(0, os.path.join(os.getcwd(), 'tests'))\n"
        "from tests.helpers import tiny_config\n"
        "e = ipcbridge.LocalEngine(tiny_config('llama'), device='cpu')\n"
        "print(e.pid, os.path.dirname(e.socket_path), flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    pid_s, workdir = out.stdout.split()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid_s}"):
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid_s}") or Path(f"/proc/{pid_s}/stat").read_text().split()[2] == "Z"
    assert not os.path.exists(workdir)

"""Each way a user broke the fence, against the embedded engine: nested updates, two bridges, Ctrl-C,
a hung trainer, and generating from the thread that holds the pause."""

from __future__ import annotations

import threading
import time

import pytest

import ipcbridge
from ipcbridge import BridgeError, FenceError
from ipcbridge.fence import Lease
from tests.helpers import tiny_config

PROMPT = [3, 14, 15, 92]


@pytest.fixture(scope="module")
def engine():
    with ipcbridge.LocalEngine(tiny_config("llama"), device="cpu", request_timeout=1.5) as eng:
        yield eng


def _not_paused(engine) -> None:
    assert engine.paused_by is None
    engine.generate([PROMPT], max_tokens=1)  # and it answers


def test_update_nested_in_update_raises_and_the_outer_fence_holds(engine) -> None:
    bridge = ipcbridge.connect(engine)
    with bridge.update():
        with pytest.raises(BridgeError, match="nested in update"), bridge.update():
            pass
        assert engine.paused_by is not None  # the inner refusal did not resume the engine
    _not_paused(engine)
    bridge.close()


def test_a_second_bridges_update_inside_the_first_raises_at_once(engine) -> None:
    first, second = ipcbridge.connect(engine), ipcbridge.connect(engine)
    with first.update():
        t0 = time.monotonic()
        with pytest.raises(FenceError, match="in this very thread"), second.update():
            pass
        assert time.monotonic() - t0 < 1.0
        assert engine.paused_by is not None and "bridge" in engine.paused_by
    _not_paused(engine)
    first.close(), second.close()


def test_two_bridges_never_reuse_a_version(engine) -> None:
    a, b = ipcbridge.connect(engine), ipcbridge.connect(engine)
    seen = [engine.weight_version]
    for bridge in (a, b, a, b, b):
        with bridge.update():
            pass
        seen.append(bridge.weight_version)
        assert engine.weight_version == bridge.weight_version
    assert seen == sorted(set(seen)) and seen[-1] == seen[0] + 5
    a.close(), b.close()


def test_generate_from_the_thread_holding_the_pause_fails_at_once(engine) -> None:
    bridge = ipcbridge.connect(engine)
    with bridge.update():
        t0 = time.monotonic()
        with pytest.raises(FenceError, match=r"this very thread.*outside the `with bridge\.update"):
            engine.generate([PROMPT], max_tokens=1)
        assert time.monotonic() - t0 < 1.0
    bridge.close()


def _hold_pause(bridge, seconds: float, started: threading.Event) -> threading.Thread:
    def run() -> None:
        with bridge.update():
            started.set()
            time.sleep(seconds)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert started.wait(10)
    return t


def test_a_request_waiting_on_a_pause_hears_who_holds_it(engine) -> None:
    holder = ipcbridge.connect(engine)
    t = _hold_pause(holder, 4.0, threading.Event())
    t0 = time.monotonic()
    with pytest.raises(FenceError, match=r"paused by bridge .*this request waited 1\.5s"):
        engine.generate([PROMPT], max_tokens=1)
    assert time.monotonic() - t0 < 3.0  # the engine's answer, well before the client's own deadline
    t.join(10)
    _not_paused(engine)
    holder.close()


def test_ctrl_c_while_waiting_for_the_pause_leaves_the_engine_running(engine, monkeypatch) -> None:
    holder, waiter = ipcbridge.connect(engine), ipcbridge.connect(engine, wait=30.0)
    t = _hold_pause(holder, 1.5, threading.Event())
    real_pause, answers = waiter.endpoint.pause, []

    def pause_then_ctrl_c(lease, wait) -> None:
        # The request reaches the engine and waits at its gate; Ctrl-C reaches the trainer meanwhile. (A
        # signal from another thread, _thread.interrupt_main, is delivered late on a loaded machine, which
        # once let the pause be granted first; this is the same moment, made deterministic.)
        def send() -> None:
            try:
                answers.append(real_pause(lease, wait))
            except Exception as e:
                answers.append(e)

        threading.Thread(target=send, daemon=True).start()
        time.sleep(0.3)
        raise KeyboardInterrupt

    monkeypatch.setattr(waiter.endpoint, "pause", pause_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt), waiter.update():
        pytest.fail("the block must not run")
    t.join(10)
    deadline = time.monotonic() + 10
    while not answers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert answers and isinstance(answers[0], FenceError)  # the engine withdrew it: never granted
    _not_paused(engine)
    holder.close(), waiter.close()


def test_a_hung_trainers_lease_expires_and_the_engine_resumes_by_itself(engine) -> None:
    bridge = ipcbridge.connect(engine, lease_seconds=0.5)
    before = engine.weight_version
    started, errors = threading.Event(), []

    def hang() -> None:
        try:
            with bridge.update():
                started.set()
                time.sleep(2.0)
        except FenceError as e:
            errors.append(e)

    t = threading.Thread(target=hang, daemon=True)
    t.start()
    assert started.wait(10)
    out = engine.generate([PROMPT], max_tokens=1)[0]  # waits for the expiry (0.5s), not the block (2s)
    assert out.weight_version == before + 1 == engine.weight_version
    t.join(10)
    assert errors and "ran out and the engine resumed by itself" in str(errors[0])
    _not_paused(engine)
    bridge.close()


def test_renew_keeps_a_long_update_fenced(engine) -> None:
    bridge = ipcbridge.connect(engine, lease_seconds=1.5)
    with bridge.update():
        for _ in range(4):  # 2 s in all, longer than the lease: only the renewals keep it
            time.sleep(0.5)
            bridge.renew()
        assert engine.paused_by is not None
    assert engine.weight_version == bridge.weight_version
    bridge.close()


def test_an_error_raised_in_the_engine_keeps_its_type(engine) -> None:
    with pytest.raises(FenceError, match="not the one holding its pause"):
        engine._call("resume", {"lease": Lease.new("nobody", 1.0).to_dict()})

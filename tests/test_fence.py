"""The fence's parts on their own: LeaseGate (owned, leased pauses) and Fence (pause, run, sync, resume)."""

from __future__ import annotations

import threading
import time

import pytest

from ipcbridge import FenceError
from ipcbridge.fence import Fence, Lease, LeaseGate


class Engine:
    """What a gate resumes: a version it moves forward, and a record of why."""

    def __init__(self) -> None:
        self.version = 0
        self.reasons: list[str] = []

    def resume(self, reason: str) -> int:
        self.version += 1
        self.reasons.append(reason)
        return self.version


def lease(holder: str = "trainer", seconds: float = 30.0, caller: str | None = None) -> Lease:
    made = Lease.new(holder, seconds)
    return made if caller is None else Lease(made.id, holder, seconds, caller)


def in_thread(fn, *args):
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["result"] = fn(*args)
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_only_the_holder_resumes_and_every_release_moves_the_version() -> None:
    engine = Engine()
    gate = LeaseGate(engine.resume)
    a = lease("a")
    gate.acquire(a, wait=1)
    assert gate.holder == "a" and gate.paused
    with pytest.raises(FenceError, match="not the one holding its pause"):
        gate.release("someone-else")
    assert gate.release(a.id) == 1
    b = lease("b")
    gate.acquire(b, wait=1)
    assert gate.release(b.id) == 2 and not gate.paused


def test_a_second_lease_from_the_same_thread_fails_at_once() -> None:
    gate = LeaseGate(Engine().resume)
    gate.acquire(lease("outer"), wait=1)
    t0 = time.monotonic()
    with pytest.raises(FenceError, match="already paused by outer in this very thread"):
        gate.acquire(lease("inner"), wait=30)
    assert time.monotonic() - t0 < 1


def test_a_second_lease_from_another_thread_waits_then_names_the_holder() -> None:
    gate = LeaseGate(Engine().resume)
    first = lease("first")
    gate.acquire(first, wait=1)
    t, out = in_thread(gate.acquire, lease("second", caller="other/1"), 0.2)
    t.join(5)
    assert isinstance(out["error"], FenceError) and "paused by first" in str(out["error"])
    t, out = in_thread(gate.acquire, lease("third", caller="other/2"), 5.0)
    time.sleep(0.1)
    gate.release(first.id)
    t.join(5)
    assert "error" not in out and gate.holder == "third"


def test_generation_waits_at_the_gate_and_the_holder_thread_is_refused() -> None:
    gate = LeaseGate(Engine().resume)
    held = lease("trainer")
    gate.acquire(held, wait=1)
    with pytest.raises(FenceError, match="this very thread"), gate.enter(held.caller, wait=30):
        pass
    with pytest.raises(FenceError, match=r"paused by trainer .*this request waited 0\.1s"), gate.enter("x/1", 0.1):
        pass
    gate.release(held.id)
    with gate.enter("x/1", wait=0.1):
        pass


def test_an_unrenewed_lease_expires_and_the_engine_resumes_by_itself() -> None:
    engine = Engine()
    gate = LeaseGate(engine.resume)
    short = lease("hung trainer", seconds=0.2)
    gate.acquire(short, wait=1)
    gate.renew(short.id)
    with gate.enter("x/1", wait=5):  # waits for the expiry, then runs
        assert engine.version == 1 and "expired" in engine.reasons[0]
    with pytest.raises(FenceError, match="ran out and the engine resumed by itself"):
        gate.release(short.id)


def test_renewing_keeps_the_lease() -> None:
    engine = Engine()
    gate = LeaseGate(engine.resume)
    held = lease("slow step", seconds=1.0)
    gate.acquire(held, wait=1)
    for _ in range(4):  # 1.6 s in all, longer than the lease: only the renewals keep it
        time.sleep(0.4)
        gate.renew(held.id)
    assert gate.holder == "slow step" and engine.version == 0
    assert gate.release(held.id) == 1


def test_cancelling_a_waiting_request_never_takes_the_pause() -> None:
    gate = LeaseGate(Engine().resume)
    first, waiting = lease("first"), lease("waiting", caller="other/1")
    gate.acquire(first, wait=1)
    t, out = in_thread(gate.acquire, waiting, 10.0)
    time.sleep(0.1)
    gate.cancel(waiting.id)
    t.join(5)
    assert isinstance(out["error"], FenceError) and "cancelled" in str(out["error"])
    gate.release(first.id)
    assert not gate.paused


def test_a_drain_that_times_out_leaves_the_gate_open() -> None:
    gate = LeaseGate(Engine().resume)
    entered, leave = threading.Event(), threading.Event()

    def generate() -> None:
        with gate.enter("gen/1", wait=1):
            entered.set()
            leave.wait(5)

    t = threading.Thread(target=generate, daemon=True)
    t.start()
    entered.wait(5)
    with pytest.raises(FenceError, match=r"did not finish within 0\.1s"):
        gate.acquire(lease("trainer"), wait=1, drain=0.1)
    assert not gate.paused
    leave.set()
    t.join(5)
    gate.acquire(lease("trainer"), wait=1, drain=1)
    assert gate.paused


def test_lease_fields_are_validated() -> None:
    with pytest.raises(FenceError, match="seconds must be a positive number"):
        Lease("id", "holder", 0.0)
    with pytest.raises(FenceError, match=r"lease\.holder"):
        Lease("id", "", 1.0)


class GateEndpoint:
    """An endpoint whose engine is a LeaseGate in this process."""

    def __init__(self, fail_pause: BaseException | None = None) -> None:
        self.engine = Engine()
        self.gate = LeaseGate(self.engine.resume)
        self.fail_pause = fail_pause

    def pause(self, lease: Lease, wait: float) -> None:
        self.gate.acquire(lease, wait)
        if self.fail_pause is not None:
            raise self.fail_pause

    def renew(self, lease: Lease) -> None:
        self.gate.renew(lease.id)

    def resume(self, lease: Lease) -> int:
        return self.gate.release(lease.id)

    def cancel(self, lease: Lease) -> None:
        self.gate.cancel(lease.id)


def test_fence_runs_sync_then_resume_and_reports_the_engines_version() -> None:
    ep, synced = GateEndpoint(), []
    fence = Fence(ep, holder="b", version=0, sync=lambda: synced.append(ep.gate.paused))
    for _ in range(2):
        with fence.hold():
            assert ep.gate.paused
    assert synced == [True, True] and fence.version == 2 and not ep.gate.paused and len(fence.seconds) == 2


def test_nested_hold_raises_and_the_outer_fence_still_completes() -> None:
    ep = GateEndpoint()
    fence = Fence(ep, holder="b", version=0, sync=lambda: None)
    with fence.hold():
        with pytest.raises(FenceError, match="nested"), fence.hold():
            pass
        assert ep.gate.paused  # the inner refusal did not resume the engine
    assert not ep.gate.paused and fence.version == 1


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_error_in_the_block_still_syncs_and_resumes(error: BaseException) -> None:
    ep, synced = GateEndpoint(), []
    fence = Fence(ep, holder="b", version=0, sync=lambda: synced.append(True))
    with pytest.raises(type(error)), fence.hold():
        raise error
    assert synced == [True] and not ep.gate.paused and fence.version == 1


def test_an_error_in_sync_or_commit_still_resumes() -> None:
    ep = GateEndpoint()

    def fail() -> None:
        raise RuntimeError("device lost")

    with pytest.raises(RuntimeError, match="device lost"), Fence(ep, holder="b", version=0, sync=fail).hold():
        pass
    assert not ep.gate.paused
    with pytest.raises(RuntimeError, match="device lost"), Fence(ep, holder="b", version=0, sync=lambda: None).hold(commit=fail):
        pass
    assert not ep.gate.paused and ep.engine.version == 2


@pytest.mark.parametrize("error", [RuntimeError("refused"), KeyboardInterrupt()])
def test_an_error_in_pause_cancels_the_request(error: BaseException) -> None:
    ep = GateEndpoint(fail_pause=error)
    with pytest.raises(type(error)), Fence(ep, holder="b", version=0, sync=lambda: None).hold():
        pytest.fail("the block must not run")
    assert not ep.gate.paused


def test_renew_outside_a_fence_is_an_error() -> None:
    with pytest.raises(FenceError, match="outside"):
        Fence(GateEndpoint(), holder="b", version=0, sync=lambda: None).renew()


@pytest.mark.parametrize(("kw", "message"), [({"lease_seconds": 0}, "lease_seconds must be a positive number"),
                                             ({"wait": -1}, "wait must be a number >= 0"),
                                             ({"lease_seconds": "60"}, "lease_seconds must be")])
def test_bad_fence_settings_are_refused_when_the_bridge_is_made(kw, message) -> None:
    with pytest.raises(FenceError, match=message):
        Fence(GateEndpoint(), holder="b", version=0, sync=lambda: None, **kw)

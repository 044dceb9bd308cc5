"""The double-buffered stream protocol over an in-memory group: ordering, buffer reuse, failure, empty plans."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from ipcbridge.stream.plan import pack, plan_buckets
from ipcbridge.stream.protocol import receive, send
from tests.helpers import run_pair


class Wire:
    """Two ranks in one process. A broadcast stays in flight, reading the sender's buffer itself, until the
    receiver has copied it: a sender that reused a buffer too early would corrupt what the receiver gets."""

    def __init__(self, timeout: float = 10.0) -> None:
        self.cv = threading.Condition()
        self.sent: dict[int, torch.Tensor] = {}
        self.consumed: set[int] = set()
        self.log: list[str] = []
        self.timeout = timeout

    def record(self, event: str) -> None:
        with self.cv:
            self.log.append(event)


class Work:
    def __init__(self, wait) -> None:
        self._wait = wait

    def wait(self) -> bool:
        self._wait()
        return True


class MemoryGroup:
    def __init__(self, wire: Wire, rank: int) -> None:
        self.wire, self.rank, self.seq = wire, rank, 0

    def broadcast(self, tensor: torch.Tensor, src: int) -> Work:
        seq, self.seq = self.seq, self.seq + 1
        w = self.wire
        w.record(f"{'send' if self.rank == src else 'post'} {seq}")
        if self.rank == src:
            with w.cv:
                w.sent[seq] = tensor  # no copy: in flight until the receiver has read it
                w.cv.notify_all()

            def wait_sent() -> None:
                with w.cv:
                    if not w.cv.wait_for(lambda: seq in w.consumed, w.timeout):
                        raise RuntimeError(f"broadcast {seq} timed out")
                w.record(f"sent {seq}")
            return Work(wait_sent)

        def wait_received() -> None:
            with w.cv:
                if not w.cv.wait_for(lambda: seq in w.sent, w.timeout):
                    raise RuntimeError(f"broadcast {seq} timed out")
                tensor.copy_(w.sent.pop(seq))
                w.consumed.add(seq)
                w.cv.notify_all()
            w.record(f"received {seq}")
        return Work(wait_received)


def test_send_receive_round_trip_with_double_buffering_order() -> None:
    torch.manual_seed(0)
    tensors = {f"t{i}": torch.randn(17 + 5 * i) for i in range(9)}
    plan = plan_buckets(tensors, bucket_bytes=256)  # one tensor per bucket: 9 buckets
    n = len(plan.buckets)
    wire = Wire()
    got: dict[str, torch.Tensor] = {}

    def packer(bucket, out) -> None:
        wire.record(f"pack {plan.buckets.index(bucket)}")
        pack(tensors, bucket, out)

    def load(views) -> None:
        (name,) = views
        wire.record(f"load {plan.buckets.index(next(b for b in plan.buckets if b.names == [name]))}")
        got.update({k: v.clone() for k, v in views.items()})

    sent, received = run_pair(lambda: send(MemoryGroup(wire, 0), packer, plan),
                              lambda: receive(MemoryGroup(wire, 1), plan, load))
    assert sent == received == plan.wire_bytes
    assert all(torch.equal(got[k], t) for k, t in tensors.items())
    at = {e: i for i, e in enumerate(wire.log)}
    for i in range(n - 1):
        assert at[f"post {i + 1}"] < at[f"load {i}"]  # the receiver's wire is busy while it loads
        assert at[f"pack {i + 1}"] < at[f"sent {i}"]  # the sender packs while bucket i is in flight
    for i in range(2, n):
        assert at[f"sent {i - 2}"] < at[f"pack {i}"]  # a buffer is reused only after its broadcast


def test_send_accepts_tensors_by_name() -> None:
    tensors = {"a": torch.randn(100), "b": torch.randn(3, 3).to(torch.bfloat16)}
    plan = plan_buckets(tensors, bucket_bytes=256)
    wire, got = Wire(), {}
    run_pair(lambda: send(MemoryGroup(wire, 0), tensors, plan),
             lambda: receive(MemoryGroup(wire, 1), plan, lambda v: got.update({k: t.clone() for k, t in v.items()})))
    assert all(torch.equal(got[k], t) for k, t in tensors.items())


# ---- failures: six one-tensor buckets, a load that fails at one of them, a sender that may stop early ----------

SIX = {f"t{i}": torch.arange(40, dtype=torch.float32) + 100 * i for i in range(6)}
SIX_PLAN = plan_buckets(SIX, bucket_bytes=256)  # one tensor per bucket


def failing_at(name: str, loaded: list[str] | None = None) -> Callable[[dict[str, torch.Tensor]], None]:
    def load(views) -> None:
        if loaded is not None:
            loaded.extend(views)
        if name in views:
            raise ValueError("disk full")
    return load


def send_first(wire: Wire, k: int) -> Callable[[], int]:
    """A sender that stops after ``k`` buckets."""
    return lambda: send(MemoryGroup(wire, 0), SIX, plan_buckets({n: SIX[n] for n in list(SIX)[:k]}, 256))


def test_a_failing_load_drains_the_push_so_the_sender_completes_then_raises() -> None:
    # Note [a failed load drains the push]: NCCL would leave the sender blocked until its timeout otherwise.
    wire, loaded = Wire(timeout=5.0), []
    sent, received = run_pair(lambda: send(MemoryGroup(wire, 0), SIX, SIX_PLAN),
                              lambda: receive(MemoryGroup(wire, 1), SIX_PLAN, failing_at("t2", loaded)))
    assert isinstance(received, ValueError) and str(received) == "disk full"
    assert sent == SIX_PLAN.wire_bytes  # every bucket was received: the sender's push completed
    assert f"received {len(SIX_PLAN.buckets) - 1}" in wire.log
    assert loaded == ["t0", "t1", "t2"]  # nothing is loaded after the failure


def test_a_load_failure_stays_the_error_when_the_drained_rest_fails_too() -> None:
    wire = Wire(timeout=0.5)
    _, received = run_pair(send_first(wire, 3), lambda: receive(MemoryGroup(wire, 1), SIX_PLAN, failing_at("t1")))
    assert isinstance(received, ValueError) and str(received) == "disk full"
    assert isinstance(received.__context__, RuntimeError) and "timed out" in str(received.__context__)


def test_without_drain_a_failing_load_raises_at_once() -> None:
    # The shared-buffer channel: its trainer hears of the failure by itself (Note [who notices a failure]).
    wire = Wire(timeout=0.5)
    sent, received = run_pair(lambda: send(MemoryGroup(wire, 0), SIX, SIX_PLAN),
                              lambda: receive(MemoryGroup(wire, 1), SIX_PLAN, failing_at("t2"), drain=False))
    assert isinstance(received, ValueError)
    assert "received 3" in wire.log and "post 4" not in wire.log  # posted ones drained, no more
    assert isinstance(sent, RuntimeError)  # this in-memory sender times out; a real channel is interrupted


def test_a_failing_broadcast_stops_the_receiver_after_draining_its_posted_broadcasts() -> None:
    wire = Wire(timeout=0.5)
    _, received = run_pair(send_first(wire, 3), lambda: receive(MemoryGroup(wire, 1), SIX_PLAN, lambda views: None))
    assert isinstance(received, RuntimeError) and "timed out" in str(received)
    assert "post 4" in wire.log and "received 2" in wire.log and "received 3" not in wire.log


def test_empty_plan_sends_nothing() -> None:
    plan = plan_buckets({}, 64)
    assert plan.buffer_bytes == 0 and not plan.buckets
    assert send(MemoryGroup(Wire(), 0), {}, plan) == 0
    assert receive(MemoryGroup(Wire(), 1), plan, lambda v: None) == 0

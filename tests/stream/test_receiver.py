"""The engine's side of a stream, in process: plan checks, in-place loads, refusals, and closing."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from ipcbridge import ManifestError
from ipcbridge.stream import protocol
from ipcbridge.stream.group import TorchGroup, master_store
from ipcbridge.stream.ipc import IpcStreamReceiver
from ipcbridge.stream.plan import plan_buckets
from ipcbridge.stream.receiver import StreamReceiver
from tests.helpers import run_pair


def engine_weights() -> dict[str, torch.Tensor]:
    return {"embed": torch.zeros(50, 8), "norm": torch.zeros(8), "head": torch.zeros(50, 8, dtype=torch.bfloat16)}


def connect(receiver: StreamReceiver, tensors: dict[str, torch.Tensor], stream_id: str = "s1",
            bucket_bytes: int = 1024) -> TorchGroup:
    """Open a stream into ``receiver`` as the trainer does: serve the store, let the engine init, join as rank 0."""
    plan = plan_buckets(tensors, bucket_bytes)
    store = master_store("127.0.0.1", 10)
    init = threading.Thread(target=receiver.init, args=(stream_id, "127.0.0.1", store.port, "gloo", 10, plan.to_dict()))
    init.start()
    store.wait([protocol.READY_KEY])
    group = TorchGroup.join(store, 0, 2, "gloo", 10)
    init.join(30)
    assert receiver.group is not None and receiver.stream_id == stream_id
    return group


@pytest.mark.parametrize("parameters", [False, True], ids=["tensors", "parameters-requiring-grad"])
def test_a_push_is_copied_into_the_engine_weights_in_place(parameters: bool) -> None:
    # vLLM's RMSNorm weights are nn.Parameters that require grad: the in-place load must not trip autograd.
    weights = engine_weights()
    if parameters:
        weights = {n: torch.nn.Parameter(t) if t.is_floating_point() else t for n, t in weights.items()}
    ptrs = {n: t.data_ptr() for n, t in weights.items()}
    counters = {"stream_receives": 0, "stream_bytes": 0}
    receiver = StreamReceiver(weights, torch.device("cpu"), counters)
    new = {n: torch.randn(t.shape).to(t.dtype) for n, t in weights.items()}
    trainer = connect(receiver, new)
    try:
        sent, got = run_pair(lambda: protocol.send(trainer, new, receiver.plan),
                             lambda: receiver.receive("s1", paused=True, lock=threading.Lock()))
        assert sent == got["bytes"] == receiver.plan.wire_bytes and got["seconds"] > 0
        assert all(torch.equal(weights[n], t) and weights[n].data_ptr() == ptrs[n] for n, t in new.items())
        assert counters == {"stream_receives": 1, "stream_bytes": sent}
    finally:
        receiver.close()
        trainer.close()
    assert receiver.group is None


def test_a_plan_that_does_not_fit_is_refused_before_joining() -> None:
    receiver = StreamReceiver(engine_weights(), torch.device("cpu"))
    other = {**engine_weights(), "extra": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"does not cover this engine's weights: missing \[\], unknown \['extra'\]"):
        receiver.init("s", "127.0.0.1", 1, "gloo", 1, plan_buckets(other).to_dict())
    wrong = {**engine_weights(), "norm": torch.zeros(8, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"norm: the stream plan has float64 \[8\], this engine holds torch.float32"):
        receiver.init("s", "127.0.0.1", 1, "gloo", 1, plan_buckets(wrong).to_dict())
    with pytest.raises(ManifestError, match=r"expected 'ipcbridge\.stream_plan'"):
        receiver.init("s", "127.0.0.1", 1, "gloo", 1, {"format": "ipcbridge.manifest"})
    assert receiver.group is None


def test_receive_refuses_another_stream_and_an_engine_that_is_not_paused() -> None:
    weights = engine_weights()
    receiver = StreamReceiver(weights, torch.device("cpu"))
    trainer = connect(receiver, weights)
    try:
        with pytest.raises(RuntimeError, match=r"not open in the engine .*replaced by a newer"):
            receiver.receive("older", paused=True, lock=threading.Lock())
        assert receiver.group is not None  # a stale request leaves the current stream alone
        receiver.close("older")
        assert receiver.group is not None
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"failed, stream closed: RuntimeError: .*only while the engine is paused"):
            receiver.receive("s1", paused=False, lock=threading.Lock())
        assert receiver.group is None  # the trainer is already sending: closing fails it at once
        assert time.monotonic() - t0 < 5
    finally:
        receiver.close()
        trainer.close()


def test_close_waits_only_as_long_as_asked_for_a_running_operation() -> None:
    receiver = StreamReceiver(engine_weights(), torch.device("cpu"))
    receiver._lock.acquire()  # a stream operation in flight
    try:
        t0 = time.monotonic()
        receiver.close(wait=0.1)
        assert time.monotonic() - t0 < 2
    finally:
        receiver._lock.release()


@pytest.mark.parametrize("receiver_class", [StreamReceiver, IpcStreamReceiver])
def test_a_failed_load_over_a_group_lets_the_trainer_finish_its_push(receiver_class, monkeypatch) -> None:
    # Note [a failed load drains the push]; the vLLM worker's receiver (IpcStreamReceiver) drains on a group too.
    weights = engine_weights()
    receiver = receiver_class(weights, torch.device("cpu"))
    new = {n: torch.randn(t.shape).to(t.dtype) for n, t in weights.items()}
    trainer = connect(receiver, new, bucket_bytes=256)
    assert len(receiver.plan.buckets) > 2
    loads = []

    def failing_load(views) -> None:
        loads.append(list(views))
        raise ValueError("the copy failed")

    monkeypatch.setattr(receiver, "_load", failing_load)
    try:
        sent, got = run_pair(lambda: protocol.send(trainer, new, receiver.plan),
                             lambda: receiver.receive("s1", paused=True, lock=threading.Lock()))
        assert sent == receiver.plan.wire_bytes  # the push completed: no broadcast left waiting for a peer
        assert isinstance(got, RuntimeError) and "stream closed: ValueError: the copy failed" in str(got)
        assert len(loads) == 1 and receiver.group is None
    finally:
        receiver.close()
        trainer.close()

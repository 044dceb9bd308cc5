"""Real gloo process groups (two ranks in two threads), backend checks, NCCL on two GPUs, private torch APIs."""

from __future__ import annotations

import datetime
import logging
import re
import threading
import time

import pytest
import torch

from ipcbridge import BridgeError
from ipcbridge.stream import group, protocol
from ipcbridge.stream.group import TorchGroup, check_backend, client_store, master_store
from ipcbridge.stream.plan import plan_buckets
from tests.helpers import mixed_tensors, run_pair

MIXED = mixed_tensors()


def gloo_pair(timeout: float = 10.0) -> tuple[TorchGroup, TorchGroup]:
    store = master_store("127.0.0.1", timeout)
    groups: dict[int, TorchGroup] = {}

    def join(rank: int) -> None:
        s = store if rank == 0 else client_store("127.0.0.1", store.port, timeout)
        groups[rank] = TorchGroup.join(s, rank, 2, "gloo", timeout)

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return groups[0], groups[1]


def test_gloo_groups_stream_without_touching_the_default_group() -> None:
    import torch.distributed as dist

    torch.manual_seed(1)
    tensors = {**MIXED, "big": torch.randn(3000)}
    plan = plan_buckets(tensors, bucket_bytes=1024)
    g0, g1 = gloo_pair()
    got: dict[str, torch.Tensor] = {}
    try:
        sent, received = run_pair(lambda: protocol.send(g0, tensors, plan),
                                  lambda: protocol.receive(g1, plan, lambda v: got.update({k: t.clone() for k, t in v.items()})))
        assert sent == received == plan.wire_bytes
        assert all(torch.equal(got[k], t) for k, t in tensors.items())
        assert not dist.is_initialized()
    finally:
        g0.close()
        g1.close()
    with pytest.raises(BridgeError, match="closed"):
        g0.broadcast(torch.zeros(1, dtype=torch.uint8), 0)


def test_gloo_receiver_death_reaches_the_sender_at_once_not_at_the_timeout() -> None:
    tensors = {f"t{i}": torch.randn(1 << 18) for i in range(8)}  # 1 MiB each: sends block on the socket
    plan = plan_buckets(tensors, bucket_bytes=1 << 20)
    first_two = plan_buckets({n: tensors[n] for n in list(tensors)[:2]}, bucket_bytes=1 << 20)
    g0, g1 = gloo_pair(timeout=30.0)

    def receive_two_then_die() -> None:
        try:
            protocol.receive(g1, first_two, lambda views: None)
        finally:
            g1.close(abort=True)  # what a failing engine does

    t0 = time.monotonic()
    sent, _ = run_pair(lambda: protocol.send(g0, tensors, plan), receive_two_then_die)
    g0.close(abort=True)
    assert isinstance(sent, RuntimeError) and ("closed" in str(sent) or "reset" in str(sent))
    assert time.monotonic() - t0 < 10


def test_gloo_load_failure_lets_the_push_complete_then_reports() -> None:
    # Note [a failed load drains the push]: the sender finishes at wire speed and the engine's error is reported.
    tensors = {f"t{i}": torch.randn(1 << 18) for i in range(8)}
    plan = plan_buckets(tensors, bucket_bytes=1 << 20)
    g0, g1 = gloo_pair(timeout=30.0)

    def load(views) -> None:
        if "t1" in views:
            raise ValueError("bad load")

    t0 = time.monotonic()
    try:
        sent, received = run_pair(lambda: protocol.send(g0, tensors, plan), lambda: protocol.receive(g1, plan, load))
    finally:
        g0.close()
        g1.close()
    assert isinstance(received, ValueError) and sent == plan.wire_bytes
    assert time.monotonic() - t0 < 10


def test_check_backend() -> None:
    assert check_backend("gloo", "cpu") == "gloo"
    with pytest.raises(BridgeError, match="carries CUDA buffers only"):
        check_backend("nccl", "cpu")
    with pytest.raises(BridgeError, match="unknown stream backend 'mpi'"):
        check_backend("mpi", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two distinct GPUs for two ranks")
def test_nccl_streams_between_two_gpus() -> None:
    store = master_store("127.0.0.1", 60)
    groups: dict[int, TorchGroup] = {}

    def join(rank: int) -> None:
        torch.cuda.set_device(rank)
        s = store if rank == 0 else client_store("127.0.0.1", store.port, 60)
        groups[rank] = TorchGroup.join(s, rank, 2, "nccl", 60)

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    tensors = {f"t{i}": torch.randn(1000 + i, device="cuda:0").to(torch.bfloat16) for i in range(10)}
    plan = plan_buckets(tensors, bucket_bytes=4096)
    got: dict[str, torch.Tensor] = {}

    def receive() -> int:
        torch.cuda.set_device(1)
        n = protocol.receive(groups[1], plan, lambda v: got.update({k: t.clone() for k, t in v.items()}), device="cuda:1")
        torch.cuda.synchronize(1)
        return n

    def send() -> int:
        torch.cuda.set_device(0)
        return protocol.send(groups[0], tensors, plan, device="cuda:0")

    try:
        sent, received = run_pair(send, receive)
        assert sent == received == plan.wire_bytes
        assert all(torch.equal(got[k].cpu(), t.cpu()) for k, t in tensors.items())
    finally:
        groups[0].close()
        groups[1].close()


# ---- private torch APIs: each behind one function, a BridgeError naming torch if a release drops it -------


def test_the_private_torch_apis_exist_on_this_torch() -> None:
    import torch.distributed as dist

    opts = group._gloo_options(5.0, dist.ProcessGroupGloo.create_device(hostname="127.0.0.1"))
    assert opts._timeout == datetime.timedelta(seconds=5) and len(opts._devices) == 1
    calls = []

    class OldNCCL:  # older torch binds only the private name
        def _shutdown(self) -> None:
            calls.append("_shutdown")

    class NewNCCL(OldNCCL):
        def shutdown(self) -> None:
            calls.append("shutdown")

    group._shutdown(OldNCCL())
    group._shutdown(NewNCCL())
    assert calls == ["_shutdown", "shutdown"]  # the public one wins where it exists


def _names_torch(what: str) -> str:
    return re.escape(f"torch {torch.__version__} has no {what}, a private torch API")


class _OptionsWithoutDevices:
    _timeout = None


@pytest.mark.parametrize(("patch", "what"), [
    (lambda mp, gloo: mp.delattr(gloo, "_Options"), "ProcessGroupGloo._Options"),
    (lambda mp, gloo: mp.setattr(gloo, "_Options", _OptionsWithoutDevices), "ProcessGroupGloo._Options._devices"),
])
def test_a_gloo_options_api_torch_dropped_is_a_bridge_error_naming_torch(monkeypatch, patch, what) -> None:
    import torch.distributed as dist

    patch(monkeypatch, dist.ProcessGroupGloo)
    with pytest.raises(BridgeError, match=_names_torch(what)):
        group._gloo_options(5.0, None)
    store = master_store("127.0.0.1", 5)
    t0 = time.monotonic()
    with pytest.raises(BridgeError, match=_names_torch(what)):  # before any connection is attempted
        TorchGroup.join(store, 0, 2, "gloo", 5)
    assert time.monotonic() - t0 < 5


def test_an_nccl_shutdown_torch_dropped_is_a_bridge_error_naming_torch(caplog) -> None:
    with pytest.raises(BridgeError, match=_names_torch(r"ProcessGroupNCCL.shutdown (or ._shutdown)")):
        group._shutdown(object())
    g = TorchGroup(object(), None, "nccl", 0, 2)
    with caplog.at_level(logging.WARNING, logger=group.__name__):
        g.close()  # closing logs it rather than raising: the group is dropped either way
    assert g.closed and torch.__version__ in caplog.text


class _FakeNCCL:
    """What ``_nccl_options`` touches of ``ProcessGroupNCCL`` (absent from CPU builds of torch)."""

    class Options:
        def __init__(self, is_high_priority_stream: bool = False) -> None:
            self.is_high_priority_stream = is_high_priority_stream
            self._timeout = None


def test_nccl_groups_run_on_a_high_priority_stream_with_the_timeout(monkeypatch) -> None:
    """Note [NCCL on a high-priority stream]: the broadcasts' blocks go before the copies beside them."""
    import datetime

    import torch.distributed as dist

    monkeypatch.setattr(dist, "ProcessGroupNCCL", _FakeNCCL, raising=False)
    opts = group._nccl_options(7.0)
    assert opts.is_high_priority_stream and opts._timeout == datetime.timedelta(seconds=7)

    class NoTimeout(_FakeNCCL.Options):
        def __init__(self, is_high_priority_stream: bool = False) -> None:
            self.is_high_priority_stream = is_high_priority_stream

    monkeypatch.setattr(_FakeNCCL, "Options", NoTimeout)
    with pytest.raises(BridgeError, match=_names_torch("ProcessGroupNCCL.Options._timeout")):
        group._nccl_options(7.0)


class _Work:
    """An NCCL work as torch has it: completion polled, ``wait()`` blocking."""

    def __init__(self, done_after: int) -> None:
        self.polls, self.done_after, self.waited_when = 0, done_after, None

    def is_completed(self) -> bool:
        self.polls += 1
        return self.polls > self.done_after

    def wait(self) -> bool:
        self.waited_when = self.polls
        return True


def test_a_broadcast_is_polled_to_completion_before_torchs_wait() -> None:
    """Note [a wait that does not oversleep]: torch's blocking wait naps 1 ms between checks, longer than a
    bucket takes; the wait polls in short naps first and calls torch's once the work is done."""
    work = _Work(done_after=5)
    t0 = time.monotonic()
    assert group.PolledWork(work, timeout=10).wait() is True
    assert work.waited_when == 6 and time.monotonic() - t0 < 0.05  # naps of at most POLL_CAP_S
    stuck = _Work(done_after=10**9)
    group.PolledWork(stuck, timeout=0.05).wait()  # past the deadline torch's wait runs (and raises NCCL's timeout)
    assert stuck.waited_when is not None


def test_only_nccl_broadcasts_are_polled() -> None:
    class PG:
        def broadcast(self, tensors, opts):
            return _Work(0)

    assert isinstance(TorchGroup(PG(), None, "nccl", 0, 2, timeout=5).broadcast(torch.zeros(1), 0), group.PolledWork)
    assert isinstance(TorchGroup(PG(), None, "gloo", 0, 2).broadcast(torch.zeros(1), 0), _Work)

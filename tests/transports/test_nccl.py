"""The streaming transport: plans, packing, the double-buffered protocol, and real gloo groups."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import torch

from ipcbridge import BridgeError, ManifestError, transports
from ipcbridge.transports import nccl

MIXED = {
    "f32": torch.randn(3, 5),
    "bf16": torch.randn(7).to(torch.bfloat16),
    "f16": torch.randn(2, 3, 3).to(torch.float16),
    "i64": torch.arange(5, dtype=torch.int64) * 10**12,
    "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
    "flag": torch.tensor([True, False, True]),
    "scalar": torch.tensor(2.5, dtype=torch.float64),
    "empty": torch.zeros(0, 4),
    "u8": torch.arange(1, 200, dtype=torch.uint8),
}


def round_trip(tensors: dict[str, torch.Tensor], plan: nccl.StreamPlan) -> dict[str, torch.Tensor]:
    buf = torch.empty(plan.buffer_bytes, dtype=torch.uint8)
    out = {}
    for b in plan.buckets:
        nccl.pack(tensors, b, buf)
        out.update({n: v.clone() for n, v in nccl.unpack(buf, b).items()})
    return out


def test_mixed_dtypes_and_odd_sizes_round_trip_aligned() -> None:
    plan = nccl.plan_buckets(MIXED, bucket_bytes=512)
    assert [s.name for s in plan.slots] == list(MIXED)  # order kept, every tensor exactly once
    assert len(plan.buckets) > 1
    for b in plan.buckets:
        assert b.slots[0].offset == 0
        assert all(s.offset % nccl.ALIGNMENT == 0 for s in b.slots)
        assert len(b.slots) == 1 or b.nbytes <= 512
    out = round_trip(MIXED, plan)
    for name, t in MIXED.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert torch.equal(out[name], t), name


def test_plan_from_specs_equals_plan_from_tensors() -> None:
    specs = [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in MIXED.items()]
    assert nccl.plan_buckets(specs, 512) == nccl.plan_buckets(MIXED, 512)


def test_oversize_tensor_gets_a_bucket_of_its_own() -> None:
    tensors = {"a": torch.ones(10), "big": torch.randn(1000), "b": torch.ones(3), "c": torch.ones(2)}
    plan = nccl.plan_buckets(tensors, bucket_bytes=300)
    assert [b.names for b in plan.buckets] == [["a"], ["big"], ["b", "c"]]
    assert plan.buckets[1].nbytes == 4000 and plan.buffer_bytes == 4000
    assert plan.wire_bytes == 40 + 4000 + 256 + 8
    assert torch.equal(round_trip(tensors, plan)["big"], tensors["big"])


def test_unpack_views_alias_the_buffer_and_go_stale_on_reuse() -> None:
    tensors = {"x": torch.ones(64), "y": torch.full((64,), 2.0)}
    plan = nccl.plan_buckets(tensors, bucket_bytes=256)  # one tensor per bucket
    buf = torch.empty(plan.buffer_bytes, dtype=torch.uint8)
    nccl.pack(tensors, plan.buckets[0], buf)
    x = nccl.unpack(buf, plan.buckets[0])["x"]
    assert x.data_ptr() == buf.data_ptr() and torch.equal(x, tensors["x"])
    nccl.pack(tensors, plan.buckets[1], buf)
    assert torch.equal(x, tensors["y"])  # the view now shows whatever the buffer holds


def test_pack_refuses_tensors_that_do_not_fit_the_plan() -> None:
    plan = nccl.plan_buckets({"w": torch.zeros(2, 3)}, 1024)
    buf = torch.empty(plan.buffer_bytes, dtype=torch.uint8)
    with pytest.raises(ManifestError, match=r"'w'.*plan has float32 \[2, 3\]"):
        nccl.pack({"w": torch.zeros(3, 2)}, plan.buckets[0], buf)
    with pytest.raises(ManifestError, match="plan has float32"):
        nccl.pack({"w": torch.zeros(2, 3, dtype=torch.float64)}, plan.buckets[0], buf)
    with pytest.raises(ManifestError, match="'w' of the stream plan is missing"):
        nccl.pack({}, plan.buckets[0], buf)
    with pytest.raises(ManifestError, match="cannot hold"):
        nccl.pack({"w": torch.zeros(2, 3)}, plan.buckets[0], torch.empty(8, dtype=torch.uint8))
    with pytest.raises(ManifestError, match="1-d uint8"):
        nccl.unpack(torch.empty(plan.buffer_bytes, dtype=torch.float32), plan.buckets[0])


def test_plan_json_round_trip() -> None:
    plan = nccl.plan_buckets(MIXED, 512)
    assert nccl.StreamPlan.from_json(plan.to_json()) == plan
    assert json.loads(plan.to_json())["format"] == "ipcbridge.stream_plan"


def _mutate(path: list[Any], value: Any):
    def apply(d: dict[str, Any]) -> None:
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return apply


@pytest.mark.parametrize(("change", "message"), [
    (_mutate(["buckets", 0, 1, "offset"], 100), "not a multiple of the alignment"),
    (_mutate(["buckets", 0, 1, "offset"], 0), "overlaps"),
    (_mutate(["buckets", 0, 1, "name"], "a"), "appears twice"),
    (_mutate(["buckets", 0, 0, "dtype"], "float128"), "unknown dtype"),
    (_mutate(["buckets", 0, 0, "nbytes"], 12), "nbytes: 12 != numel x itemsize = 16"),
    (_mutate(["buckets", 0, 0, "shape"], [True]), "expected int, got bool"),
    (_mutate(["buckets", 0, 0, "shape"], [-1]), "must be >= 0"),
    (_mutate(["bucket_bytes"], 200), "only a bucket of one tensor may be larger"),
    (_mutate(["alignment"], 96), "power of two"),
    (_mutate(["buckets", 1], []), "at least one tensor"),
    (_mutate(["format_version"], 2), "format_version: 2 is not supported"),
    (_mutate(["format"], "ipcbridge.manifest"), "expected 'ipcbridge.stream_plan'"),
    (_mutate(["extra"], 1), r"unknown field\(s\) \['extra'\]"),
    (_mutate(["buckets", 0, 0, "extra"], 1), r"buckets\[0\]\[0\]: unknown field"),
    (_mutate(["buckets"], {}), "expected list"),
])
def test_plan_validation_errors(change, message) -> None:
    plan = nccl.plan_buckets({"a": torch.zeros(4), "b": torch.zeros(4), "c": torch.zeros(100)}, 512)
    d = json.loads(plan.to_json())
    change(d)
    with pytest.raises(ManifestError, match=message):
        nccl.StreamPlan.from_dict(d)


def test_plan_json_must_be_json() -> None:
    with pytest.raises(ManifestError, match="not valid JSON"):
        nccl.StreamPlan.from_json("{nope")


def test_plan_buckets_refuses_bad_input() -> None:
    with pytest.raises(ManifestError, match="bucket_bytes: must be >= 1"):
        nccl.plan_buckets({"a": torch.zeros(1)}, 0)
    with pytest.raises(ManifestError, match="cannot be exported"):
        nccl.plan_buckets({"a": torch.zeros(1, dtype=torch.complex64)}, 64)


def test_streaming_registry_is_separate_from_the_manifest_registry() -> None:
    assert transports.get_streaming("nccl") is nccl
    assert "nccl" not in transports.REGISTRY  # a manifest can never name it
    with pytest.raises(BridgeError, match="unknown streaming transport"):
        transports.get_streaming("shm")


# ---- the protocol over an in-memory group --------------------------------------------------------------


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


def run_pair(send_fn, receive_fn) -> tuple[Any, Any]:
    results: dict[str, Any] = {}

    def run(key, fn) -> None:
        try:
            results[key] = fn()
        except Exception as e:
            results[key] = e

    threads = [threading.Thread(target=run, args=(k, f)) for k, f in (("send", send_fn), ("receive", receive_fn))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results.get("send"), results.get("receive")


def test_send_receive_round_trip_with_double_buffering_order() -> None:
    torch.manual_seed(0)
    tensors = {f"t{i}": torch.randn(17 + 5 * i) for i in range(9)}
    plan = nccl.plan_buckets(tensors, bucket_bytes=256)  # one tensor per bucket: 9 buckets
    n = len(plan.buckets)
    wire = Wire()
    got: dict[str, torch.Tensor] = {}

    def packer(bucket, out) -> None:
        wire.record(f"pack {plan.buckets.index(bucket)}")
        nccl.pack(tensors, bucket, out)

    def load(views) -> None:
        (name,) = views
        wire.record(f"load {plan.buckets.index(next(b for b in plan.buckets if b.names == [name]))}")
        got.update({k: v.clone() for k, v in views.items()})

    sent, received = run_pair(lambda: nccl.send(MemoryGroup(wire, 0), packer, plan),
                              lambda: nccl.receive(MemoryGroup(wire, 1), plan, load))
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
    plan = nccl.plan_buckets(tensors, bucket_bytes=256)
    wire, got = Wire(), {}
    run_pair(lambda: nccl.send(MemoryGroup(wire, 0), tensors, plan),
             lambda: nccl.receive(MemoryGroup(wire, 1), plan, lambda v: got.update({k: t.clone() for k, t in v.items()})))
    assert all(torch.equal(got[k], t) for k, t in tensors.items())


def test_a_failing_load_stops_the_receiver_after_draining_its_posted_broadcasts() -> None:
    tensors = {f"t{i}": torch.randn(40) for i in range(6)}
    plan = nccl.plan_buckets(tensors, bucket_bytes=256)
    wire = Wire(timeout=0.5)

    def load(views) -> None:
        if "t2" in views:
            raise ValueError("disk full")

    sent, received = run_pair(lambda: nccl.send(MemoryGroup(wire, 0), tensors, plan),
                              lambda: nccl.receive(MemoryGroup(wire, 1), plan, load))
    assert isinstance(received, ValueError)
    assert "received 3" in wire.log  # bucket 3 was posted before the failure and is not left in flight
    assert "post 4" not in wire.log
    assert isinstance(sent, RuntimeError)  # the sender's bucket 4 is never received (a real group closes)


def test_empty_plan_sends_nothing() -> None:
    plan = nccl.plan_buckets({}, 64)
    assert plan.buffer_bytes == 0 and not plan.buckets
    assert nccl.send(MemoryGroup(Wire(), 0), {}, plan) == 0
    assert nccl.receive(MemoryGroup(Wire(), 1), plan, lambda v: None) == 0


# ---- real gloo groups (two ranks in two threads) ----------------------------------------------------------


def gloo_pair(timeout: float = 10.0) -> tuple[nccl.TorchGroup, nccl.TorchGroup]:
    store = nccl.master_store("127.0.0.1", timeout)
    groups: dict[int, nccl.TorchGroup] = {}

    def join(rank: int) -> None:
        s = store if rank == 0 else nccl.client_store("127.0.0.1", store.port, timeout)
        groups[rank] = nccl.TorchGroup.join(s, rank, 2, "gloo", timeout)

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
    plan = nccl.plan_buckets(tensors, bucket_bytes=1024)
    g0, g1 = gloo_pair()
    got: dict[str, torch.Tensor] = {}
    try:
        sent, received = run_pair(lambda: nccl.send(g0, tensors, plan),
                                  lambda: nccl.receive(g1, plan, lambda v: got.update({k: t.clone() for k, t in v.items()})))
        assert sent == received == plan.wire_bytes
        assert all(torch.equal(got[k], t) for k, t in tensors.items())
        assert not dist.is_initialized()
    finally:
        g0.close()
        g1.close()
    with pytest.raises(BridgeError, match="closed"):
        g0.broadcast(torch.zeros(1, dtype=torch.uint8), 0)


def test_gloo_receiver_failure_reaches_the_sender_at_once_not_at_the_timeout() -> None:
    tensors = {f"t{i}": torch.randn(1 << 18) for i in range(8)}  # 1 MiB each: sends block on the socket
    plan = nccl.plan_buckets(tensors, bucket_bytes=1 << 20)
    g0, g1 = gloo_pair(timeout=30.0)

    def load(views) -> None:
        if "t1" in views:
            raise ValueError("bad load")

    def receive() -> None:
        try:
            nccl.receive(g1, plan, load)
        finally:
            g1.close(abort=True)  # what the engine does on failure

    t0 = time.monotonic()
    sent, received = run_pair(lambda: nccl.send(g0, tensors, plan), receive)
    g0.close(abort=True)
    assert isinstance(received, ValueError)
    assert isinstance(sent, RuntimeError) and ("closed" in str(sent) or "reset" in str(sent))
    assert time.monotonic() - t0 < 10


def test_check_backend() -> None:
    assert nccl.check_backend("gloo", "cpu") == "gloo"
    with pytest.raises(BridgeError, match="carries CUDA buffers only"):
        nccl.check_backend("nccl", "cpu")
    with pytest.raises(BridgeError, match="unknown stream backend 'mpi'"):
        nccl.check_backend("mpi", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two distinct GPUs for two ranks")
def test_nccl_streams_between_two_gpus() -> None:
    store = nccl.master_store("127.0.0.1", 60)
    groups: dict[int, nccl.TorchGroup] = {}

    def join(rank: int) -> None:
        torch.cuda.set_device(rank)
        s = store if rank == 0 else nccl.client_store("127.0.0.1", store.port, 60)
        groups[rank] = nccl.TorchGroup.join(s, rank, 2, "nccl", 60)

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    tensors = {f"t{i}": torch.randn(1000 + i, device="cuda:0").to(torch.bfloat16) for i in range(10)}
    plan = nccl.plan_buckets(tensors, bucket_bytes=4096)
    got: dict[str, torch.Tensor] = {}

    def receive() -> int:
        torch.cuda.set_device(1)
        n = nccl.receive(groups[1], plan, lambda v: got.update({k: t.clone() for k, t in v.items()}), device="cuda:1")
        torch.cuda.synchronize(1)
        return n

    def send() -> int:
        torch.cuda.set_device(0)
        return nccl.send(groups[0], tensors, plan, device="cuda:0")

    try:
        sent, received = run_pair(send, receive)
        assert sent == received == plan.wire_bytes
        assert all(torch.equal(got[k].cpu(), t.cpu()) for k, t in tensors.items())
    finally:
        groups[0].close()
        groups[1].close()

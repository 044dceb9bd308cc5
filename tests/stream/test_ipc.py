"""A stream through a trainer-owned shared buffer (``ipcbridge.stream.ipc``), on CPU: shm stands in for CUDA
IPC. The protocol over :class:`IpcChannel` in two threads, a real second process mapping the buffer, and
the failures: a peer out of step, interrupted, gone, or stuck."""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time

import pytest
import torch

from ipcbridge.errors import BridgeError, ManifestError
from ipcbridge.handles import export
from ipcbridge.stream import protocol
from ipcbridge.stream.group import client_store, master_store
from ipcbridge.stream.ipc import BUFFER_NAME, IpcChannel, IpcStreamReceiver, open_buffers
from ipcbridge.stream.plan import StreamPlan, plan_buckets
from tests.helpers import run_pair


def weights(seed: int | None = None) -> dict[str, torch.Tensor]:
    g = None if seed is None else torch.Generator().manual_seed(seed)

    def t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype) if g is None else torch.randn(shape, generator=g).to(dtype)

    return {"embed": t(50, 8), "norm": t(8), "head": t(50, 8, dtype=torch.bfloat16), "bias": t(3)}


def channels(timeout: float = 10.0) -> tuple[IpcChannel, IpcChannel]:
    store = master_store("127.0.0.1", timeout)
    return (IpcChannel(store, 0, "cpu", timeout),
            IpcChannel(client_store("127.0.0.1", store.port, timeout), 1, "cpu", timeout))


def halves(plan: StreamPlan) -> list[torch.Tensor]:
    flat = torch.empty(2 * plan.buffer_bytes, dtype=torch.uint8)
    return [flat[: plan.buffer_bytes], flat[plan.buffer_bytes:]]


def loader(dest: dict[str, torch.Tensor], channel: IpcChannel):  # type: ignore[no-untyped-def]
    def load(views: dict[str, torch.Tensor]) -> None:
        for n, v in views.items():
            dest[n].copy_(v)
        channel.loaded()
    return load


def test_pushes_through_the_shared_halves_arrive_byte_exact() -> None:
    src, dest = weights(seed=0), weights()
    plan = plan_buckets(src, 300)
    assert len(plan.buckets) > 3
    trainer, engine = channels()
    shared = halves(plan)  # both sides see the same memory, as a mapped buffer would
    for push in range(3):  # sequence numbers run on across pushes
        for t in src.values():
            t.add_(1)
        sent, got = run_pair(lambda: protocol.send(trainer, src, plan, buffers=shared),
                             lambda: protocol.receive(engine, plan, loader(dest, engine), buffers=shared))
        assert sent == got == plan.wire_bytes, (push, sent, got)
        assert all(torch.equal(dest[n], src[n]) for n in src)
    assert not any(trainer.store.check([f"{k}/{i}"]) for k in ("ready", "done") for i in (0, 1))  # nothing left over
    engine.close()
    trainer.close()


def test_sides_out_of_step_fail_instead_of_loading_the_wrong_bytes() -> None:
    src, dest = weights(seed=0), weights()
    plan = plan_buckets(src, 300)
    trainer, engine = channels(timeout=1)
    engine._posted = 2  # the engine thinks this is the second push
    shared = halves(plan)
    _, got = run_pair(lambda: protocol.send(trainer, src, plan, buffers=shared),
                      lambda: protocol.receive(engine, plan, loader(dest, engine), buffers=shared), timeout=10)
    assert isinstance(got, BridgeError) and "out of step" in str(got)
    assert all(not t.any() for t in dest.values())


def test_an_interrupt_fails_the_trainers_wait_at_once() -> None:
    src = weights(seed=0)
    plan = plan_buckets(src, 300)
    trainer, _engine = channels(timeout=30)
    threading.Timer(0.2, trainer.interrupt).start()
    t0 = time.monotonic()
    with pytest.raises(BridgeError, match="engine's receive failed"):
        protocol.send(trainer, src, plan, buffers=halves(plan))  # nobody receives: waits on bucket 0
    assert time.monotonic() - t0 < 5


def test_a_trainer_that_goes_away_fails_the_engines_wait_at_once() -> None:
    plan = plan_buckets(weights(), 300)
    trainer, engine = channels(timeout=30)
    threading.Timer(0.2, trainer.close).start()  # drops the store's server, as a dead trainer does
    t0 = time.monotonic()
    with pytest.raises(BridgeError, match=r"the trainer did not signal 'ready/0'.*or has gone"):
        protocol.receive(engine, plan, lambda views: None, buffers=halves(plan))
    assert time.monotonic() - t0 < 5


def test_a_stuck_engine_fails_the_trainer_at_the_timeout() -> None:
    src = weights(seed=0)
    plan = plan_buckets(src, 300)
    trainer, _engine = channels(timeout=0.5)
    with pytest.raises(BridgeError, match="the engine did not signal 'done/0' within"):
        protocol.send(trainer, src, plan, buffers=halves(plan))
    with pytest.raises(ValueError, match="ranks 0 and 1"):
        IpcChannel(None, 2, "cpu", 1)
    trainer.close()
    with pytest.raises(BridgeError, match="closed"):
        trainer.broadcast(torch.empty(1, dtype=torch.uint8), 0)


def test_open_buffers_refuses_anything_but_one_flat_buffer_of_the_plans_size() -> None:
    plan = plan_buckets(weights(), 300)
    flat = torch.zeros(2 * plan.buffer_bytes, dtype=torch.uint8)
    opened, (a, b) = open_buffers(export({BUFFER_NAME: flat}, layout="meta").to_json(), plan.buffer_bytes)
    assert a.numel() == b.numel() == plan.buffer_bytes and a.data_ptr() == flat.data_ptr()
    opened.close()
    for bad in ({BUFFER_NAME: flat[:-1]}, {BUFFER_NAME: flat.view(torch.int8)}, {"other": flat},
                {BUFFER_NAME: flat, "extra": torch.zeros(1)}):
        with pytest.raises(ManifestError, match="one 1-d uint8 tensor"):
            open_buffers(export(bad, layout="meta").to_json(), plan.buffer_bytes)


def test_a_strided_buffer_of_the_right_length_is_refused() -> None:
    """A hostile trainer's manifest: one 1-d uint8 tensor of the right numel, but every other byte of a
    larger storage; the halves would not be the bytes the trainer packs."""
    plan = plan_buckets(weights(), 300)
    flat = torch.zeros(4 * plan.buffer_bytes, dtype=torch.uint8)
    strided = flat[::2]  # kept alive: the export holds weak references
    with pytest.raises(ManifestError, match="contiguous"):
        open_buffers(export({BUFFER_NAME: strided}, layout="meta").to_json(), plan.buffer_bytes)


@pytest.mark.parametrize("timeout", [0, -1.0, 1e300, float("nan"), True, "10"])
def test_a_timeout_no_deadline_can_be_made_of_is_refused_before_anything_is_mapped(timeout) -> None:
    """``parse_float`` lets 1e300 through: ``timedelta`` would overflow at the first wait (an OverflowError
    mid-stream); zero or negative would be no deadline at all."""
    receiver = IpcStreamReceiver(weights(), torch.device("cpu"))
    plan = plan_buckets(weights(), 300)
    with pytest.raises(BridgeError, match="timeout must be seconds"):
        receiver.init_ipc("s", "127.0.0.1", 1, timeout, plan.to_dict(), "{}")
    assert receiver._opened is None
    with pytest.raises(BridgeError, match="timeout must be seconds"):
        IpcChannel(None, 1, "cpu", timeout)


# ---- a real second process maps the trainer's buffer ---------------------------------------------------


def _engine_process(conn, plan_json: str) -> None:  # type: ignore[no-untyped-def]
    dest = weights()
    receiver = IpcStreamReceiver(dest, torch.device("cpu"))
    try:
        port, manifest_json = conn.recv()
        receiver.init_ipc("s", "127.0.0.1", port, 10, StreamPlan.from_json(plan_json).to_dict(), manifest_json)
        for _ in range(2):
            got = receiver.receive("s", paused=True, lock=contextlib.nullcontext())
            conn.send((got["bytes"], {n: t.float().tolist() for n, t in dest.items()}))  # no tensors: no pickle
    except Exception as e:  # reported to the test
        conn.send(("error", repr(e)))
    finally:
        receiver.close()


def test_a_second_process_receives_through_the_mapped_buffer() -> None:
    src = weights(seed=1)
    plan = plan_buckets(src, 300)
    flat = torch.zeros(2 * plan.buffer_bytes, dtype=torch.uint8)
    manifest_json = export({BUFFER_NAME: flat}, layout="meta").to_json()  # shm: /proc/<pid>/fd in the child
    ctx = multiprocessing.get_context("fork")  # torch is imported already: no second import
    here, there = ctx.Pipe()
    child = ctx.Process(target=_engine_process, args=(there, plan.to_json()), daemon=True)
    child.start()
    try:
        store = master_store("127.0.0.1", 10)
        here.send((store.port, manifest_json))
        store.wait([protocol.READY_KEY])
        trainer = IpcChannel(store, 0, "cpu", 10)
        shared = [flat[: plan.buffer_bytes], flat[plan.buffer_bytes:]]
        for _ in range(2):
            for t in src.values():
                t.mul_(-1)
            assert protocol.send(trainer, src, plan, buffers=shared) == plan.wire_bytes
            assert here.poll(10)
            nbytes, got = here.recv()
            assert nbytes == plan.wire_bytes and all(got[n] == src[n].float().tolist() for n in src), got
        trainer.close()
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0

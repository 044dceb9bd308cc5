"""The in-process endpoints (``vllm.LLM``, ``AsyncLLM``) on fakes: the driver's config check, the fence's
engine half on the owned, leased gate, and the worker's version through them."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from typing import Any

import pytest
import torch

import ipcbridge
from ipcbridge.endpoints import CanSample, Endpoint
from ipcbridge.errors import BridgeError, FenceError, MappingError
from ipcbridge.fence import Lease
from ipcbridge.vllm.endpoints import AsyncLLMEndpoint, LLMEndpoint, _check_engine_config, prompt_seed
from ipcbridge.vllm.rpc import EXTENSION_QUALNAME, decode_reply
from ipcbridge.vllm.testing import TESTING_EXTENSION_QUALNAME, TestingWorkerExtension
from tests.vllm import vllm_fakes as F

# ---- the driver's check of the engine config ----------------------------------------------------------


def test_check_engine_config(config: Any) -> None:
    with pytest.raises(BridgeError, match=re.escape("worker_extension_cls='ipcbridge.vllm.WorkerExtension'")):
        _check_engine_config(F.fake_vllm_config(config, worker_extension_cls=""), "vllm.LLM")
    with pytest.raises(BridgeError, match=re.escape("worker_extension_cls='ipcbridge.vllm.WorkerExtension'")):
        _check_engine_config(F.fake_vllm_config(config, worker_extension_cls="collections.OrderedDict"), "vllm.LLM")
    with pytest.raises(BridgeError, match="tensor_parallel_size=1"):
        _check_engine_config(F.fake_vllm_config(config, tensor_parallel_size=2), "vllm.LLM")


@pytest.mark.parametrize("ext", [EXTENSION_QUALNAME, TESTING_EXTENSION_QUALNAME, TestingWorkerExtension,
                                 F.FakeWorker])
def test_check_engine_config_accepts_the_extension_and_subclasses(config: Any, ext: Any) -> None:
    _check_engine_config(F.fake_vllm_config(config, worker_extension_cls=ext), "vllm.LLM")


def test_single_worker_only(worker: F.FakeWorker) -> None:
    ep = LLMEndpoint(F.FakeLLM(worker, workers=2))
    with pytest.raises(BridgeError, match="answered from 2 workers"):
        ep.manifest()
    with pytest.raises(BridgeError, match="answered from 2 workers"):
        ep._single(["{}", "{}"], "ipcbridge_manifest")
    with pytest.raises(BridgeError, match="answered from None workers"):
        ep._single(None, "ipcbridge_manifest")


def test_prompt_seeds_never_collide_across_consecutive_calls() -> None:
    seeds = [prompt_seed(step, i) for step in range(50) for i in range(64)]
    assert len(set(seeds)) == len(seeds)


# ---- vllm.LLM ------------------------------------------------------------------------------------------


def test_llm_endpoint_connect_and_fence(worker: F.FakeWorker) -> None:
    llm = F.FakeLLM(worker)
    ep = LLMEndpoint(llm)
    assert isinstance(ep, Endpoint) and isinstance(ep, CanSample)
    bridge = ipcbridge.connect(ep)
    assert bridge.model is not None and bridge.weight_version == 0
    llm.calls.clear()
    with bridge.update(), torch.no_grad():
        bridge.model.model.norm.weight.add_(1.0)
    # Note [an in-process engine's version is counted here]: no RPC, the worker hears of it when asked.
    assert llm.calls == ["reset_prefix_cache"]
    assert bridge.weight_version == ep.weight_version == 1 and worker._ipcbridge_weight_version == 0
    assert ep.engine_weight_version() == 1 == worker._ipcbridge_weight_version
    bridge.close()


def test_an_llm_worker_hears_the_counted_version_before_anyone_reads_it(worker: F.FakeWorker) -> None:
    llm = F.FakeLLM(worker)
    first = ipcbridge.connect(LLMEndpoint(llm))
    for _ in range(3):
        with first.update():
            pass
    assert worker._ipcbridge_weight_version == 0 and first.weight_version == 3
    ep = LLMEndpoint(llm)
    assert ep.info()["weight_version"] == 3  # told first
    second = ipcbridge.connect(ep)  # a new bridge continues the sequence
    assert second.weight_version == 3
    with second.update():
        pass
    with first.update():
        pass
    assert (second.weight_version, first.weight_version) == (4, 5)
    assert ep.engine_weight_version() == 5
    first.close()
    second.close()


def test_the_worker_version_never_moves_back(worker: F.FakeWorker) -> None:
    def ask(*args: Any) -> Any:
        return decode_reply(worker.ipcbridge_weight_version(*args), "the fake worker")

    for _ in range(4):
        worker.ipcbridge_publish_weight_version()
    assert ask(2) == 4
    assert ask("6") == 6  # over HTTP: a decimal string
    for bad in (-1, "x", True, 1.5):
        with pytest.raises(BridgeError, match="at_least"):
            ask(bad)
    assert ask() == 6


def test_llm_endpoint_worker_error_keeps_its_type(worker: F.FakeWorker) -> None:
    ep = LLMEndpoint(F.FakeLLM(worker))
    worker.model_error = MappingError("no table for this model")
    with pytest.raises(MappingError, match="no table"):
        ep.manifest()
    worker.model_error = FenceError("paused elsewhere")
    with pytest.raises(FenceError, match="paused elsewhere"):
        ep.info()


def test_llm_collective_rpc_failure_names_the_extension(worker: F.FakeWorker) -> None:
    llm = F.FakeLLM(worker)
    ep = LLMEndpoint(llm)
    llm.collective_rpc = lambda *a, **k: (_ for _ in ()).throw(AttributeError("no ipcbridge_manifest"))
    with pytest.raises(BridgeError, match=re.escape(f"worker_extension_cls={EXTENSION_QUALNAME!r}")):
        ep.manifest()


def test_two_endpoints_on_one_llm_never_reuse_a_version(worker: F.FakeWorker) -> None:
    llm = F.FakeLLM(worker)
    a, b = LLMEndpoint(llm), LLMEndpoint(llm)
    fa, fb = F.fence_for(a, "bridge a"), F.fence_for(b, "bridge b")
    versions = []
    for fence in (fa, fb, fa, fb, fb):
        with fence.hold():
            pass
        versions.append(fence.version)
    assert versions == [1, 2, 3, 4, 5]  # strictly increasing across both bridges
    assert a.engine_weight_version() == 5


def test_two_endpoints_on_one_llm_share_one_gate(worker: F.FakeWorker) -> None:
    llm = F.FakeLLM(worker)
    a, b = LLMEndpoint(llm), LLMEndpoint(llm)
    first = Lease.new("bridge a", 30)
    a.pause(first, wait=1)
    # The same thread asking again would wait for itself: refused at once, whatever the wait.
    t0 = time.monotonic()
    with pytest.raises(FenceError, match="this very thread"):
        b.pause(Lease.new("bridge b", 30), wait=10)
    assert time.monotonic() - t0 < 1
    # Another thread waits for the holder: refused after its wait ...
    errors: list[BaseException] = []
    waited: list[float] = []

    def other(wait: float, release: bool) -> None:
        lease = Lease.new("bridge b", 30)  # created in this thread: its caller is this thread
        t = time.monotonic()
        try:
            b.pause(lease, wait=wait)
        except BaseException as e:
            errors.append(e)
            return
        finally:
            waited.append(time.monotonic() - t)
        if release:
            waited.append(b.resume(lease))

    t = threading.Thread(target=other, args=(0.3, False))
    t.start()
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], FenceError) and "bridge a" in str(errors[0])
    assert waited[0] >= 0.25
    # ... and granted once the holder resumes.
    errors.clear()
    waited.clear()
    t = threading.Thread(target=other, args=(10, True))
    t.start()
    time.sleep(0.3)
    assert t.is_alive()  # still waiting for bridge a
    assert a.resume(first) == 1
    t.join(10)
    assert not errors and waited[0] >= 0.25 and waited[1] == 2


def test_llm_resume_after_failed_reset(worker: F.FakeWorker) -> None:
    llm = F.FakeLLM(worker)
    ep = LLMEndpoint(llm)
    fence = F.fence_for(ep)
    llm.fail_reset = True
    with pytest.raises(RuntimeError, match="reset_prefix_cache failed"), fence.hold():
        pass
    # The failed reset still published (the weights may have changed), and the lease ended with the failed
    # resume: the next fence is granted and publishes again.
    assert ep.engine_weight_version() == 1
    llm.fail_reset = False
    with fence.hold():
        pass
    assert fence.version == ep.engine_weight_version() == 2


# ---- AsyncLLM -------------------------------------------------------------------------------------------


def test_async_endpoint_fence_from_a_thread(worker: F.FakeWorker) -> None:
    engine = F.FakeAsyncLLM(worker)
    with pytest.raises(BridgeError, match="event loop"):
        AsyncLLMEndpoint(engine)  # no loop yet
    with F.LoopThread() as loop:
        ep = AsyncLLMEndpoint(engine, loop=loop)
        bridge = ipcbridge.connect(ep)
        engine.calls.clear()
        with bridge.update():
            pass
        assert engine.calls == ["core.pause_scheduler_async:wait:clear_cache=False", "reset_prefix_cache", "resume"]
        assert ep.engine_weight_version() == bridge.weight_version == 1

        async def on_loop() -> None:
            with pytest.raises(BridgeError, match="to_thread"):
                ep.pause(Lease.new("on the loop", 30), 1)
            with pytest.raises(BridgeError, match="to_thread"):
                ep.manifest()

        engine.calls.clear()
        asyncio.run_coroutine_threadsafe(on_loop(), loop).result(10)
        assert engine.calls == []  # refused before any lease or engine call
        with bridge.update():  # and the gate is free
            pass
        assert bridge.weight_version == 2
        bridge.close()


@pytest.mark.parametrize("failure", ["reset", "publish"])
def test_async_resume_generation_even_if_bookkeeping_fails(worker: F.FakeWorker, failure: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    engine = F.FakeAsyncLLM(worker)
    with F.LoopThread() as loop:
        ep = AsyncLLMEndpoint(engine, loop=loop)
        fence = F.fence_for(ep, manifest=False)  # the worker counts: its publish can fail
        if failure == "reset":
            engine.fail_reset = True
        else:
            monkeypatch.setattr(worker, "ipcbridge_publish_weight_version", lambda: "None")
        engine.calls.clear()
        with pytest.raises((RuntimeError, BridgeError)), fence.hold():
            pass
        assert engine.calls[0].startswith("core.pause_scheduler_async:wait") and engine.calls[-1] == "resume"  # never left paused
        assert fence.version == 0


def test_async_lease_runs_out_and_the_engine_resumes(worker: F.FakeWorker) -> None:
    engine = F.FakeAsyncLLM(worker)
    with F.LoopThread() as loop:
        ep = AsyncLLMEndpoint(engine, loop=loop)
        lease = Lease.new("a hung trainer", 0.2)
        ep.pause(lease, 1)
        deadline = time.monotonic() + 5
        while "resume" not in engine.calls and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.calls[-3:] == ["reset_prefix_cache", "ipcbridge_publish_weight_version", "resume"]
        assert ep.engine_weight_version() == 1  # the weights may be half-written: a new version
        with pytest.raises(FenceError, match="not the one holding"):
            ep.resume(lease)


def test_a_later_bridge_resumes_after_the_first_endpoint_is_gone(worker: F.FakeWorker) -> None:
    import gc

    engine = F.FakeAsyncLLM(worker)
    with F.LoopThread() as loop:
        first = AsyncLLMEndpoint(engine, loop=loop)
        with F.fence_for(first).hold():
            pass
        del first
        gc.collect()
        later = AsyncLLMEndpoint(engine, loop=loop)
        engine.calls.clear()
        fence = F.fence_for(later)
        with fence.hold():
            pass
        assert engine.calls[-1] == "resume" and fence.version == 2

"""Every supported vLLM release (0.25.1 to 0.33), on CPU fakes of each release's differences
(``vllm_fakes``: the table at its "fake engines" heading), and the stale-KV rules of the fence
(Note [stale KV: reset or salt] in ``ipcbridge.vllm.base``)."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import types
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from ipcbridge.errors import BridgeError
from ipcbridge.vllm.endpoints import AsyncLLMEndpoint, LLMEndpoint, output_weight_version
from ipcbridge.vllm.extension import WorkerExtension
from ipcbridge.vllm.features import CORE_PAUSE_METHODS, VllmFeatures, prefix_caching
from ipcbridge.vllm.http import HttpEndpoint
from ipcbridge.vllm.rpc import decode_reply
from tests.vllm import vllm_fakes as F

NEW = [r for r in F.RELEASES if F.at_least(r, "0.27")]
OLD = [r for r in F.RELEASES if not F.at_least(r, "0.27")]


@pytest.fixture(autouse=True)
def vllm_sampling_params(monkeypatch: pytest.MonkeyPatch) -> None:
    """``vllm.SamplingParams`` for the endpoints' generate (only that: ``vllm.inputs`` stays absent)."""
    mod = types.ModuleType("vllm")
    mod.SamplingParams = lambda **kw: SimpleNamespace(**kw)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", mod)


def _write(worker: F.FakeWorker) -> None:
    """What an optimizer step does to the served weights (in place)."""
    with torch.no_grad():
        next(worker._ipcbridge_model().parameters()).add_(0.5)


def _fence(ep: Any, worker: F.FakeWorker, change: bool = True) -> None:
    fence = F.fence_for(ep)
    with fence.hold():
        if change:
            _write(worker)


# ---- probing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("release", F.RELEASES)
def test_features_probed_per_release(worker: F.FakeWorker, release: str) -> None:
    llm = F.features_of(F.FakeLLM(worker, release=release))
    assert llm.engine_weight_version == F.at_least(release, "0.27")
    assert llm.output_weight_versions == F.at_least(release, "0.32")
    assert llm.cache_salt and llm.prefix_caching and llm.core_pause == "" and not llm.pause_rejects_new
    a = F.features_of(F.FakeAsyncLLM(worker, release=release))
    assert a.pause_rejects_new == F.at_least(release, "0.33")
    assert a.core_pause == ("pause_generation_async" if F.at_least(release, "0.33") else "pause_scheduler_async")


def test_features_validate_themselves() -> None:
    with pytest.raises(BridgeError, match="core_pause"):
        VllmFeatures(core_pause="pause")
    with pytest.raises(BridgeError, match="must be a bool"):
        VllmFeatures(engine_weight_version=1)  # type: ignore[arg-type]
    with pytest.raises(BridgeError, match="rejects new requests"):
        VllmFeatures(pause_rejects_new=True, core_pause="pause_scheduler_async")
    assert set(CORE_PAUSE_METHODS) == {"pause_generation_async", "pause_scheduler_async"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        VllmFeatures().cache_salt = False  # type: ignore[misc]


def test_prefix_caching_read_from_the_config() -> None:
    assert prefix_caching(SimpleNamespace()) is True  # unknown: reset, to be safe
    assert prefix_caching(SimpleNamespace(cache_config=SimpleNamespace(enable_prefix_caching=False))) is False


def test_endpoint_refuses_a_bad_kv_reset_or_features(worker: F.FakeWorker) -> None:
    with pytest.raises(BridgeError, match="kv_reset must be one of"):
        LLMEndpoint(F.FakeLLM(worker), kv_reset="never")
    with pytest.raises(BridgeError, match="kv_reset must be one of"):
        HttpEndpoint("http://127.0.0.1:1", kv_reset="")
    with pytest.raises(BridgeError, match="VllmFeatures"):
        LLMEndpoint(F.FakeLLM(worker), features={"cache_salt": True})  # type: ignore[arg-type]


# ---- 0.27+: vLLM's own weight version; 0.32+: on every output ------------------------------------------


@pytest.mark.parametrize("release", F.RELEASES)
def test_llm_publishes_the_version_through_vllm_where_it_can(worker: F.FakeWorker, release: str) -> None:
    llm = F.FakeLLM(worker, release=release)
    ep = LLMEndpoint(llm, features=F.features_of(llm))
    _fence(ep, worker)
    _fence(ep, worker)
    published = [c for c in llm.calls if c.startswith("update_weight_version")]
    if F.at_least(release, "0.27"):
        assert published == ["update_weight_version:1", "update_weight_version:2"]
        assert llm.get_weight_version() == "2" == str(ep.engine_weight_version())
    else:
        assert published == [] and not hasattr(llm, "update_weight_version")


@pytest.mark.parametrize("release", ["0.31", "0.32", "0.33"])
def test_outputs_carry_the_bridge_version(worker: F.FakeWorker, release: str) -> None:
    llm = F.FakeLLM(worker, release=release)
    ep = LLMEndpoint(llm, features=F.features_of(llm))
    ep.manifest()
    _fence(ep, worker)
    ((tokens, lps, version),) = ep.generate_versioned([[1, 2, 3]], 4)
    assert len(tokens) == len(lps) == 4 and version == 1
    spans = getattr(llm.generate([{"prompt_token_ids": [1]}], [None])[0].outputs[0], "weight_versions", None)
    assert (spans is not None) == F.at_least(release, "0.32")
    if spans:
        assert [s.version for s in spans] == ["1"]  # vLLM's own label is the bridge's version


def test_output_weight_version_rejects_a_mixed_output() -> None:
    span = F.WeightVersionSpan
    assert output_weight_version(SimpleNamespace(), 7) == 7
    assert output_weight_version(SimpleNamespace(weight_versions=[span("3", 0, 2), span("3", 2, 4)]), 7) == 3
    assert output_weight_version(SimpleNamespace(weight_versions=[span("step-a", 0, 2)]), 7) == 7  # not ours
    with pytest.raises(BridgeError, match=r"weight versions \['3', '4'\]"):
        output_weight_version(SimpleNamespace(weight_versions=[span("3", 0, 2), span("4", 2, 4)]), 7)


@pytest.mark.parametrize("release", F.RELEASES)
def test_http_publishes_the_version_where_the_route_exists(worker: F.FakeWorker, release: str) -> None:
    with F.FakeServe(worker, release=release) as srv:
        ep = HttpEndpoint(srv.url, timeout=5)
        ep.manifest()
        assert ep.features.engine_weight_version == F.at_least(release, "0.27")
        _fence(ep, worker)
        assert ("/update_weight_version" in srv.calls) == F.at_least(release, "0.27")
        assert srv.vllm_weight_version == ("1" if F.at_least(release, "0.27") else "0")
        assert srv.calls[-1] == "/resume"


# ---- 0.26+: a reset that reports failure is an error ---------------------------------------------------


def test_llm_reset_reporting_failure_is_an_error_and_still_resumes(worker: F.FakeWorker) -> None:
    llm = F.FakeLLM(worker)
    ep = LLMEndpoint(llm)
    llm.prefix_cache.fail = True
    with pytest.raises(BridgeError, match="reset_prefix_cache reported failure"):
        _fence(ep, worker)
    assert ep.engine_weight_version() == 1  # the weights changed: the version moved anyway
    llm.prefix_cache.fail = False
    _fence(ep, worker)  # the lease was released: the next fence is granted
    assert ep.engine_weight_version() == 2


@pytest.mark.parametrize("release", ["0.25", "0.26", "0.33"])
def test_http_reset_success_is_checked(worker: F.FakeWorker, release: str) -> None:
    with F.FakeServe(worker, release=release) as srv:
        ep = HttpEndpoint(srv.url, timeout=5)
        ep.manifest()
        assert ep.reset_prefix_cache() is (None if release == "0.25" else True)
        srv.mode = "reset_false"
        if release == "0.25":  # the body says nothing: nothing to check
            assert ep.reset_prefix_cache() is None
            return
        with pytest.raises(BridgeError, match="reported failure"):
            _fence(ep, worker)
        assert srv.calls[-1] == "/resume" and not srv.paused


# ---- the AsyncLLM pause per release: mode, clear_cache, no settle sleep ----------------------------------


@pytest.mark.parametrize("release", F.RELEASES)
def test_async_pause_per_release(worker: F.FakeWorker, release: str) -> None:
    engine = F.FakeAsyncLLM(worker, release=release)
    with F.LoopThread() as loop:
        ep = AsyncLLMEndpoint(engine, loop=loop, features=F.features_of(engine))
        fence = F.fence_for(ep)
        engine.calls.clear()
        with fence.hold():
            _write(worker)
    core = "pause_generation_async" if F.at_least(release, "0.33") else "pause_scheduler_async"
    assert engine.calls[0] == f"core.{core}:wait:clear_cache=False"
    assert "settle-sleep" not in engine.calls and engine.calls[-1] == "resume"
    assert engine.calls.count("reset_prefix_cache") == 1  # once, after the step, by the fence


def test_async_pause_falls_back_to_the_public_method(worker: F.FakeWorker) -> None:
    engine = F.FakeAsyncLLM(worker)
    with F.LoopThread() as loop:
        ep = AsyncLLMEndpoint(engine, loop=loop, features=VllmFeatures())
        fence = F.fence_for(ep)
        engine.calls.clear()
        with fence.hold():
            _write(worker)
    assert engine.calls[:2] == ["pause:wait:clear_cache=False", "settle-sleep"]


def test_fakes_reproduce_0_31_and_0_32_pause_rules(worker: F.FakeWorker) -> None:
    """What the endpoint avoids: a clear_cache pause that raises (0.31+), a removed keyword (0.32+)."""
    for release, raises in (("0.29", False), ("0.31", True)):
        engine = F.FakeAsyncLLM(worker, release=release)
        engine.prefix_cache.fail = True
        if raises:
            with pytest.raises(RuntimeError, match="failed to reset"):
                asyncio.run(engine.pause_generation(mode="wait", clear_cache=True))
        else:
            asyncio.run(engine.pause_generation(mode="wait", clear_cache=True))
    asyncio.run(F.FakeAsyncLLM(worker, release="0.31").pause_generation(mode="wait", wait_for_inflight_requests=True))
    with pytest.raises(TypeError, match="wait_for_inflight_requests"):
        asyncio.run(F.FakeAsyncLLM(worker, release="0.32").pause_generation(wait_for_inflight_requests=True))


@pytest.mark.parametrize("release", ["0.32", "0.33"])
def test_what_clients_see_during_a_fence(worker: F.FakeWorker, release: str) -> None:
    """Up to 0.32 a request sent during the fence waits and runs after it; from 0.33 it is rejected."""
    engine = F.FakeAsyncLLM(worker, release=release)

    async def one() -> Any:
        return [o async for o in engine.generate({"prompt_token_ids": [1]}, None)]

    with F.LoopThread() as loop:
        ep = AsyncLLMEndpoint(engine, loop=loop, features=F.features_of(engine))
        fence = F.fence_for(ep)
        with fence.hold():
            pending = asyncio.run_coroutine_threadsafe(one(), loop)
            if F.at_least(release, "0.33"):
                with pytest.raises(F.RetryableRequestError):
                    pending.result(5)
            else:
                assert not pending.done()
        if not F.at_least(release, "0.33"):
            assert len(pending.result(5)) == 1
        assert len(asyncio.run_coroutine_threadsafe(one(), loop).result(5)) == 1  # after the fence


def test_http_0_33_rejects_requests_during_a_fence(worker: F.FakeWorker) -> None:
    with F.FakeServe(worker, release="0.33") as srv:
        ep = HttpEndpoint(srv.url, timeout=5)
        ep.manifest()
        with F.fence_for(ep).hold(), pytest.raises(BridgeError, match="HTTP 503"):
            ep.complete([1, 2], 2)
        assert len(ep.complete([1, 2], 2)[0]) == 2


# ---- stale KV: reset or salt -----------------------------------------------------------------------------


def test_always_mode_resets_and_never_serves_stale_kv(worker: F.FakeWorker) -> None:
    llm = F.FakeLLM(worker)
    ep = LLMEndpoint(llm)
    for _ in range(3):
        ep.generate([[1, 2, 3]], 4)
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], [None])  # the user's own, unsalted
        _fence(ep, worker)
    assert llm.calls.count("reset_prefix_cache") == 3 and llm.prefix_cache.stale_hits == 0


def test_salted_mode_skips_the_reset_and_never_serves_stale_kv(worker: F.FakeWorker) -> None:
    llm = F.FakeLLM(worker)
    ep = LLMEndpoint(llm, kv_reset="salted")
    salts = []
    for _ in range(3):
        ep.generate([[1, 2, 3], [1, 2, 3]], 4)  # the second is a hit on the first's blocks
        salts.append(ep.cache_salt())
        _fence(ep, worker)
    assert "reset_prefix_cache" not in llm.calls
    assert len(set(salts)) == 3 and all(s.startswith("ipcbridge-") for s in salts)
    assert llm.prefix_cache.hits == 3 and llm.prefix_cache.stale_hits == 0
    assert all(p.get("cache_salt") for p in llm.prompts)


def test_salted_mode_is_an_opt_in_because_unsalted_requests_could_hit_stale_kv(worker: F.FakeWorker) -> None:
    llm = F.FakeLLM(worker)
    ep = LLMEndpoint(llm, kv_reset="salted")
    llm.generate([{"prompt_token_ids": [5, 6]}], [None])
    _fence(ep, worker)
    llm.generate([{"prompt_token_ids": [5, 6]}], [None])
    assert llm.prefix_cache.stale_hits == 1  # what kv_reset="always" (the default) exists for


def test_no_reset_without_prefix_caching(config: Any) -> None:
    worker = F.make_worker(config)
    worker.vllm_config.cache_config = SimpleNamespace(enable_prefix_caching=False)
    llm = F.FakeLLM(worker)
    ep = LLMEndpoint(llm)
    assert not ep.features.prefix_caching and not ep.needs_reset()
    _fence(ep, worker)
    assert "reset_prefix_cache" not in llm.calls and ep.engine_weight_version() == 1


def test_two_endpoints_on_one_engine_share_the_salt(worker: F.FakeWorker) -> None:
    llm = F.FakeLLM(worker)
    a, b = LLMEndpoint(llm, kv_reset="salted"), LLMEndpoint(llm, kv_reset="salted")
    assert a.cache_salt() == b.cache_salt()
    before = a.cache_salt()
    _fence(b, worker)
    assert a.cache_salt() == b.cache_salt() != before
    assert LLMEndpoint(F.FakeLLM(worker)).cache_salt() != a.cache_salt()  # another engine, another nonce


def test_http_requests_are_salted(worker: F.FakeWorker) -> None:
    with F.FakeServe(worker) as srv:
        ep = HttpEndpoint(srv.url, timeout=5, kv_reset="salted")
        ep.manifest()
        ep.complete([1], 2)
        _fence(ep, worker)
        ep.complete([1], 2)
        salts = [b["cache_salt"] for b in srv.completion_bodies]
        assert len(set(salts)) == 2 and "/reset_prefix_cache" not in srv.calls


# ---- 0.33 worker-extension hooks -------------------------------------------------------------------------


def test_worker_extension_hooks(worker: F.FakeWorker) -> None:
    worker._ipcbridge_weight_version = 5
    WorkerExtension.init_worker_extension(worker)  # as vLLM 0.33 calls it: on the class, with the worker
    assert decode_reply(worker.ipcbridge_weight_version(), "w") == 0
    WorkerExtension.destroy_worker_extension(worker)
    with pytest.raises(BridgeError, match="shutting down"):
        decode_reply(worker.ipcbridge_manifest(), "w")
    WorkerExtension.init_worker_extension(worker)
    assert decode_reply(worker.ipcbridge_manifest(), "w")["weight_version"] == 0


def test_hooks_chain_to_mixins_added_to_the_bases() -> None:
    seen: list[str] = []

    class Mixin:
        def init_worker_extension(self) -> None:
            seen.append("init")

        def destroy_worker_extension(self) -> None:
            seen.append("destroy")

    class Extended(WorkerExtension, Mixin):
        pass

    w = Extended()
    Extended.init_worker_extension(w)
    Extended.destroy_worker_extension(w)
    assert seen == ["init", "destroy"]


def test_model_runner_v1_and_v2_both_reach_the_model(config: Any) -> None:
    """0.29 made Model Runner V2 the default; both runners expose get_model(), which is all the worker uses."""
    module = F.vllm_module(F.vllm_state(config))
    for runner in (SimpleNamespace(get_model=lambda: module), SimpleNamespace(get_model=lambda: module, model=None)):
        w = F.make_worker(config)
        w.model_runner = runner
        assert w._ipcbridge_model() is module

"""ipcbridge's stream receiver in a (fake) vLLM worker, on CPU over gloo: layout, a fenced push into the fused
parameters, refusals (TP > 1, a plan that does not fit), and receiver selection. No vLLM, no GPU."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from ipcbridge.errors import BridgeError
from ipcbridge.mapping import to_vllm
from ipcbridge.stream.api import VllmReceiverEndpoint, _ipcbridge_endpoint, stream
from ipcbridge.stream.bridge import stream_engine
from ipcbridge.vllm.endpoints import LLMEndpoint
from ipcbridge.vllm.receiver import StreamReceiverMixin
from ipcbridge.vllm.rpc import decode_reply
from tests.helpers import tiny_config
from tests.vllm.vllm_fakes import FakeLLM, FakeWorker, fence_for, hf_reference, vllm_module, vllm_state

StreamWorker = FakeWorker  # WorkerExtension has the stream receiver among its bases
assert issubclass(StreamWorker, StreamReceiverMixin)


def setup(**overrides):  # type: ignore[no-untyped-def]
    config = tiny_config("llama")
    worker = StreamWorker(config, vllm_module(vllm_state(config, seed=0)), **overrides)
    return config, worker, VllmReceiverEndpoint(LLMEndpoint(FakeLLM(worker)))


def served(worker: StreamWorker) -> dict[str, torch.Tensor]:
    return dict(worker._ipcbridge_model().named_parameters())


def test_a_fenced_step_lands_in_the_fused_parameters() -> None:
    config, worker, ep = setup()
    specs, version = ep.stream_layout()
    assert {n for n, _, _ in specs} == set(served(worker)) and version == 0
    model = hf_reference(config, seed=1)
    before = {n: id(p) for n, p in served(worker).items()}
    with stream_engine(ep, model, bucket_bytes=4096, backend="gloo", timeout=10) as sb:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
        with sb.update():
            opt.step()
        expected = to_vllm({n: p.detach() for n, p in model.state_dict().items()}, config)
        for n, p in served(worker).items():
            assert torch.equal(p.detach(), expected[n]), n
        assert {n: id(p) for n, p in served(worker).items()} == before  # written in place
        assert sb.weight_version == 1 and len(sb.plan.buckets) > 2
        buffers = worker._ipcbridge_stream._buffers
        sb.push()
        assert worker._ipcbridge_stream._buffers is buffers  # allocated once per stream
    assert worker._ipcbridge_stream.group is None  # closed with the bridge


def test_a_stream_continues_the_versions_counted_in_this_process() -> None:
    # Note [an in-process engine's version is counted here]: the layout carries the worker's version, so the
    # worker is told first; the streaming fence then counts here too, with no publish RPC.
    config, worker, ep = setup()
    llm = ep.inner.llm
    fence = fence_for(LLMEndpoint(llm))  # an attached bridge's fences on the same engine
    for _ in range(3):
        with fence.hold():
            pass
    assert worker._ipcbridge_weight_version == 0
    assert ep.stream_layout()[1] == 3 == worker._ipcbridge_weight_version
    llm.calls.clear()
    with stream_engine(ep, hf_reference(config, seed=1), bucket_bytes=4096, backend="gloo", timeout=10) as sb:
        assert sb.weight_version == 3
        sb.push()
        assert sb.weight_version == 4 and "ipcbridge_publish_weight_version" not in llm.calls
    with fence.hold():
        pass
    assert fence.version == 5


class Refusing:
    """A vLLM endpoint whose worker has no stream receiver (no extension, or several workers)."""

    name = "refusing"
    where = "the vLLM worker"

    def rpc(self, method: str, *args: object) -> None:
        raise BridgeError(f"collective_rpc({method!r}) answered from 2 workers")

    def tell_worker_version(self) -> None:
        pass  # this process counts no version of it


def test_tp_gt_1_is_refused_with_the_fix() -> None:
    config = tiny_config("llama")
    worker = StreamWorker(config, vllm_module(vllm_state(config)), tensor_parallel_size=2)
    with pytest.raises(BridgeError, match="receiver='vllm'"):
        decode_reply(worker.ipcbridge_stream_layout(), "worker")
    assert _ipcbridge_endpoint(VllmReceiverEndpoint(Refusing()), required=False) is None  # -> vLLM's receiver
    with pytest.raises(BridgeError, match="2 workers"):
        _ipcbridge_endpoint(VllmReceiverEndpoint(Refusing()), required=True)


def test_a_plan_that_does_not_fit_is_refused_by_the_worker() -> None:
    _, worker, ep = setup()
    other = tiny_config("llama", intermediate_size=64)
    with pytest.raises(BridgeError):
        stream_engine(ep, hf_reference(other, seed=1), bucket_bytes=4096, backend="gloo", timeout=10)
    assert worker._ipcbridge_stream is None or worker._ipcbridge_stream.group is None


def test_receiver_selection() -> None:
    _, _, ep = setup()
    assert _ipcbridge_endpoint(ep, required=True) is not None
    with pytest.raises(BridgeError, match="unknown receiver"):
        stream(ep, hf_reference(tiny_config("llama")), receiver="fast")
    with pytest.raises(BridgeError, match="not one"):
        stream(ep, hf_reference(tiny_config("llama")), receiver="vllm")


# ---- one GPU, memory that cannot be shared: the trainer's shared buffer (shm stands in for CUDA IPC) ----


def served_now(worker: StreamWorker) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in served(worker).items()}


def sleep_mode_setup() -> tuple[object, StreamWorker, FakeLLM]:
    config = tiny_config("llama")
    worker = StreamWorker(config, vllm_module(vllm_state(config, seed=0)), enable_sleep_mode=True)
    return config, worker, FakeLLM(worker)


def expected_of(model: torch.nn.Module, config: object) -> dict[str, torch.Tensor]:
    return to_vllm({n: p.detach() for n, p in model.state_dict().items()}, config)


def test_a_sleep_mode_engine_refused_by_connect_is_streamed_through_the_shared_buffer() -> None:
    config, worker, llm = sleep_mode_setup()
    with pytest.raises(BridgeError, match=r"enable_sleep_mode=True.*ipcbridge\.stream\(engine, model\)"):
        LLMEndpoint(llm)  # what connect() builds
    ep = VllmReceiverEndpoint(LLMEndpoint(llm, streaming=True))  # what stream() builds: the extension is still checked
    model = hf_reference(config, seed=1)
    with stream(ep, model, receiver="ipc", bucket_bytes=4096, timeout=10) as sb:
        assert sb.backend == "ipc" and len(sb.plan.buckets) > 2
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
        with sb.update():
            opt.step()
        assert all(torch.equal(p, expected_of(model, config)[n]) for n, p in served_now(worker).items())
        mapped = worker._ipcbridge_stream._buffers
        # wake_up() after a deep sleep hands the engine new weight tensors: the next push must land in them
        fresh = vllm_module(vllm_state(config, seed=7))
        worker.model_runner = SimpleNamespace(get_model=lambda: fresh)
        with sb.update():
            opt.step()
        assert all(torch.equal(p.detach(), expected_of(model, config)[n]) for n, p in fresh.named_parameters())
        assert worker._ipcbridge_stream._buffers is mapped  # mapped once per stream, not per push
        assert sb.weight_version == 2
    assert worker._ipcbridge_stream.group is None and worker._ipcbridge_stream._opened is None


def test_an_engine_asleep_is_refused_before_anything_is_sent() -> None:
    config, worker, llm = sleep_mode_setup()
    model = hf_reference(config, seed=1)
    with stream(VllmReceiverEndpoint(LLMEndpoint(llm, streaming=True)), model, receiver="ipc", bucket_bytes=4096,
                timeout=10) as sb:
        before = served_now(worker)
        llm.llm_engine.is_sleeping = lambda: True
        with pytest.raises(BridgeError, match=r"asleep.*wake_up\(\)"):
            sb.push()
        assert all(torch.equal(p, before[n]) for n, p in served_now(worker).items()) and sb.weight_version == 0
        llm.llm_engine.is_sleeping = lambda: False
        sb.push()  # no lease was left behind
        assert all(torch.equal(p, expected_of(model, config)[n]) for n, p in served_now(worker).items())


def test_an_engine_that_fails_mid_push_fails_the_trainer_at_once_and_the_next_stream_works() -> None:
    config, worker, llm = sleep_mode_setup()
    ep = VllmReceiverEndpoint(LLMEndpoint(llm, streaming=True))
    model = hf_reference(config, seed=1)
    sb = stream(ep, model, receiver="ipc", bucket_bytes=4096, timeout=30)
    worker.model_error = RuntimeError("the model went away")
    t0 = time.monotonic()
    with pytest.raises(BridgeError, match="the model went away"):
        sb.push()
    assert time.monotonic() - t0 < 10  # interrupted, not the 30 s timeout
    assert worker._ipcbridge_stream.group is None and worker._ipcbridge_stream._opened is None  # unmapped
    with pytest.raises(BridgeError, match="closed"):
        sb.push()
    sb.close()
    worker.model_error = None
    with stream(VllmReceiverEndpoint(LLMEndpoint(llm, streaming=True)), model, receiver="ipc", bucket_bytes=4096,
                timeout=10) as again:
        again.push()
        assert again.weight_version == 2  # the failed push resumed the engine too
    assert all(torch.equal(p, expected_of(model, config)[n]) for n, p in served_now(worker).items())


def test_the_shared_buffer_is_picked_on_the_trainers_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from ipcbridge.stream import api

    config, _, llm = sleep_mode_setup()
    ep = VllmReceiverEndpoint(LLMEndpoint(llm, streaming=True))
    ep.stream_layout()
    model = hf_reference(config)
    assert ep.gpu_uuid == "" and not api._same_gpu(ep, model)  # CPU weights: never
    ep.gpu_uuid = "GPU-0a1b2c3d-0000-0000-0000-000000000000"
    monkeypatch.setattr(api, "_model_device", lambda m: torch.device("cuda", 0))
    monkeypatch.setattr(api, "device_uuid", lambda i: "0a1b2c3d-0000-0000-0000-000000000000")
    assert api._same_gpu(ep, model)
    monkeypatch.setattr(api, "device_uuid", lambda i: "ffffffff-0000-0000-0000-000000000000")
    assert not api._same_gpu(ep, model)


def test_the_shared_buffer_needs_a_receiver_that_maps_it() -> None:
    config, _, llm = sleep_mode_setup()
    ep = VllmReceiverEndpoint(LLMEndpoint(llm, streaming=True))
    ep.stream_init_ipc = None  # type: ignore[assignment,method-assign]  # an engine without the IPC receiver
    with pytest.raises(BridgeError, match="cannot receive through a shared buffer"):
        stream(ep, hf_reference(config), receiver="ipc", bucket_bytes=4096, timeout=10)
    with pytest.raises(BridgeError, match="no backend 'gloo'"):
        stream(ep, hf_reference(config), receiver="ipc", backend="gloo")
    with pytest.raises(BridgeError, match="NCCL only"):
        stream(ep, hf_reference(config), receiver="vllm", backend="ipc")


def test_the_streaming_endpoint_still_needs_the_extension() -> None:
    config = tiny_config("llama")
    bare = StreamWorker(config, vllm_module(vllm_state(config)), enable_sleep_mode=True, worker_extension_cls="")
    with pytest.raises(BridgeError, match="without ipcbridge's worker extension"):
        LLMEndpoint(FakeLLM(bare), streaming=True)


def test_a_reloaded_model_that_no_longer_fits_closes_the_stream_and_a_new_one_opens() -> None:
    config, worker, llm = sleep_mode_setup()
    model = hf_reference(config, seed=1)
    sb = stream(VllmReceiverEndpoint(LLMEndpoint(llm, streaming=True)), model, receiver="ipc", bucket_bytes=4096,
                timeout=30)
    other = tiny_config("llama", intermediate_size=64)
    worker.model_runner = SimpleNamespace(get_model=lambda: vllm_module(vllm_state(other)))
    with pytest.raises(BridgeError, match="stream plan has"):
        sb.push()
    sb.close()
    assert worker._ipcbridge_stream.group is None and worker._ipcbridge_stream._opened is None
    fitting = vllm_module(vllm_state(other))
    worker.model_runner = SimpleNamespace(get_model=lambda: fitting)
    with stream(VllmReceiverEndpoint(LLMEndpoint(llm, streaming=True)), hf_reference(other, seed=2),
                receiver="ipc", bucket_bytes=4096, timeout=10) as sb2:
        sb2.push()  # the stale plan did not stand in the new stream's way


def test_vllm_serve_by_url_streams_through_the_shared_buffer() -> None:
    from tests.vllm.vllm_fakes import FakeServe

    config = tiny_config("llama")
    worker = StreamWorker(config, vllm_module(vllm_state(config, seed=0)), enable_sleep_mode=True)
    model = hf_reference(config, seed=1)
    with FakeServe(worker) as serve, stream(serve.url, model, receiver="ipc", bucket_bytes=4096, timeout=10) as sb:
        # every argument crosses /collective_rpc as a string, the buffer's manifest included
        sb.push()
        assert sb.backend == "ipc" and sb.weight_version == 1
        assert all(torch.equal(p, expected_of(model, config)[n]) for n, p in served_now(worker).items())


def test_an_engine_that_accepts_and_returns_at_once_is_not_taken_for_a_refusal(monkeypatch) -> None:
    # The shared-buffer init sets the ready key and returns: the trainer may see the call done before it sees
    # the key (a race a CI run hit). A call that ended without error after setting the key is an acceptance.
    from ipcbridge.stream import bridge as stream_bridge

    real_master_store = stream_bridge.master_store

    class LateStore:
        """The real store, whose first check reads as if made just before the engine set the key."""

        def __init__(self, store) -> None:
            self._store, self._first = store, True

        def check(self, keys):
            if self._first:
                self._first = False
                time.sleep(0.5)  # the engine's init sets the key and returns meanwhile
                return False
            return self._store.check(keys)

        def __getattr__(self, name):
            return getattr(self._store, name)

    monkeypatch.setattr(stream_bridge, "master_store", lambda *a, **k: LateStore(real_master_store(*a, **k)))
    config, worker, llm = sleep_mode_setup()
    model = hf_reference(config, seed=1)
    with stream(VllmReceiverEndpoint(LLMEndpoint(llm, streaming=True)), model, receiver="ipc", bucket_bytes=4096,
                timeout=10) as sb:
        sb.push()
    assert all(torch.equal(p, expected_of(model, config)[n]) for n, p in served_now(worker).items())

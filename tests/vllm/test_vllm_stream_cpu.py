"""ipcbridge's stream receiver in a (fake) vLLM worker, on CPU over gloo: layout, a fenced push into the fused
parameters, refusals (TP > 1, a plan that does not fit), and receiver selection. No vLLM, no GPU."""

from __future__ import annotations

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
from tests.vllm.vllm_fakes import FakeLLM, FakeWorker, hf_reference, vllm_module, vllm_state


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


class Refusing:
    """A vLLM endpoint whose worker has no stream receiver (no extension, or several workers)."""

    name = "refusing"
    where = "the vLLM worker"

    def rpc(self, method: str, *args: object) -> None:
        raise BridgeError(f"collective_rpc({method!r}) answered from 2 workers")


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

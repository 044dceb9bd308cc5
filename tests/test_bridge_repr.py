"""repr(Bridge): what the bridge holds, open and closed, without a call to the engine and without raising."""

from __future__ import annotations

import re

import torch

import ipcbridge
from tests.helpers import RecordingEndpoint, reference_model, tiny_config, vllm_weights


def _bridge(dtype: torch.dtype = torch.bfloat16):
    cfg = tiny_config("llama")
    weights = {k: t.to(dtype) for k, t in vllm_weights(reference_model(cfg), cfg).items()}
    manifest = ipcbridge.export(weights, cfg)
    ep = RecordingEndpoint(manifest, version=3, name="quiet")
    return ipcbridge.connect(ep), ep, manifest


def test_repr_open_and_closed_without_calling_the_engine(recwarn) -> None:
    bridge, ep, manifest = _bridge()
    with bridge.update():
        pass
    calls = list(ep.calls)
    model = bridge.model
    n_params = len(list(model.parameters()))
    mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20

    text = repr(bridge)
    assert text == (
        f"Bridge(engine='quiet (pid {manifest.producer.pid})', transport='shm', model=LlamaForCausalLM, "
        f"{n_params} parameters, {mib:.2f} MiB bfloat16, weight_version=3, open)"
    )
    assert ep.calls == calls, "repr() must not call the engine"

    bridge.close()
    closed = repr(bridge)
    assert ep.calls == [*calls, "close"]
    # The model is gone after close(): the manifest says what the engine exported.
    assert closed.startswith(f"Bridge(engine='quiet (pid {manifest.producer.pid})', transport='shm', "
                             "model_type='llama', ")
    assert re.search(rf"{len(manifest.tensors)} engine tensors, [\d.]+ MiB bfloat16, weight_version=3, closed\)$",
                     closed), closed
    assert repr(bridge) == closed  # repeatable; close() twice is a no-op and so is its repr


def test_repr_never_raises_on_a_damaged_bridge() -> None:
    bridge, _, _ = _bridge(torch.float32)
    assert "float32" in repr(bridge) and "open" in repr(bridge)
    bridge.close()
    del bridge.manifest  # what a half-built bridge (an exception in __init__) would lack
    assert re.fullmatch(r"<Bridge at 0x[0-9a-f]+ \(AttributeError reading its state\)>", repr(bridge))

"""connect() dispatch and the fence, without an engine process."""

from __future__ import annotations

import pytest
import torch

import ipcbridge
from ipcbridge import BridgeError
from ipcbridge.endpoints import ENDPOINTS, ManifestEndpoint, resolve_endpoint
from tests.helpers import reference_model, tiny_config, vllm_weights


def test_connect_to_a_manifest() -> None:
    cfg = tiny_config("llama")
    weights = vllm_weights(reference_model(cfg), cfg)
    bridge = ipcbridge.connect(ipcbridge.export(weights, cfg), check=True)
    assert isinstance(bridge.endpoint, ManifestEndpoint)
    with bridge.update(), torch.no_grad():
        bridge.model.model.norm.weight.fill_(2.0)
    assert bridge.weight_version == 1 and weights["model.norm.weight"].eq(2.0).all()
    assert len(bridge.fence_seconds) == 1
    bridge.close()
    with pytest.raises(BridgeError, match="closed"), bridge.update():
        pass


def test_unknown_target_names_the_accepted_ones() -> None:
    with pytest.raises(TypeError, match=r"LocalEngine, a vllm\.LLM"):
        ipcbridge.connect(object())


def test_endpoints_are_registered_by_module_path() -> None:
    for path in ENDPOINTS.values():
        module, _, attr = path.partition(":")
        assert module.startswith("ipcbridge.") and attr


class _RecordingEndpoint:
    name = "recording"

    def __init__(self, manifest) -> None:
        self._m, self.calls = manifest, []

    def manifest(self):
        return self._m

    def pause(self, lease, wait: float) -> None:
        self.calls.append("pause")

    def renew(self, lease) -> None:
        self.calls.append("renew")

    def resume(self, lease) -> int:
        self.calls.append("resume")
        return 41  # the engine owns the version

    def cancel(self, lease) -> None:
        self.calls.append("cancel")

    def close(self) -> None:
        self.calls.append("close")


def test_custom_endpoint_sees_pause_then_resume_with_the_new_version() -> None:
    cfg = tiny_config("llama")
    weights = vllm_weights(reference_model(cfg), cfg)
    ep = _RecordingEndpoint(ipcbridge.export(weights, cfg))
    assert resolve_endpoint(ep) is ep
    bridge = ipcbridge.connect(ep)
    with bridge.update():
        assert ep.calls == ["pause"]
        bridge.renew()
    assert bridge.weight_version == 41
    bridge.close()
    assert ep.calls == ["pause", "renew", "resume", "close"]


def test_close_inside_update_is_refused_and_the_bridge_stays_usable() -> None:
    cfg = tiny_config("llama")
    weights = vllm_weights(reference_model(cfg), cfg)
    bridge = ipcbridge.connect(ipcbridge.export(weights, cfg))
    with bridge.update(), pytest.raises(BridgeError, match="leave the block first"):
        bridge.close()
    assert bridge.parameters_outside_engine() == [] and bridge.trainer_weight_bytes() == 0
    bridge.close()
    with pytest.raises(BridgeError, match="closed"):
        bridge.parameters_outside_engine()


def test_bad_fence_settings_are_refused_before_attaching() -> None:
    cfg = tiny_config("llama")
    manifest = ipcbridge.export(vllm_weights(reference_model(cfg), cfg), cfg)
    with pytest.raises(ipcbridge.FenceError, match="lease_seconds must be a positive number"):
        ipcbridge.connect(manifest, lease_seconds=0)

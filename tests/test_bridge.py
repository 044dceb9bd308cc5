"""connect() dispatch and the fence, without an engine process."""

from __future__ import annotations

import pytest
import torch

import ipcbridge
from ipcbridge import BridgeError
from ipcbridge.endpoints import ENDPOINTS, ManifestEndpoint, resolve_endpoint
from tests.helpers import RecordingEndpoint, reference_model, tiny_config, vllm_weights


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


def test_kv_reset_is_refused_for_targets_that_are_not_vllm_before_anything_is_attached() -> None:
    cfg = tiny_config("llama")
    manifest = ipcbridge.export(vllm_weights(reference_model(cfg), cfg), cfg)
    with pytest.raises(BridgeError, match=r"kv_reset='salted' applies to a vllm\.LLM"):
        ipcbridge.connect(manifest, kv_reset="salted")


def test_kv_reset_reaches_the_http_endpoint_and_is_validated_there(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake_http(url: str, **options: object) -> object:
        seen.update(url=url, **options)
        raise BridgeError("stop here")

    monkeypatch.setattr("ipcbridge.endpoints._load", lambda path: fake_http)
    with pytest.raises(BridgeError, match="stop here"):
        resolve_endpoint("http://127.0.0.1:1", kv_reset="salted")
    assert seen == {"url": "http://127.0.0.1:1", "kv_reset": "salted"}
    seen.clear()
    with pytest.raises(BridgeError, match="stop here"):
        resolve_endpoint("http://127.0.0.1:1")
    assert seen == {"url": "http://127.0.0.1:1"}  # no kv_reset given: the endpoint keeps its own default


def test_endpoints_are_registered_by_module_path() -> None:
    for path in ENDPOINTS.values():
        module, _, attr = path.partition(":")
        assert module.startswith("ipcbridge.") and attr


def test_custom_endpoint_sees_pause_then_resume_with_the_new_version() -> None:
    cfg = tiny_config("llama")
    weights = vllm_weights(reference_model(cfg), cfg)
    ep = RecordingEndpoint(ipcbridge.export(weights, cfg))
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


# ---- close(): the old model and optimizer can no longer reach the engine ---------------------------------

PROMPT = [3, 14, 15, 92]
IDS = torch.tensor([PROMPT + [7] * 6])


@pytest.fixture(scope="module")
def engine():
    with ipcbridge.LocalEngine(tiny_config("llama"), device="cpu", seed=3) as eng:
        yield eng


def _mapped(inodes: set[int]) -> int:
    """Lines of /proc/self/maps that map one of ``inodes`` (the engine's /dev/shm storages)."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if len(parts := line.split()) >= 5 and int(parts[4]) in inodes)


def _backward(model: torch.nn.Module) -> None:
    torch.nn.functional.cross_entropy(model(IDS).logits[0, :-1], IDS[0, 1:]).backward()


def test_after_close_the_old_model_and_optimizer_cannot_reach_the_engine(engine) -> None:
    import gc

    bridge = ipcbridge.connect(engine)
    inodes = {s.inode for s in bridge.manifest.storages}
    assert _mapped(inodes) >= len(inodes)
    model = bridge.model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _backward(model)
    with bridge.update():
        opt.step()
    served = engine.score(PROMPT, [7, 7, 7])
    bridge.close()
    gc.collect()
    assert _mapped(inodes) == 0  # the views are gone, so is the mapping
    with pytest.raises(BridgeError, match=r"AdamW\.step\(\) would write parameters of a Bridge that was closed"):
        opt.step()
    with pytest.raises(BridgeError, match=r"detached from the engine by bridge\.close\(\).*ipcbridge\.connect"):
        model(IDS)
    with pytest.raises(BridgeError, match="closed"):
        model.load_state_dict(model.state_dict())
    with torch.no_grad(), pytest.raises(RuntimeError, match="single memory location"):
        model.lm_head.weight.add_(1.0)  # no optimizer, no guard: the detached memory refuses writes
    assert engine.score(PROMPT, [7, 7, 7]) == served


def test_close_detaches_tied_and_replaced_parameters_an_optimizer_still_holds() -> None:
    cfg = tiny_config("qwen3", tied=True)
    weights = vllm_weights(reference_model(cfg), cfg)
    saved = {k: v.clone() for k, v in weights.items()}
    bridge = ipcbridge.connect(ipcbridge.export(weights, cfg))
    model = bridge.model
    tied, norm = model.model.embed_tokens.weight, model.model.norm.weight
    assert model.lm_head.weight is tied
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model.model.norm.weight = torch.nn.Parameter(norm.detach().clone())  # the model lets go; the optimizer does not
    bridge.close()
    for group in opt.param_groups:
        for p in group["params"]:
            assert set(p.stride()) == {0}, "still aliasing memory after close()"
            p.grad = torch.ones_like(p)
    assert any(p is norm for p in opt.param_groups[0]["params"])
    with pytest.raises(BridgeError, match="closed"):
        opt.step()
    with torch.no_grad(), pytest.raises(RuntimeError, match="single memory location"):
        tied.copy_(torch.zeros_like(tied))
    with torch.no_grad(), pytest.raises(RuntimeError, match="single memory location"):
        norm.add_(1.0)
    assert all(torch.equal(weights[k], saved[k]) for k in weights)


# ---- check(): parity judged against a tolerance, with hints ----------------------------------------------


def test_check_fails_with_a_hint_after_an_in_place_write_outside_update(engine) -> None:
    bridge = ipcbridge.connect(engine)
    first = bridge.check(prompt=PROMPT)  # also fills the engine's prefix cache for PROMPT
    assert first.ok and first.parity_ok and first.parity_atol == 1e-3 and first.hints == []
    with torch.no_grad():
        bridge.model.lm_head.weight.mul_(3.0)  # written outside update(): the engine's cache is now stale
    report = bridge.check(prompt=PROMPT, raise_on_failure=False)
    assert not report.ok and report.parity_ok is False
    assert report.unfenced_writes == ["lm_head.weight"]
    assert "written in place outside `update()`" in report.hints[0]
    with pytest.raises(BridgeError, match=r"logprob parity: max \|diff\| .* > atol 0\.001.*lm_head\.weight"):
        bridge.check(prompt=PROMPT)
    assert bridge.check(prompt=PROMPT, raise_on_failure=False, atol=100.0).ok  # a looser tolerance
    with bridge.update():  # publishes the write: the engine drops its cache
        pass
    assert bridge.check(prompt=PROMPT).ok
    with bridge.update(), torch.no_grad():
        bridge.model.lm_head.weight.div_(3.0)
    bridge.close()


def test_check_fails_with_a_hint_after_a_write_through_data(engine) -> None:
    bridge = ipcbridge.connect(engine)
    assert bridge.check(prompt=PROMPT).ok
    bridge.model.lm_head.weight.data.mul_(3.0)  # .data: no version counter sees it
    report = bridge.check(prompt=PROMPT, raise_on_failure=False)
    assert not report.ok and report.unfenced_writes == []
    assert "stale prefix cache" in report.hints[0] and "`.data`" in report.hints[0]
    with bridge.update():
        bridge.model.lm_head.weight.data.div_(3.0)
    assert bridge.check(prompt=PROMPT).ok
    bridge.close()


def test_check_without_sampling_judges_no_parity() -> None:
    cfg = tiny_config("llama")
    weights = vllm_weights(reference_model(cfg), cfg)
    bridge = ipcbridge.connect(ipcbridge.export(weights, cfg))
    report = bridge.check()
    assert report.ok and report.parity_ok is None and report.parity_atol is None
    bridge.model.to(torch.float64)
    report = bridge.check(raise_on_failure=False)
    assert not report.ok and "cast, resized" in report.hints[-1]
    bridge.close()

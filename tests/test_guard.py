"""The step guard (Note [the step guard]): misuse of an attached model fails loudly, written as a careless
user would write it."""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import warnings
from collections.abc import Iterator

import pytest
import torch

import ipcbridge
from ipcbridge import BridgeError, guard
from tests.helpers import reference_model, tiny_config, vllm_weights

PROMPT = [3, 14, 15, 92]
IDS = torch.tensor([PROMPT + [7] * 6])


@pytest.fixture(scope="module")
def engine():
    with ipcbridge.LocalEngine(tiny_config("llama"), device="cpu", seed=2) as eng:
        yield eng


@pytest.fixture
def bridge(engine):
    b = ipcbridge.connect(engine)
    yield b
    b.close()


def _in_process_bridge(tied: bool = False):
    cfg = tiny_config("qwen3" if tied else "llama", tied=tied)
    weights = vllm_weights(reference_model(cfg), cfg)
    return ipcbridge.connect(ipcbridge.export(weights, cfg)), weights


def _backward(model: torch.nn.Module) -> None:
    model.train()
    torch.nn.functional.cross_entropy(model(IDS).logits[0, :-1], IDS[0, 1:]).backward()


def test_a_step_outside_update_raises_and_the_same_step_inside_reaches_the_engine(engine, bridge) -> None:
    opt = torch.optim.AdamW(bridge.model.parameters(), lr=1e-2)
    _backward(bridge.model)
    version, before = engine.weight_version, engine.score(PROMPT, [7, 7, 7])
    with pytest.raises(BridgeError, match=r"outside `update\(\)`.*`with bridge\.update\(\):`"):
        opt.step()
    assert engine.score(PROMPT, [7, 7, 7]) == before  # refused before anything was written
    with bridge.update():
        opt.step()
    assert engine.weight_version == bridge.weight_version == version + 1
    assert engine.score(PROMPT, [7, 7, 7]) != before


def test_wrapped_and_subclassed_optimizers_are_guarded_too() -> None:
    bridge, _ = _in_process_bridge()

    class MyAdam(torch.optim.Adam):  # a user's subclass overriding step
        def step(self, closure=None):
            return super().step(closure)

    _backward(bridge.model)
    for opt in (MyAdam(bridge.model.parameters()), torch.optim.SGD(bridge.model.parameters(), lr=0.1)):
        with pytest.raises(BridgeError, match=r"update\(\)"):
            opt.step()
        with bridge.update():
            opt.step()
    bridge.close()


def test_a_step_in_another_thread_than_the_update_is_refused() -> None:
    bridge, _ = _in_process_bridge()
    opt = torch.optim.SGD(bridge.model.parameters(), lr=0.1)
    _backward(bridge.model)
    errors: list[BaseException] = []

    def step() -> None:
        try:
            opt.step()
        except BaseException as e:
            errors.append(e)

    with bridge.update():
        t = threading.Thread(target=step)
        t.start()
        t.join()
    assert len(errors) == 1 and isinstance(errors[0], BridgeError)
    assert "in one thread" in str(errors[0])
    bridge.close()


def test_parameters_of_no_bridge_pass() -> None:
    cfg = tiny_config("llama")
    model = ipcbridge.attach(vllm_weights(reference_model(cfg), cfg), cfg)  # attach without connect: no fence
    bridge, _ = _in_process_bridge()  # the hook is installed
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _backward(model)
    opt.step()
    guard.require_update([torch.zeros(3)])
    bridge.close()


def test_importing_ipcbridge_installs_no_hook() -> None:
    import subprocess
    import sys

    code = ("import ipcbridge, torch.optim.optimizer as o; "
            "assert not o._global_optimizer_pre_hooks, 'import must not install the step guard'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_require_update_is_the_guard_for_code_that_writes_without_an_optimizer() -> None:
    bridge, _ = _in_process_bridge()
    params = list(bridge.model.parameters())
    with pytest.raises(BridgeError, match=r"my_write\(\) writes parameters .* outside `update\(\)`"):
        guard.require_update(params, "my_write()")
    with bridge.update():
        guard.require_update(params, "my_write()")
    bridge.close()
    with pytest.raises(BridgeError, match=r"my_write\(\) would write parameters of a Bridge that was closed"):
        guard.require_update(params, "my_write()")


def test_load_state_dict_outside_update_is_refused() -> None:
    bridge, weights = _in_process_bridge()
    norm = weights["model.norm.weight"].clone()
    state = {k: v.clone().fill_(0.5) for k, v in bridge.model.state_dict().items()}
    with pytest.raises(BridgeError, match=r"load_state_dict\(\) writes parameters .* outside `update\(\)`"):
        bridge.model.load_state_dict(state)
    assert torch.equal(weights["model.norm.weight"], norm)
    with bridge.update():
        bridge.model.load_state_dict(state)
    assert weights["model.norm.weight"].eq(0.5).all()
    bridge.close()


def test_a_model_kept_after_its_bridge_was_dropped_says_so() -> None:
    cfg = tiny_config("llama")
    weights = vllm_weights(reference_model(cfg), cfg)
    model = ipcbridge.connect(ipcbridge.export(weights, cfg)).model
    gc.collect()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _backward(model)
    with pytest.raises(BridgeError, match="garbage-collected: keep a reference to it"):
        opt.step()


# ---- update() refuses a model that no longer aliases the engine ------------------------------------------


def test_update_after_a_cast_names_the_parameters_and_pauses_nothing(engine) -> None:
    bridge = ipcbridge.connect(engine)
    version = engine.weight_version
    bridge.model.to(torch.float64)
    refused = r"21 of 21 parameters no longer alias .*'model\.embed_tokens\.weight'.* and 17 more.*Don't cast"
    with pytest.raises(BridgeError, match=refused), bridge.update():
        pytest.fail("the block must not run")
    assert engine.paused_by is None and engine.weight_version == version
    bridge.close()


def test_update_after_resize_token_embeddings_names_the_embedding(engine) -> None:
    bridge = ipcbridge.connect(engine)
    version = engine.weight_version
    n = bridge.model.config.vocab_size
    bridge.model.resize_token_embeddings(n + 8, mean_resizing=False)
    with pytest.raises(BridgeError, match=r"'model\.embed_tokens\.weight'.*resize_token_embeddings"), bridge.update():
        pass
    assert engine.paused_by is None and engine.weight_version == version
    bridge.close()


def test_a_parameter_replaced_over_the_same_memory_is_adopted_by_the_guard() -> None:
    bridge, weights = _in_process_bridge()
    norm = bridge.model.model.norm
    norm.weight = torch.nn.Parameter(norm.weight.detach())  # the same bytes, a new Parameter object
    with bridge.update():
        pass  # still aliased: accepted, and the new object is now guarded
    opt = torch.optim.SGD([norm.weight], lr=1.0)
    norm.weight.grad = torch.ones_like(norm.weight)
    with pytest.raises(BridgeError, match=r"update\(\)"):
        opt.step()
    with bridge.update():
        opt.step()
    assert torch.equal(weights["model.norm.weight"], norm.weight.detach())
    bridge.close()


def test_the_alias_check_allows_a_to_that_changes_nothing() -> None:
    bridge, _ = _in_process_bridge()
    bridge.model.to("cpu")
    bridge.model.to(torch.float32)
    with bridge.update():
        pass
    bridge.close()


# ---- writes the optimizer hook can't see ------------------------------------------------------------------


def test_update_warns_about_in_place_writes_made_outside_the_last_fence(caplog) -> None:
    bridge, _ = _in_process_bridge()
    with torch.no_grad():
        bridge.model.lm_head.weight.mul_(2.0)
    assert bridge.unfenced_writes() == ["lm_head.weight"]
    with caplog.at_level(logging.WARNING, logger="ipcbridge.bridge"), bridge.update():
        pass
    assert "['lm_head.weight'] were written in place outside `update()`" in caplog.text
    assert bridge.unfenced_writes() == []  # published by that fence
    bridge.close()


def test_connect_warns_once_about_16_bit_weights(monkeypatch) -> None:
    monkeypatch.setattr(ipcbridge.bridge, "_precision_warned", False)
    cfg = tiny_config("llama")
    weights = {k: v.to(torch.bfloat16) for k, v in vllm_weights(reference_model(cfg), cfg).items()}
    manifest = ipcbridge.export(weights, cfg)
    with pytest.warns(ipcbridge.PrecisionWarning, match=r"bfloat16.*master_weights\(opt, mode=\"remainder\"\)"):
        first = ipcbridge.connect(manifest)
    with _no_precision_warning():
        second = ipcbridge.connect(manifest)
    first.close()
    second.close()


def test_fp32_weights_do_not_warn(monkeypatch) -> None:
    monkeypatch.setattr(ipcbridge.bridge, "_precision_warned", False)
    with _no_precision_warning():
        bridge, _ = _in_process_bridge()
    bridge.close()


@contextlib.contextmanager
def _no_precision_warning() -> Iterator[None]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield
    assert not [w for w in seen if issubclass(w.category, ipcbridge.PrecisionWarning)]


# ---- Note [the alias check without a walk] ----------------------------------------------------------------


def _swap_module(model: torch.nn.Module) -> None:
    model.model.norm = type(model.model.norm)(model.config.hidden_size)


def _swap_same_module(model: torch.nn.Module) -> None:
    layer = model.model.layers[0]
    model.model.layers[0] = layer  # the same object re-assigned: nothing changed


MUTATIONS = {
    "nothing": lambda m: None,
    "cast": lambda m: m.to(torch.float64),
    "data-replaced": lambda m: setattr(m.lm_head.weight, "data", m.lm_head.weight.detach().clone()),
    "module-replaced": _swap_module,
    "module-reassigned": _swap_same_module,
    "module-deleted": lambda m: delattr(m.model.layers[1], "mlp"),
    "parameter-added": lambda m: m.model.norm.register_parameter("extra", torch.nn.Parameter(torch.zeros(2))),
    "parameter-set-none": lambda m: setattr(m.lm_head, "weight", None),
    "same-memory-new-object": lambda m: setattr(m.model.norm, "weight",
                                                torch.nn.Parameter(m.model.norm.weight.detach())),
    "module-added": lambda m: m.model.add_module("probe", torch.nn.Identity()),
    "parameter-dict-swapped": lambda m: setattr(m.lm_head, "_parameters",
                                                {"weight": torch.nn.Parameter(m.lm_head.weight.detach().clone())}),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_the_fast_alias_check_finds_what_the_walk_finds(mutation: str) -> None:
    cfg = tiny_config("llama")
    fast_model, walk_model = reference_model(cfg), reference_model(cfg)
    fast, walk = guard.Watch(fast_model), guard.Watch(walk_model)
    MUTATIONS[mutation](fast_model)
    MUTATIONS[mutation](walk_model)
    adopted_fast, adopted_walk = [], []
    assert fast.moved(fast_model, adopted_fast.append) == walk._moved_walk(walk_model, adopted_walk.append)
    assert len(adopted_fast) == len(adopted_walk)
    assert fast.moved(fast_model) == walk._moved_walk(walk_model, None)  # and again, after any adoption


def test_the_fast_alias_check_skips_the_walk_until_the_layout_changes(monkeypatch) -> None:
    model = reference_model(tiny_config("llama"))
    watch = guard.Watch(model)
    walks = []
    real_walk = watch._moved_walk
    monkeypatch.setattr(watch, "_moved_walk", lambda m, a: walks.append(1) or real_walk(m, a))
    assert watch.moved(model) == [] and walks == []
    model.model.add_module("probe", torch.nn.Identity())  # no parameters: still aliased, layout changed
    assert watch.moved(model) == [] and walks == [1]
    assert watch.moved(model) == [] and walks == [1]  # the clean walk took the new layout
    assert watch.moved(reference_model(tiny_config("llama"))) != [] and walks == [1, 1]  # another model

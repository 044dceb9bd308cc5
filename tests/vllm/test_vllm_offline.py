"""Real vLLM 0.25.1, offline ``vllm.LLM`` (through ``VllmEngine``), tiny llama / qwen2 / qwen3 with dummy
weights on one GPU. Run on the GPU machine: ``pytest -m vllm tests/vllm``.

Per architecture, one engine (module-scoped fixture), and in order:
  1. connect(check=True): coverage 100%, zero copy (every parameter inside vLLM's storages, 0 trainer
     weight bytes, ~0 bytes allocated by attaching), parity of logprobs on vLLM's dummy weights;
  2. weights initialised through the bridge, then parity on greedy and on temperature-1 samples;
  3. one optimizer step changes vLLM's next greedy generation exactly as the HF model predicts;
  4. (llama) the colocated REINFORCE loop of examples/vllm_colocated_rl.py raises the reward.
"""

from __future__ import annotations

import importlib.util
import os
import statistics

import pytest
import torch

import ipcbridge
from tests.vllm import vllm_helpers as H

pytestmark = pytest.mark.vllm

PROMPTS = H.PROMPTS
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module", params=H.ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def engine(arch: str):
    H.require_vllm()
    from ipcbridge.vllm.colocate import VllmEngine
    from ipcbridge.vllm.extension import EXTENSION_QUALNAME
    from ipcbridge.vllm.testing import TESTING_EXTENSION_QUALNAME

    # init="dummy": keep vLLM's dummy weights; the tests write their own init through the bridge. One
    # architecture runs with the testing subclass of the extension: real vLLM must mix it into its worker
    # and the driver's config check must accept it.
    ext = TESTING_EXTENSION_QUALNAME if arch == "qwen3" else EXTENSION_QUALNAME
    with VllmEngine(H.tiny_config(arch), gpu_memory_utilization=0.25, init="dummy",
                    worker_extension_cls=ext) as eng:
        yield eng


@pytest.fixture(scope="module")
def bridge(engine):
    torch.empty(1, device="cuda")  # the trainer's CUDA context exists before the baseline is read
    before = H.cuda_allocated()
    b = ipcbridge.connect(engine)  # check() runs in the first test, after the memory reading
    b.attach_allocated_bytes = H.cuda_allocated() - before  # type: ignore[attr-defined]
    yield b
    b.close()


def test_attach_coverage_zero_copy_dummy_parity(arch: str, engine, bridge) -> None:
    report = bridge.check(prompt=PROMPTS[0], max_tokens=16)
    info = engine.ipcbridge_endpoint().info()
    assert info["pid"] != os.getpid(), "the model should live in the EngineCore child process"
    assert report.ok
    assert report.engine_tensors_used == report.engine_tensors
    assert report.parameters_outside_engine == []
    assert report.trainer_weight_bytes == 0
    # Attaching allocates no weight memory in the trainer: only buffers such as rotary inv_freq (bytes).
    assert bridge.attach_allocated_bytes < 1 << 20
    H.record("attach", arch=arch, hf_parameters=report.hf_parameters, engine_tensors=report.engine_tensors,
             engine_tensors_used=report.engine_tensors_used, trainer_weight_bytes=report.trainer_weight_bytes,
             model_weight_bytes=report.model_weight_bytes, engine_weight_bytes=info["weight_bytes"],
             attach_allocated_bytes=bridge.attach_allocated_bytes, attach_s=round(bridge.attach_seconds, 3),
             parity_dummy_greedy_mean=report.logprob_mean_abs_diff,
             parity_dummy_greedy_max=report.logprob_max_abs_diff, worker_pid=info["pid"], driver_pid=os.getpid())
    assert report.logprob_mean_abs_diff is not None and report.logprob_mean_abs_diff < 0.05


def test_parity_after_init_through_bridge(arch: str, engine, bridge) -> None:
    with bridge.update():
        H.init_weights(bridge.model, seed=0)
    assert engine.ipcbridge_endpoint().engine_weight_version() == bridge.weight_version
    greedy = engine.generate(PROMPTS, max_tokens=16, temperature=0.0)
    sampled = engine.generate(PROMPTS, max_tokens=16, temperature=1.0, seed=1234)
    assert all(o.weight_version == bridge.weight_version for o in greedy + sampled)
    pg, ps = H.parity(bridge.model, greedy), H.parity(bridge.model, sampled)
    agreement = [H.top1_agreement(bridge.model, p, o.token_ids) for p, o in zip(PROMPTS, greedy, strict=True)]
    H.record("parity", arch=arch, weights="N(0,0.02) init via bridge", greedy=pg, sampled_t1=ps,
             greedy_top1_agreement=agreement)
    assert pg["mean_abs_diff"] < 0.05 and ps["mean_abs_diff"] < 0.05


def test_one_step_changes_greedy_as_hf_predicts(arch: str, engine, bridge) -> None:
    n = 12
    before = [o.token_ids for o in engine.generate(PROMPTS, max_tokens=n)]
    target = 777
    H.decisive_step(bridge, PROMPTS, target)
    after = [o.token_ids for o in engine.generate(PROMPTS, max_tokens=n)]
    predicted = [H.hf_greedy(bridge.model, p, n) for p in PROMPTS]
    H.record("greedy_step", arch=arch, before=before, after_vllm=after, after_hf=predicted,
             weight_version=bridge.weight_version,
             engine_weight_version=engine.ipcbridge_endpoint().engine_weight_version())
    assert after != before
    assert after == predicted


#: Prompts of 40 tokens: two full KV blocks each, so a repeat is a prefix-cache hit (the short PROMPTS fill no
#: block, and could not show stale KV).
LONG = [list(range(10 + 41 * i, 50 + 41 * i)) for i in range(3)]


@pytest.mark.parametrize("kv_reset", ["salted", "always"])
def test_no_stale_kv_after_a_step(arch: str, engine, bridge, kv_reset: str) -> None:
    """Note [stale KV: reset or salt]: after a step, prompts whose blocks are cached must not reuse them.
    "salted": ipcbridge's own requests carry the weight version's salt, and the fence does not reset.
    "always": a second bridge whose fence resets, and the user's own unsalted requests."""
    from ipcbridge.vllm.endpoints import LLMEndpoint, greedy_params

    n = 8
    ep = engine.ipcbridge_endpoint() if kv_reset == "salted" else LLMEndpoint(engine.llm, kv_reset="always")
    b = bridge if kv_reset == "salted" else ipcbridge.connect(ep)

    def gen() -> list[list[int]]:
        if kv_reset == "salted":
            return [t for t, _ in ep.generate(LONG, n)]
        outs = engine.llm.generate([{"prompt_token_ids": p} for p in LONG], greedy_params(n), use_tqdm=False)
        return [[int(t) for t in o.outputs[0].token_ids] for o in outs]

    try:
        gen()
        before = gen()  # served from the prefix cache
        H.decisive_step(b, LONG, 555 if kv_reset == "salted" else 333)
        after = gen()
        predicted = [H.hf_greedy(b.model, p, n) for p in LONG]
        H.record("stale_kv", arch=arch, kv_reset=kv_reset, before=before, after_vllm=after, after_hf=predicted,
                 fence_ms=[round(1e3 * s, 3) for s in b.fence_seconds])
        assert after != before
        assert after == predicted
    finally:
        if b is not bridge:
            b.close()


def _load_example():
    path = os.path.join(ROOT, "examples", "vllm_colocated_rl.py")
    spec = importlib.util.spec_from_file_location("vllm_colocated_rl", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_colocated_reinforce_raises_reward(arch: str, engine, bridge) -> None:
    if arch != "llama":
        pytest.skip("the RL loop runs once, on llama")
    example = _load_example()
    with bridge.update():
        H.init_weights(bridge.model, seed=1)
    history = example.train(engine, bridge, steps=24, log=None)
    first = statistics.fmean(h["reward"] for h in history[:4])
    last = statistics.fmean(h["reward"] for h in history[-4:])
    H.record("reinforce", arch=arch, reward_first4=first, reward_last4=last,
             rewards=[round(h["reward"], 3) for h in history],
             parity_mean=[round(h["logprob_mean_abs_diff"], 5) for h in history],
             fence_median_ms=1e3 * (bridge.fence_seconds_median() or 0), weight_version=bridge.weight_version)
    assert all(h["engine_weight_version"] == h["weight_version"] for h in history)
    assert last > first + 0.1

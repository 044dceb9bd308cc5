"""ipcbridge.stream() end to end: a trainer-owned model streamed over gloo into a real LocalEngine on CPU."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

import ipcbridge
from ipcbridge import BridgeError, EngineError
from ipcbridge.logprobs import greedy, sequence_logprobs
from ipcbridge.stream.group import master_store
from ipcbridge.stream.plan import plan_buckets
from tests.helpers import tiny_config

PROMPT = [3, 14, 15, 92]
SEED = 1


def trainer_model(config, seed: int = SEED):
    """The engine's model, built the way the engine builds it (same config, same seed), owned by the trainer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def assert_engine_serves(engine, model, version: int) -> None:
    out = engine.generate([PROMPT], max_tokens=6)[0]
    assert out.weight_version == version
    assert out.token_ids == greedy(model, PROMPT, 6)
    lp = torch.tensor(sequence_logprobs(model, PROMPT, out.token_ids))
    assert torch.allclose(lp, torch.tensor(engine.score(PROMPT, out.token_ids)), atol=1e-4)


@pytest.fixture(scope="module")
def engine():
    with ipcbridge.LocalEngine(tiny_config("llama"), seed=SEED, device="cpu") as eng:
        yield eng


@pytest.fixture(scope="module")
def model():
    return trainer_model(tiny_config("llama"))


@pytest.fixture
def sb(engine, model):
    # A fresh stream per test (connecting takes milliseconds): the engine serves only its newest stream.
    # 4 KiB buckets: 15 engine tensors travel in a dozen buckets, the embedding and lm_head in their own.
    with ipcbridge.stream(engine, model, bucket_bytes=4096, timeout=10) as s:
        yield s


def test_an_optimizer_step_reaches_the_engine(engine, model, sb) -> None:
    assert sb.backend == "gloo" and len(sb.plan.buckets) > 2
    assert engine.generate([PROMPT], max_tokens=6)[0].token_ids == greedy(model, PROMPT, 6)  # same start
    engine.generate([PROMPT], max_tokens=4)  # fills the prefix cache with KV of the current weights
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    ids = torch.tensor([[*PROMPT, 7, 7, 7]])
    loss = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])
    loss.backward()
    before = greedy(model, PROMPT, 6)
    version = sb.weight_version
    with sb.update():
        opt.step()
    opt.zero_grad()
    assert greedy(model, PROMPT, 6) != before  # the step changed what the model says
    assert sb.weight_version == engine.weight_version == version + 1
    assert_engine_serves(engine, model, version + 1)  # a stale prefix cache would start from old KV
    stats = sb.stats()
    assert stats["pushes"] >= 1 and stats["bytes_sent"] >= sb.plan.wire_bytes and stats["push_seconds_total"] > 0
    assert engine.stats()["stream_bytes"] == stats["bytes_sent"]


def test_push_sends_weights_without_a_step(engine, model, sb) -> None:
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(-1.0)
        model.model.layers[1].self_attn.k_proj.weight.add_(0.3)  # a part of a fused qkv_proj
    sb.push()
    assert_engine_serves(engine, model, sb.weight_version)


def test_a_failing_step_leaves_the_engine_untouched(engine, model, sb) -> None:
    version = sb.weight_version
    served = engine.generate([PROMPT], max_tokens=6)[0].token_ids
    with pytest.raises(RuntimeError, match="boom"), sb.update(), torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
        raise RuntimeError("boom")
    out = engine.generate([PROMPT], max_tokens=6)[0]
    # resumed with the weights unchanged; the version still moves forward, as on every resume
    assert out.weight_version == engine.weight_version == sb.weight_version == version + 1
    assert out.token_ids == served
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)


def test_shape_and_dtype_changes_are_refused_before_the_engine_pauses(engine, model, sb) -> None:
    version = sb.weight_version
    original = model.lm_head.weight
    model.lm_head.weight = torch.nn.Parameter(torch.zeros(101, 64))  # as resize_token_embeddings would
    try:
        with pytest.raises(BridgeError, match=r"lm_head.weight: .*\[101, 64\].*take torch.float32 \[100, 64\]"):
            sb.push()
        model.lm_head.weight = torch.nn.Parameter(original.detach().double())
        with pytest.raises(BridgeError, match=r"float64.*Fix: keep the model's shapes and dtypes"):
            sb.push()
    finally:
        model.lm_head.weight = original
    assert engine.generate([PROMPT], max_tokens=1)[0].weight_version == version  # never paused
    sb.push()  # and the stream still works
    assert_engine_serves(engine, model, sb.weight_version)
    assert sb.weight_version == version + 1


def test_a_model_of_another_config_is_refused_at_connect(engine) -> None:
    other = trainer_model(tiny_config("llama", num_hidden_layers=3))
    with pytest.raises(BridgeError, match=r"no longer matches the engine's weights: .*not in the engine \['model.layers.2"):
        ipcbridge.stream(engine, other, timeout=10)


def test_an_engine_that_cannot_receive_streams_is_refused(engine, model) -> None:
    with pytest.raises(BridgeError, match=r"endpoint 'manifest' cannot receive streamed weights .*connect\(\)"):
        ipcbridge.stream(engine.manifest(), model)


def test_the_engine_refuses_a_plan_that_is_not_its_own(engine, model, sb) -> None:
    plan = plan_buckets({"model.embed_tokens.weight": torch.zeros(128, 64)}, 1 << 20)
    store = master_store("127.0.0.1", 5)
    t0 = time.monotonic()
    with pytest.raises(EngineError, match="does not cover this engine's weights"):
        engine.stream_init("other", host="127.0.0.1", port=store.port, backend="gloo", timeout=5,
                           plan=plan.to_dict())
    assert time.monotonic() - t0 < 5
    sb.push()  # a refused request leaves the open stream alone
    assert_engine_serves(engine, model, sb.weight_version)


def test_a_newer_stream_replaces_an_older_one(engine, model, sb) -> None:
    with ipcbridge.stream(engine, model, timeout=10) as newer:  # default buckets: one bucket
        assert len(newer.plan.buckets) == 1
        with torch.no_grad():
            model.model.norm.weight.add_(0.5)
        newer.push()
        assert_engine_serves(engine, model, newer.weight_version)
        t0 = time.monotonic()
        with pytest.raises(BridgeError, match=r"replaced by a newer ipcbridge\.stream"):
            sb.push()
        assert time.monotonic() - t0 < 5
        with torch.no_grad():
            model.model.norm.weight.sub_(0.5)
        newer.push()  # the old stream's failure left the newer one alone
        assert_engine_serves(engine, model, newer.weight_version)
    with pytest.raises(BridgeError, match="closed"):
        newer.push()


def test_closed_stream_is_refused(engine, model) -> None:
    s = ipcbridge.stream(engine, model, timeout=10)
    s.close()
    s.close()
    with pytest.raises(BridgeError, match=r"stream is closed .* ipcbridge.stream\(engine, model\)"), s.update():
        pass


def test_packing_resolves_the_mapping_once_and_pushes_only_copy(engine, model, monkeypatch) -> None:
    """Note [packing from HF tensors]: the HF views of each (bucket, buffer) are built at the first push; later
    pushes only copy, so the trainer's CPU keeps ahead of the wire. The engine's own receive time is kept."""
    from ipcbridge import mapping

    with ipcbridge.stream(engine, model, bucket_bytes=4096, timeout=10) as s:
        s.push()
        calls = []
        real = mapping.hf_views
        monkeypatch.setattr(mapping, "hf_views", lambda *a, **k: calls.append(1) or real(*a, **k))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        s.push()
        assert calls == []
        assert_engine_serves(engine, model, s.weight_version)  # the cached views packed the new weights
        assert len(s.receive_seconds) == 2 and s.stats()["receive_seconds_median"] > 0


def test_close_tears_both_ends_down_at_once(engine, model, monkeypatch) -> None:
    """Note [closing an NCCL group takes both sides]: an NCCL end's close waits for the peer's, and the engine
    closes its end inside the ``stream_close`` RPC; one after the other, they deadlocked against real vLLM."""
    import threading

    s = ipcbridge.stream(engine, model, timeout=10)
    trainer_closing, engine_closing = threading.Event(), threading.Event()
    waited: dict[str, bool] = {}
    group_close, rpc = s._group.close, s.endpoint.stream_close

    def collective_close(*args, **kwargs):  # the trainer's end returns only once the engine's closes too
        trainer_closing.set()
        waited["trainer"] = engine_closing.wait(5)
        group_close(*args, **kwargs)

    def engine_close(stream_id):  # and the engine's only once the trainer's does
        engine_closing.set()
        waited["engine"] = trainer_closing.wait(5)
        return rpc(stream_id)

    monkeypatch.setattr(s._group, "close", collective_close)
    monkeypatch.setattr(s.endpoint, "stream_close", engine_close)
    t0 = time.monotonic()
    s.close()
    assert waited == {"trainer": True, "engine": True} and time.monotonic() - t0 < 4


def test_tied_embeddings_and_vocab_padding() -> None:
    cfg = tiny_config("qwen3", tied=True)
    with ipcbridge.LocalEngine(cfg, seed=SEED, device="cpu") as eng:
        model = trainer_model(cfg)
        with ipcbridge.stream(eng, model, bucket_bytes=8192, timeout=10) as s:
            assert "lm_head.weight" not in {t.name for t in s.plan.slots}
            with torch.no_grad():
                model.model.embed_tokens.weight.mul_(3.0)  # also the tied lm_head
            s.push()
            assert_engine_serves(eng, model, 1)
        untied = trainer_model(cfg)
        untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
        with pytest.raises(BridgeError, match=r"ties lm_head\.weight to model\.embed_tokens\.weight"):
            ipcbridge.stream(eng, untied, timeout=10)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two distinct GPUs for two ranks")
def test_nccl_stream_from_one_gpu_into_an_engine_on_another() -> None:
    cfg = tiny_config("llama")
    with ipcbridge.LocalEngine(cfg, seed=SEED, device="cuda:1", dtype=torch.float32) as eng:
        model = trainer_model(cfg).to("cuda:0")
        with ipcbridge.stream(eng, model, bucket_bytes=8192, timeout=60) as s:
            assert s.backend == "nccl"
            with torch.no_grad():
                model.model.embed_tokens.weight.mul_(-1.0)
            s.push()
            model_cpu = trainer_model(cfg)
            model_cpu.load_state_dict(model.state_dict())
            assert eng.generate([PROMPT], max_tokens=6)[0].token_ids == greedy(model_cpu, PROMPT, 6)


def test_engine_killed_mid_transfer_is_a_clear_error_without_a_hang() -> None:
    cfg = tiny_config("llama")
    eng = ipcbridge.LocalEngine(cfg, seed=SEED, device="cpu")
    try:
        model = trainer_model(cfg)
        s = ipcbridge.stream(eng, model, bucket_bytes=4096, timeout=30)
        pack = s._pack
        packed = []

        def pack_then_die(bucket, out) -> None:
            packed.append(bucket)
            if len(packed) == 3:  # the engine has taken a bucket or two and waits for more
                os.kill(eng.pid, signal.SIGKILL)
                eng._proc.wait(10)
            pack(bucket, out)

        s._pack = pack_then_die
        t0 = time.monotonic()
        with pytest.raises(BridgeError, match=r"(?s)streaming weights to the engine failed \(engine: .*(exited|closed).*partly updated"):
            s.push()
        assert time.monotonic() - t0 < 10  # far below the 30 s group timeout
        assert len(packed) < len(s.plan.buckets)
        with pytest.raises(BridgeError, match="stream is closed"):
            s.push()
        s.close()
        t0 = time.monotonic()
        with pytest.raises(EngineError, match="has exited"):
            ipcbridge.stream(eng, model, timeout=30)
        assert time.monotonic() - t0 < 5
    finally:
        eng.close()

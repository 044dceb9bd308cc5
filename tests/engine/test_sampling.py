"""The embedded engine samples like vLLM: n, top-k/top-p, stop and EOS tokens, raw or processed logprobs."""

from __future__ import annotations

import pytest
import torch

import ipcbridge
from ipcbridge import RequestError
from ipcbridge.engine.inputs import Sampling
from ipcbridge.engine.sampling import filter_logits, sample_tokens
from tests.helpers import tiny_config

PROMPT = [3, 14, 15, 92]


@pytest.fixture(scope="module")
def engine():
    with ipcbridge.LocalEngine(tiny_config("llama", eos_token_id=5), device="cpu") as e:
        yield e


def test_filter_logits_keeps_top_k_and_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)[0, 2:]).all()
    assert not torch.isinf(filter_logits(logits, 2, 1.0)[0, :2]).any()
    nucleus = filter_logits(logits, 0, 0.7)[0]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: two survive
    assert torch.isfinite(nucleus[:2]).all() and torch.isinf(nucleus[2:]).all()
    assert torch.isfinite(filter_logits(logits, 0, 1e-6)[0, 0])  # the most likely token always survives
    assert torch.equal(filter_logits(logits, 0, 1.0), logits) and torch.equal(filter_logits(logits, -1, 1.0), logits)


def test_processed_logprobs_are_after_the_temperature() -> None:
    logits = torch.randn(3, 50)
    g = torch.Generator().manual_seed(0)
    toks, raw = sample_tokens(logits, 0.5, Sampling(), g)
    g = torch.Generator().manual_seed(0)
    toks2, processed = sample_tokens(logits, 0.5, Sampling(logprobs="processed"), g)
    assert torch.equal(toks, toks2)
    assert torch.allclose(raw, torch.log_softmax(logits, -1).gather(1, toks[:, None])[:, 0])
    assert torch.allclose(processed, torch.log_softmax(logits / 0.5, -1).gather(1, toks[:, None])[:, 0])


def test_n_completions_per_prompt_prompt_major(engine) -> None:
    outs = engine.generate([PROMPT, [7, 8]], max_tokens=5, temperature=1.0, seed=3, n=3)
    assert len(outs) == 6 and all(len(o.token_ids) == 5 for o in outs)
    assert len({tuple(o.token_ids) for o in outs[:3]}) > 1  # three samples, not one repeated
    # n rows share one prefill and decode as a batch: row 0 of a greedy n=2 is the n=1 completion
    one = engine.generate([PROMPT], max_tokens=5)[0]
    two = engine.generate([PROMPT], max_tokens=5, n=2)
    assert two[0].token_ids == two[1].token_ids == one.token_ids
    assert two[0].logprobs == pytest.approx(one.logprobs, abs=1e-5)


def test_stop_tokens_end_a_row_and_are_returned(engine) -> None:
    greedy = engine.generate([PROMPT], max_tokens=6)[0]
    stop = greedy.token_ids[2]
    first = greedy.token_ids.index(stop)
    out = engine.generate([PROMPT], max_tokens=6, stop_token_ids=[stop])[0]
    assert out.token_ids == greedy.token_ids[:first + 1] and out.finish_reason == "stop"
    assert greedy.finish_reason == "length"


def test_eos_stops_only_without_ignore_eos(engine) -> None:
    # Make EOS (id 5, from the config's generation settings) the greedy choice by editing the served head.
    bridge = ipcbridge.connect(engine)
    try:
        head = bridge.model.lm_head.weight
        saved = head.detach().clone()
        with bridge.update(), torch.no_grad():
            head[5] += 10 * head.abs().max()
        assert engine.generate([PROMPT], max_tokens=4)[0].token_ids.count(5) >= 1
        out = engine.generate([PROMPT], max_tokens=4, ignore_eos=False)[0]
        assert out.token_ids[-1] == 5 and out.finish_reason == "stop" and out.token_ids.count(5) == 1
        with bridge.update(), torch.no_grad():
            head.copy_(saved)
    finally:
        bridge.close()


@pytest.mark.parametrize(("kw", "match"), [
    ({"n": 0}, "n must be"), ({"n": 10**6}, "n must be"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"stop_token_ids": [1.5]}, "stop_token_ids"), ({"stop_token_ids": [10**6]}, "vocabulary"),
    ({"logprobs": "logits"}, "logprobs"), ({"ignore_eos": 1}, "ignore_eos"),
])
def test_bad_sampling_is_refused_before_sending(engine, kw, match) -> None:
    with pytest.raises(RequestError, match=match):
        engine.generate([PROMPT], max_tokens=2, **kw)


def test_the_engine_checks_sampling_itself() -> None:
    with pytest.raises(RequestError, match="unknown sampling fields"):
        Sampling.from_dict({"n": 1, "min_p": 0.1})
    with pytest.raises(RequestError, match="must be a dict"):
        Sampling.from_dict([1])
    assert Sampling.from_dict(Sampling(n=2, stop_token_ids=(3,)).to_dict()) == Sampling(n=2, stop_token_ids=(3,))

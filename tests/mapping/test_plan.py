"""Plans: every tensor resolved exactly once in both directions, alias vs copy per direction, the config
read once per plan, and resolution errors that name the tensor or field."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from ipcbridge import mapping
from ipcbridge.errors import MappingError
from tests.mapping.mapping_cases import CASE_IDS, CASES, Built, built, in_every_layout


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def case(request) -> Built:
    return built(request.param.id)


def _raises(message: str):
    return pytest.raises(MappingError, match=re.escape(message))


def test_coverage_exactly_once(case: Built) -> None:
    steps = mapping.plan_from_vllm(case.vllm, case.config)
    counts = Counter(s.hf for s in steps)
    assert set(counts) == set(case.params), "every HF parameter, tied ones included, has a step"
    assert all(n == 1 for n in counts.values())
    assert {s.target for s in steps} == set(case.vllm), "every vLLM tensor is used"
    hf_steps = mapping.plan_from_hf(case.hf, case.config)
    assert Counter(s.hf for s in hf_steps) == counts
    tied = [s for s in steps if s.op == "tied"]
    assert bool(tied) == bool(getattr(case.config, "tie_word_embeddings", False))
    # vLLM -> HF is always a view; the plan says which HF -> vLLM directions copy.
    assert all(s.kind("vllm", "hf") == "alias" for s in steps)
    for s in steps:
        assert s.kind("hf", "vllm") == ("copy" if s.op in ("rows", "vocab", "transpose") else "alias")


def test_both_directions_resolve_to_the_same_steps(case: Built) -> None:
    """The inverse is derived from the one table: resolving HF names and vLLM names gives equal steps."""
    key = lambda s: (s.hf, s.target, s.op, s.start, s.stop, s.total)  # noqa: E731
    assert sorted(map(key, mapping.plan_from_hf(case.hf, case.config))) == sorted(
        map(key, mapping.plan_from_vllm(case.vllm, case.config)))


@pytest.mark.parametrize(("model_type", "tied"), [("llama", False), ("llama", True), ("mistral", False)],
                         ids=["llama-untied", "llama-tied", "mistral"])
def test_meta_to_hf_aliases_all_but_the_rotary_tensors(model_type: str, tied: bool) -> None:
    cfg, _, sd = in_every_layout(model_type, tied)
    steps = mapping.plan(sd["meta"], cfg, "meta", "hf")
    kinds = {s.target: s.kind("meta", "hf") for s in steps if s.op != "tied"}
    assert {n for n, k in kinds.items() if k == "copy"} == {
        f"layers.{i}.attention.{w}.weight" for i in range(2) for w in ("wq", "wk")
    }
    assert all(s.kind("hf", "meta") == kinds[s.target] for s in steps if s.op != "tied")
    hf = mapping.convert(sd["meta"], cfg, "meta", "hf")
    for s in steps:
        shares = hf[s.hf].data_ptr() == sd["meta"][s.target].data_ptr()
        assert shares == (kinds.get(s.target, "alias") == "alias"), s.hf


def test_steps_and_rules_name_the_other_layout_target() -> None:
    cfg, _, sd = in_every_layout("llama")
    wq = next(s for s in mapping.plan(sd["meta"], cfg, "meta", "hf") if s.hf.endswith("0.self_attn.q_proj.weight"))
    assert (wq.target, wq.layout, wq.op, wq.heads) == ("layers.0.attention.wq.weight", "meta", "rotary", 4)
    assert wq.copy_to_target and wq.copy_to_hf
    assert not hasattr(wq, "vllm") and not hasattr(wq, "copy_to_vllm")
    rule = mapping.get_arch(cfg, "meta").params["model.layers.{}.self_attn.q_proj.weight"]
    assert rule.target == "layers.{}.attention.wq.weight" and not hasattr(rule, "vllm")
    with _raises("this step maps 'hf' <-> 'meta', not 'vllm' -> 'hf'; plan each hop"):
        wq.kind("vllm", "hf")
    with _raises("plan() maps one hop to or from 'hf'; plan 'meta' -> 'hf' -> 'vllm' in two"):
        mapping.plan(sd["meta"], cfg, "meta", "vllm")


class CountingConfig(dict):
    """A config dict that counts how often each field is read."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reads: Counter[str] = Counter()

    def get(self, key, default=None):
        self.reads[key] += 1
        return super().get(key, default)


@pytest.mark.parametrize("layout", ["vllm", "meta"])
def test_the_config_is_read_once_per_plan_not_per_tensor(layout: str) -> None:
    cfg, _, sd = in_every_layout("llama")
    two_layers = list(sd[layout])
    # The names of 8 layers against the same config: plans resolve names, the config only gives sizes.
    eight_layers = two_layers + [n.replace(".1.", f".{i}.") for i in range(2, 8) for n in two_layers if ".1." in n]
    reads = []
    for names in (two_layers, eight_layers):
        config = CountingConfig(cfg.to_dict())
        assert len(mapping.plan(names, config, layout, "hf")) >= len(names)
        reads.append(config.reads)
    assert reads[0] == reads[1] and reads[0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 30, "head_dim": None}, "hidden_size 30 is not divisible by num_attention_heads 4"),
        ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
        ({"num_attention_heads": 0}, "config.num_attention_heads must be a positive integer, got 0"),
        ({"vocab_size": None}, "config.vocab_size must be a positive integer, got None"),
    ],
)
def test_config_whose_sizes_do_not_fit(overrides: dict, message: str) -> None:
    cfg, _, sd = in_every_layout("llama")
    bad = {**cfg.to_dict(), **overrides}
    with _raises(message):
        mapping.to_vllm(sd["hf"], bad)


def test_tied_config_with_an_untied_tensor() -> None:
    cfg, _, sd = in_every_layout("llama")
    tied = {**cfg.to_dict(), "tie_word_embeddings": True}
    with _raises("vLLM tensor 'lm_head.weight' exists but config ties word embeddings"):
        mapping.convert(sd["vllm"], tied, "vllm", "hf")
    with _raises("Meta tensor 'output.weight' exists but config ties word embeddings"):
        mapping.convert(sd["meta"], tied, "meta", "hf")

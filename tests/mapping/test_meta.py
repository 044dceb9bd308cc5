"""The Meta / torchtitan layout: names, conversions between all three layouts, alias vs copy."""

from __future__ import annotations

import itertools

import pytest
import torch
from mapping_cases import COMMON, reference_model, token_ids

import ipcbridge
from ipcbridge import mapping
from ipcbridge.errors import MappingError

LAYOUTS = ("hf", "vllm", "meta")


def _config(model_type: str = "llama", tied: bool = False):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, num_key_value_heads=2, tie_word_embeddings=tied, **COMMON)


@pytest.fixture(scope="module", params=[("llama", False), ("llama", True), ("mistral", False)],
                ids=["llama-untied", "llama-tied", "mistral"])
def setup(request):
    cfg = _config(*request.param)
    ref = reference_model(cfg)
    hf = dict(ref.state_dict())
    return cfg, ref, {layout: mapping.convert(hf, cfg, "hf", layout) for layout in LAYOUTS}


def test_meta_names(setup) -> None:
    cfg, _, sd = setup
    layer = ["attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
             "feed_forward.w3", "attention_norm", "ffn_norm"]
    expected = {"tok_embeddings.weight", "norm.weight"} | {f"layers.{i}.{n}.weight" for i in range(2) for n in layer}
    if not cfg.tie_word_embeddings:
        expected.add("output.weight")
    assert set(sd["meta"]) == expected
    assert sd["meta"]["tok_embeddings.weight"].shape == (100, 32)  # Meta does not pad the vocab
    assert sd["meta"]["layers.1.attention.wk.weight"].shape == (16, 32)  # 2 kv heads of 8


@pytest.mark.parametrize(("src", "dst"), list(itertools.permutations(LAYOUTS, 2)))
def test_convert_between_every_pair(setup, src: str, dst: str) -> None:
    cfg, _, sd = setup
    out = mapping.convert(sd[src], cfg, src, dst)
    expected = sd[dst]
    if dst == "hf" and cfg.tie_word_embeddings:
        expected = {**expected, "lm_head.weight": expected["model.embed_tokens.weight"]}
    assert set(out) == set(expected)
    for name, t in out.items():
        assert torch.equal(t, expected[name]), name


def test_meta_to_hf_aliases_all_but_the_rotary_tensors(setup) -> None:
    cfg, _, sd = setup
    steps = mapping.plan(sd["meta"], cfg, "meta", "hf")
    kinds = {s.vllm: s.kind("meta", "hf") for s in steps if s.op != "tied"}
    assert {n for n, k in kinds.items() if k == "copy"} == {
        f"layers.{i}.attention.{w}.weight" for i in range(2) for w in ("wq", "wk")
    }
    assert all(s.kind("hf", "meta") == kinds[s.vllm] for s in steps if s.op != "tied")
    hf = mapping.convert(sd["meta"], cfg, "meta", "hf")
    for s in steps:
        shares = hf[s.hf].data_ptr() == sd["meta"][s.vllm].data_ptr()
        assert shares == (kinds.get(s.vllm, "alias") == "alias"), s.hf


def test_alias_only_names_the_first_copy(setup) -> None:
    cfg, _, sd = setup
    with pytest.raises(MappingError, match=r"Meta tensor 'layers\.0\.attention\.wq\.weight' .* rotary permutation"):
        mapping.convert(sd["meta"], cfg, "meta", "hf", alias_only=True)
    with pytest.raises(MappingError, match=r"HF tensor 'model\.embed_tokens\.weight' -> vLLM .* padded to 128"):
        mapping.convert(sd["hf"], cfg, "hf", "vllm", alias_only=True)
    with pytest.raises(MappingError, match=r"needs a copy: the rotary permutation"):
        mapping.convert(sd["vllm"], cfg, "vllm", "meta", alias_only=True)
    views = mapping.convert(sd["vllm"], cfg, "vllm", "hf", alias_only=True)
    storages = {t.untyped_storage().data_ptr() for t in sd["vllm"].values()}
    assert all(v.untyped_storage().data_ptr() in storages for v in views.values())


def test_attach_refuses_a_meta_export_naming_the_tensor(setup) -> None:
    cfg, _, sd = setup
    meta = {k: t.clone() for k, t in sd["meta"].items()}
    manifest = ipcbridge.export(meta, cfg, layout="meta")
    with pytest.raises(MappingError, match=r"'layers\.0\.attention\.wq\.weight'.*needs a copy"):
        ipcbridge.attach(manifest)


def test_meta_weights_served_through_vllm_give_the_reference_logits(setup) -> None:
    cfg, ref, sd = setup
    v = mapping.convert(sd["meta"], cfg, "meta", "vllm")
    model = ipcbridge.attach(v, cfg)
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)

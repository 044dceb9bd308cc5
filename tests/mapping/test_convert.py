"""Applying plans: shapes, round trips between every pair of layouts, zero-copy attach with the reference
model's exact logits, alias-only conversion, and errors that name the missing, extra or misshapen tensor."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

import ipcbridge
from ipcbridge import mapping
from ipcbridge.errors import MappingError
from tests.mapping.mapping_cases import CASE_IDS, CASES, LAYOUTS, Built, built, in_every_layout, token_ids

META_CASES = [("llama", False), ("llama", True), ("mistral", False)]
META_IDS = ["llama-untied", "llama-tied", "mistral"]


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def case(request) -> Built:
    return built(request.param.id)


@pytest.fixture(scope="module", params=META_CASES, ids=META_IDS)
def setup(request):
    return in_every_layout(*request.param)


def _raises(message: str):
    return pytest.raises(MappingError, match=re.escape(message))


# ---- every mapped architecture, vLLM layout ------------------------------------------------------------


def test_shapes(case: Built) -> None:
    views = mapping.hf_views(case.vllm, case.config)
    assert {n: tuple(t.shape) for n, t in views.items()} == {n: tuple(p.shape) for n, p in case.params.items()}
    for s in mapping.plan_from_vllm(case.vllm, case.config):
        if s.op == "vocab":
            assert case.vllm[s.target].shape[0] == 128  # vocab 100 padded to a multiple of 64


def test_hf_vllm_hf_round_trip(case: Built) -> None:
    back = mapping.convert(mapping.convert(case.hf, case.config, "hf", "vllm"), case.config, "vllm", "hf")
    assert set(back) == set(case.params)
    for name, t in back.items():
        assert torch.equal(t, case.hf[name]), name
    again = mapping.convert(back, case.config, "hf", "vllm")
    assert set(again) == set(case.vllm)
    assert all(torch.equal(again[k], case.vllm[k]) for k in again)


def test_attach_is_zero_copy_with_reference_logits(case: Built) -> None:
    v = {k: t.clone() for k, t in case.vllm.items()}
    model = ipcbridge.attach(v, case.config)
    storages = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in v.values()]
    for name, p in model.named_parameters(remove_duplicate=False):
        assert any(lo <= p.data_ptr() < lo + n for lo, n in storages), f"{name} is not in the vLLM tensors"
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, case.ref(ids).logits)
    # Writing through the model writes the engine's tensors.
    first = next(iter(v))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert not torch.equal(v[first], case.vllm[first])


# ---- all three layouts ---------------------------------------------------------------------------------


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


# ---- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "edit", "message"),
    [
        ("hf", ("pop", "model.layers.1.mlp.down_proj.weight"),
         "the HF state dict lacks 1 tensor(s) the config's model has: ['model.layers.1.mlp.down_proj.weight']"),
        ("vllm", ("pop", "model.layers.1.self_attn.qkv_proj.weight"),
         "the vLLM state dict lacks 1 tensor(s) the config's model has: ['model.layers.1.self_attn.qkv_proj.weight']"),
        ("meta", ("pop", "layers.0.attention.wk.weight"),
         "the Meta state dict lacks 1 tensor(s) the config's model has: ['layers.0.attention.wk.weight']"),
        ("vllm", ("pop", "lm_head.weight"), "lacks 1 tensor(s) the config's model has: ['lm_head.weight']"),
        ("hf", ("add", "model.layers.2.mlp.down_proj.weight"),
         "the HF state dict has 1 tensor(s) the config's model does not: ['model.layers.2.mlp.down_proj.weight']"),
        ("vllm", ("add", "model.layers.0.self_attn.qkv_proj.bias"),
         "the vLLM state dict has 1 tensor(s) the config's model does not: ['model.layers.0.self_attn.qkv_proj.bias']"),
        ("meta", ("add", "layers.5.ffn_norm.weight"),
         "the Meta state dict has 1 tensor(s) the config's model does not: ['layers.5.ffn_norm.weight']"),
        ("hf", ("add", "model.layers.0.mystery.weight"),
         "the HF state dict has 1 tensor(s) the config's model does not: ['model.layers.0.mystery.weight']"),
        ("meta", ("add", "layers.0.attention.wqkv.weight"),
         "1 Meta tensor(s) have no HF counterpart in the 'llama (meta)' table: ['layers.0.attention.wqkv.weight']"),
        ("hf", ("shape", "model.norm.weight"),
         "model.norm.weight: shape [33], but the config's model has [32]"),
        ("meta", ("shape", "norm.weight"),
         "model.norm.weight (from Meta 'norm.weight'): shape [33], but the config's model has [32]"),
        ("vllm", ("shape", "model.layers.0.mlp.gate_up_proj.weight"),
         "model.layers.0.mlp.gate_up_proj.weight: expected 128 rows (fused gate|up) from the config, got shape [33]"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 6 else None,
)
def test_missing_extra_or_misshapen_tensor_is_named(src: str, edit: tuple[str, str], message: str) -> None:
    cfg, _, sd = in_every_layout("llama")
    state = dict(sd[src])
    action, name = edit
    if action == "pop":
        state.pop(name)
    else:
        state[name] = torch.zeros(33)
    for dst in {"hf", "vllm", "meta"} - {src}:
        with _raises(message):
            mapping.convert(state, cfg, src, dst)


def test_shortcuts_name_tensors_outside_the_table() -> None:
    cfg, _, sd = in_every_layout("llama")
    with _raises("1 HF tensor(s) are not in the 'llama' table for the vLLM layout: ['model.layers.0.mystery.weight']"):
        mapping.to_vllm({**sd["hf"], "model.layers.0.mystery.weight": torch.zeros(2)}, cfg)
    with _raises("1 vLLM tensor(s) have no HF counterpart in the 'llama' table: ['model.layers.0.mystery.weight']"):
        mapping.hf_views({**sd["vllm"], "model.layers.0.mystery.weight": torch.zeros(2)}, cfg)
    with _raises("model.layers.0.self_attn.qkv_proj.weight: the HF tensor(s) for part(s) ['k'] are missing"):
        mapping.to_vllm({k: v for k, v in sd["hf"].items() if k != "model.layers.0.self_attn.k_proj.weight"}, cfg)

"""Bad input gives a MappingError that names the tensor or config field, and says what to do."""

from __future__ import annotations

import re

import pytest
import torch
from mapping_cases import CASES, COMMON, reference_model

from ipcbridge import mapping
from ipcbridge.errors import MappingError


@pytest.fixture(scope="module")
def llama():
    cfg = next(c for c in CASES if c.id == "llama-untied").config()
    hf = dict(reference_model(cfg).state_dict())
    return cfg, {layout: mapping.convert(hf, cfg, "hf", layout) for layout in ("hf", "vllm", "meta")}


def _raises(message: str):
    return pytest.raises(MappingError, match=re.escape(message))


def test_unknown_architecture_and_layout(llama) -> None:
    cfg, sd = llama
    with _raises("unknown architecture 'bert' for the 'vllm' layout: ipcbridge maps gemma, gemma2"):
        mapping.convert(sd["hf"], {"model_type": "bert"}, "hf", "vllm")
    with _raises("unknown architecture 'gemma3' (that is the multimodal"):
        mapping.plan_from_hf([], {"model_type": "gemma3"})
    with _raises("unknown architecture 'qwen2' for the 'meta' layout: ipcbridge maps llama, mistral"):
        mapping.convert({}, {"model_type": "qwen2"}, "hf", "meta")
    with _raises("unknown layout 'torchtitan'"):
        mapping.convert(sd["hf"], cfg, "hf", "torchtitan")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 30, "head_dim": None}, "hidden_size 30 is not divisible by num_attention_heads 4"),
        ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
        ({"num_attention_heads": 0}, "config.num_attention_heads must be a positive integer, got 0"),
        ({"vocab_size": None}, "config.vocab_size must be a positive integer, got None"),
    ],
)
def test_config_whose_sizes_do_not_fit(llama, overrides: dict, message: str) -> None:
    cfg, sd = llama
    bad = {**cfg.to_dict(), **overrides}
    with _raises(message):
        mapping.to_vllm(sd["hf"], bad)


@pytest.mark.parametrize(
    ("model_type", "overrides", "message"),
    [
        ("gemma", {"tie_word_embeddings": False}, "config.tie_word_embeddings=False is not supported for 'gemma'"),
        ("gemma", {"attention_bias": True}, "config.attention_bias=True is not supported for 'gemma'"),
        ("gemma2", {"tie_word_embeddings": False}, "config.tie_word_embeddings=False is not supported for 'gemma2'"),
        ("gpt2", {"add_cross_attention": True}, "config.add_cross_attention=True is not supported for 'gpt2'"),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "config.scale_attn_by_inverse_layer_idx=True"),
    ],
)
def test_variants_vllm_cannot_serve_are_refused(model_type: str, overrides: dict, message: str) -> None:
    with _raises(message):
        mapping.plan_from_vllm([], {"model_type": model_type, **COMMON, **overrides})


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
def test_missing_extra_or_misshapen_tensor_is_named(llama, src: str, edit: tuple[str, str], message: str) -> None:
    cfg, sd = llama
    state = dict(sd[src])
    action, name = edit
    if action == "pop":
        state.pop(name)
    else:
        state[name] = torch.zeros(33)
    for dst in {"hf", "vllm", "meta"} - {src}:
        with _raises(message):
            mapping.convert(state, cfg, src, dst)


def test_tied_config_with_an_untied_tensor(llama) -> None:
    cfg, sd = llama
    tied = {**cfg.to_dict(), "tie_word_embeddings": True}
    with _raises("vLLM tensor 'lm_head.weight' exists but config ties word embeddings"):
        mapping.convert(sd["vllm"], tied, "vllm", "hf")
    with _raises("Meta tensor 'output.weight' exists but config ties word embeddings"):
        mapping.convert(sd["meta"], tied, "meta", "hf")


def test_shortcuts_name_tensors_outside_the_table(llama) -> None:
    cfg, sd = llama
    with _raises("1 HF tensor(s) are not in the 'llama' table for the vLLM layout: ['model.layers.0.mystery.weight']"):
        mapping.to_vllm({**sd["hf"], "model.layers.0.mystery.weight": torch.zeros(2)}, cfg)
    with _raises("1 vLLM tensor(s) have no HF counterpart in the 'llama' table: ['model.layers.0.mystery.weight']"):
        mapping.hf_views({**sd["vllm"], "model.layers.0.mystery.weight": torch.zeros(2)}, cfg)
    with _raises("model.layers.0.self_attn.qkv_proj.weight: the HF tensor(s) for part(s) ['k'] are missing"):
        mapping.to_vllm({k: v for k, v in sd["hf"].items() if k != "model.layers.0.self_attn.k_proj.weight"}, cfg)

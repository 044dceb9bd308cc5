"""Every mapped architecture, tied and untied where it allows: coverage, shapes, round trip, zero-copy
attach with the reference model's exact logits, and the vLLM 0.25.1 shapes observed on the GPU machine."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from mapping_cases import CASE_IDS, CASES, reference_model, token_ids

import ipcbridge
from ipcbridge import mapping
from ipcbridge.attach import build_meta_model


class Built:
    def __init__(self, case):
        self.config = case.config()
        self.ref = reference_model(self.config)
        self.hf = dict(self.ref.state_dict())
        self.vllm = {k: t.clone() for k, t in mapping.to_vllm(self.hf, self.config).items()}
        self.params = dict(self.ref.named_parameters(remove_duplicate=False))


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def built(request) -> Built:
    return Built(request.param)


def test_every_model_type_has_a_case() -> None:
    covered = {c.config().model_type for c in CASES}
    assert set(mapping.supported_model_types()) - covered <= {"mistral"}  # mistral: Llama's table, same code


def test_coverage_exactly_once(built: Built) -> None:
    steps = mapping.plan_from_vllm(built.vllm, built.config)
    counts = Counter(s.hf for s in steps)
    assert set(counts) == set(built.params), "every HF parameter, tied ones included, has a step"
    assert all(n == 1 for n in counts.values())
    assert {s.vllm for s in steps} == set(built.vllm), "every vLLM tensor is used"
    hf_steps = mapping.plan_from_hf(built.hf, built.config)
    assert Counter(s.hf for s in hf_steps) == counts
    tied = [s for s in steps if s.op == "tied"]
    assert bool(tied) == bool(getattr(built.config, "tie_word_embeddings", False))
    # vLLM -> HF is always a view; the plan says which HF -> vLLM directions copy.
    assert all(s.kind("vllm", "hf") == "alias" for s in steps)
    for s in steps:
        assert s.kind("hf", "vllm") == ("copy" if s.op in ("rows", "vocab", "transpose") else "alias")


def test_shapes(built: Built) -> None:
    views = mapping.hf_views(built.vllm, built.config)
    assert {n: tuple(t.shape) for n, t in views.items()} == {n: tuple(p.shape) for n, p in built.params.items()}
    for s in mapping.plan_from_vllm(built.vllm, built.config):
        if s.op == "vocab":
            assert built.vllm[s.vllm].shape[0] == 128  # vocab 100 padded to a multiple of 64


def test_hf_vllm_hf_round_trip(built: Built) -> None:
    back = mapping.convert(mapping.convert(built.hf, built.config, "hf", "vllm"), built.config, "vllm", "hf")
    assert set(back) == set(built.params)
    for name, t in back.items():
        assert torch.equal(t, built.hf[name]), name
    again = mapping.convert(back, built.config, "hf", "vllm")
    assert set(again) == set(built.vllm)
    assert all(torch.equal(again[k], built.vllm[k]) for k in again)


def test_attach_is_zero_copy_with_reference_logits(built: Built) -> None:
    v = {k: t.clone() for k, t in built.vllm.items()}
    model = ipcbridge.attach(v, built.config)
    storages = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in v.values()]
    for name, p in model.named_parameters(remove_duplicate=False):
        assert any(lo <= p.data_ptr() < lo + n for lo, n in storages), f"{name} is not in the vLLM tensors"
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, built.ref(ids).logits)
    # Writing through the model writes the engine's tensors.
    first = next(iter(v))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert not torch.equal(v[first], built.vllm[first])


# Observed on real vLLM 0.25.1 (../shared/vllm-device/arch_check.py, H100): the tables must reproduce these
# exact names and shapes from arch_check's 256-wide, 2-layer, vocab-1000 configs.
OBSERVED = {
    "gemma": {
        "model.embed_tokens.weight": [1024, 256],
        "model.layers.0.self_attn.qkv_proj.weight": [512, 256],
        "model.layers.0.mlp.gate_up_proj.weight": [1024, 256],
    },
    "gpt2": {
        "transformer.wte.weight": [1024, 256], "transformer.wpe.weight": [512, 256],
        "transformer.h.0.attn.c_attn.weight": [768, 256], "transformer.h.0.attn.c_attn.bias": [768],
        "transformer.h.0.attn.c_proj.weight": [256, 256], "transformer.h.0.mlp.c_fc.weight": [1024, 256],
        "transformer.h.0.mlp.c_proj.weight": [256, 1024], "transformer.ln_f.bias": [256],
    },
    "opt": {
        "model.decoder.embed_tokens.weight": [1024, 256], "model.decoder.embed_positions.weight": [514, 256],
        "model.decoder.layers.0.self_attn.qkv_proj.weight": [768, 256],
        "model.decoder.layers.0.self_attn.qkv_proj.bias": [768],
        "model.decoder.layers.0.fc1.weight": [512, 256], "model.decoder.layers.0.fc2.weight": [256, 512],
        "model.decoder.layers.0.self_attn_layer_norm.weight": [256],
        "model.decoder.layers.0.final_layer_norm.weight": [256],
    },
}


def _arch_check_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=1000, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    if arch == "gemma":
        return tf.GemmaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=64, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=256, n_layer=2, n_head=4, n_positions=512, vocab_size=1000, bos_token_id=1,
                             eos_token_id=2)
    return tf.OPTConfig(hidden_size=256, ffn_dim=512, num_hidden_layers=2, num_attention_heads=4,
                        word_embed_proj_dim=256, pad_token_id=0, **common)


@pytest.mark.parametrize("arch", sorted(OBSERVED))
def test_vllm_shapes_as_observed(arch: str) -> None:
    config = _arch_check_config(arch)
    model = build_meta_model(config, torch.bfloat16)  # meta tensors: shapes only, no memory
    v = mapping.to_vllm(dict(model.state_dict()), config)
    assert "lm_head.weight" not in v  # all three tie by default, and vLLM then has no lm_head
    for name, shape in OBSERVED[arch].items():
        assert list(v[name].shape) == shape, name

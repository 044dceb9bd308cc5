"""The tables as data: each is well formed and invertible, and reproduces the names and shapes observed on
real vLLM 0.25.1 and Meta's layout."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from ipcbridge import mapping
from ipcbridge.hf import build_meta_model
from ipcbridge.mapping.spec import Rows, Rule
from tests.mapping.mapping_cases import in_every_layout

TABLES = [("vllm", a) for a in mapping.ARCHITECTURES] + [("meta", a) for a in mapping.META_ARCHITECTURES]
TABLE_IDS = [f"{layout}-{a.name}" for layout, a in TABLES]


def _target(hf_template: str, rule: Rule) -> str:
    return hf_template if rule.target is None else rule.target


@pytest.mark.parametrize(("layout", "arch"), TABLES, ids=TABLE_IDS)
def test_templates_keep_their_layer_index(layout: str, arch: mapping.ArchSpec) -> None:
    for hf_t, rule in arch.params.items():
        assert hf_t.count("{}") == _target(hf_t, rule).count("{}") <= 1, hf_t
    for tied, to in arch.tied.items():
        assert tied in arch.params and to in arch.params, (tied, to)


@pytest.mark.parametrize(("layout", "arch"), TABLES, ids=TABLE_IDS)
def test_inverse_is_a_function(layout: str, arch: mapping.ArchSpec) -> None:
    """Every target template comes from one HF template, or from the distinct parts of one fused tensor in
    one order: resolving target names back to HF names is then unambiguous."""
    by_target: dict[str, list[tuple[str, Rule]]] = defaultdict(list)
    for hf_t, rule in arch.params.items():
        by_target[_target(hf_t, rule)].append((hf_t, rule))
    for target, sources in by_target.items():
        if len(sources) == 1 and not isinstance(sources[0][1], Rows):
            continue
        rules = [r for _, r in sources]
        assert all(isinstance(r, Rows) for r in rules), target
        assert len({r.parts for r in rules}) == 1, target
        assert sorted(r.part for r in rules) == sorted(rules[0].parts), target


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


@pytest.mark.parametrize(("model_type", "tied"), [("llama", False), ("llama", True), ("mistral", False)],
                         ids=["llama-untied", "llama-tied", "mistral"])
def test_meta_names(model_type: str, tied: bool) -> None:
    cfg, _, sd = in_every_layout(model_type, tied)
    layer = ["attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
             "feed_forward.w3", "attention_norm", "ffn_norm"]
    expected = {"tok_embeddings.weight", "norm.weight"} | {f"layers.{i}.{n}.weight" for i in range(2) for n in layer}
    if not cfg.tie_word_embeddings:
        expected.add("output.weight")
    assert set(sd["meta"]) == expected
    assert sd["meta"]["tok_embeddings.weight"].shape == (100, 32)  # Meta does not pad the vocab
    assert sd["meta"]["layers.1.attention.wk.weight"].shape == (16, 32)  # 2 kv heads of 8

"""Tiny configs for every mapped architecture, shared by the mapping and checkpoint tests, and the weights
built from them (cached, so the mapping test modules share one build per case).

Vocab 100 is not a multiple of 64, so vLLM's vocab padding (to 128) is exercised; 4 query heads over 2 kv
heads exercise GQA where the architecture has it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from tests import helpers

VOCAB = 100
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], Any]

    def config(self) -> Any:
        return self.make()


def _llama(**kw: Any) -> Any:
    import transformers as tf

    return tf.LlamaConfig(num_key_value_heads=2, **COMMON, **kw)


def _qwen2(**kw: Any) -> Any:
    import transformers as tf

    return tf.Qwen2Config(num_key_value_heads=2, **COMMON, **kw)


def _qwen3(**kw: Any) -> Any:
    import transformers as tf

    return tf.Qwen3Config(num_key_value_heads=2, head_dim=8, **COMMON, **kw)


def _gemma(**kw: Any) -> Any:
    import transformers as tf

    return tf.GemmaConfig(num_key_value_heads=2, head_dim=8, **COMMON, **kw)


def _gemma2(**kw: Any) -> Any:
    import transformers as tf

    return tf.Gemma2Config(num_key_value_heads=2, head_dim=8, sliding_window=4, **COMMON, **kw)


def _gemma3(**kw: Any) -> Any:
    import transformers as tf

    return tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, sliding_window=4, **COMMON, **kw)


def _phi3(**kw: Any) -> Any:
    import transformers as tf

    return tf.Phi3Config(num_key_value_heads=2, **COMMON, **kw)


def _gpt2(**kw: Any) -> Any:
    import transformers as tf

    return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB, bos_token_id=1,
                         eos_token_id=2, **kw)


def _opt(**kw: Any) -> Any:
    import transformers as tf

    base = dict(COMMON, ffn_dim=64, word_embed_proj_dim=32)
    del base["intermediate_size"]
    base.update(kw)
    return tf.OPTConfig(**base)


MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)


def _qwen3_moe(**kw: Any) -> Any:
    import transformers as tf

    return tf.Qwen3MoeConfig(num_key_value_heads=2, head_dim=8, num_experts=4, **MOE, **COMMON, **kw)


def _qwen2_moe(**kw: Any) -> Any:
    import transformers as tf

    return tf.Qwen2MoeConfig(num_key_value_heads=2, num_experts=4, shared_expert_intermediate_size=24, **MOE,
                             **COMMON, **kw)


def _mixtral(**kw: Any) -> Any:
    import transformers as tf

    base = dict(COMMON, intermediate_size=16)  # Mixtral's experts are intermediate_size wide
    return tf.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **base, **kw)


CASES = [
    Case("llama-untied", lambda: _llama(tie_word_embeddings=False)),
    Case("llama-tied", lambda: _llama(tie_word_embeddings=True)),
    Case("qwen2-bias", lambda: _qwen2(tie_word_embeddings=False)),
    Case("qwen3-qknorm", lambda: _qwen3(tie_word_embeddings=True)),
    Case("gemma-tied", lambda: _gemma()),
    Case("gemma2-tied", lambda: _gemma2()),
    Case("gemma3-tied", lambda: _gemma3()),
    Case("gemma3-untied", lambda: _gemma3(tie_word_embeddings=False)),
    Case("phi3-untied", lambda: _phi3(tie_word_embeddings=False)),
    Case("phi3-tied", lambda: _phi3(tie_word_embeddings=True)),
    Case("gpt2-tied", lambda: _gpt2()),
    Case("gpt2-untied", lambda: _gpt2(tie_word_embeddings=False)),
    Case("opt-tied", lambda: _opt()),
    Case("opt-untied", lambda: _opt(tie_word_embeddings=False)),
    # project_in/out (word_embed_proj_dim != hidden_size) and post-LN (no decoder final_layer_norm)
    Case("opt-proj-postln", lambda: _opt(word_embed_proj_dim=16, do_layer_norm_before=False)),
    Case("qwen3_moe-untied", lambda: _qwen3_moe(tie_word_embeddings=False)),
    # layer 1 keeps a dense MLP (mlp_only_layers): both kinds of layer in one model
    Case("qwen3_moe-dense-layer", lambda: _qwen3_moe(tie_word_embeddings=True, mlp_only_layers=[1])),
    Case("qwen2_moe-shared", lambda: _qwen2_moe(tie_word_embeddings=False)),
    Case("mixtral-untied", lambda: _mixtral(tie_word_embeddings=False)),
]
MOE_CASE_IDS = [c.id for c in CASES if "moe" in c.id or "mixtral" in c.id]
CASE_IDS = [c.id for c in CASES]


def reference_model(config: Any, seed: int = 0) -> torch.nn.Module:
    """The shared reference model, perturbed harder (0.1): small tables hide swaps behind small weights."""
    return helpers.reference_model(config, seed, scale=0.1)


def token_ids(n: int = 9, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (2, n), generator=g)


LAYOUTS = ("hf", "vllm", "meta")


class Built:
    """A case's config and reference model, with its weights in HF and (cloned) vLLM layout."""

    def __init__(self, case: Case) -> None:
        from ipcbridge import mapping

        self.config = case.config()
        self.ref = reference_model(self.config)
        self.hf = dict(self.ref.state_dict())
        self.vllm = {k: t.clone() for k, t in mapping.to_vllm(self.hf, self.config).items()}
        self.params = dict(self.ref.named_parameters(remove_duplicate=False))


@cache
def built(case_id: str) -> Built:
    return Built(next(c for c in CASES if c.id == case_id))


def meta_config(model_type: str = "llama", tied: bool = False) -> Any:
    """A config the Meta table maps (Llama or Mistral)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, num_key_value_heads=2, tie_word_embeddings=tied, **COMMON)


@cache
def in_every_layout(model_type: str = "llama", tied: bool = False) -> tuple[Any, torch.nn.Module, dict]:
    """(config, reference model, {layout: its state dict in that layout}) for a config the Meta table maps."""
    from ipcbridge import mapping

    cfg = meta_config(model_type, tied)
    ref = reference_model(cfg)
    hf = dict(ref.state_dict())
    return cfg, ref, {layout: mapping.convert(hf, cfg, "hf", layout) for layout in LAYOUTS}

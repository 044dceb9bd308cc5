"""Per-architecture tables: HF parameter name template -> rule naming the vLLM tensor (vLLM 0.25.1).

Sources of each fact are noted per table. "Observed" means read off real vLLM 0.25.1 on the GPU machine
(``../shared/vllm-device/arch_check.py`` and the vllm-marked tests); "source" means vLLM's model file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ipcbridge.errors import MappingError
from ipcbridge.mapping.rules import GATE_UP, QKV, Rows, Rule, Same, Vocab

_MISSING = object()


def cfg(config: Any, key: str, default: Any = _MISSING) -> Any:
    """Read ``key`` from an HF config object or dict; a missing required field is a MappingError."""
    if isinstance(config, Mapping):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    if value is _MISSING:
        raise MappingError(f"config has no field {key!r}, which this architecture needs")
    return value


def model_type(config: Any) -> str:
    mt = cfg(config, "model_type", None)
    if not isinstance(mt, str) or not mt:
        raise MappingError("config has no 'model_type'; pass a transformers config (or its to_dict())")
    return mt


def head_dim(config: Any) -> int:
    heads = positive(config, "num_attention_heads")
    hd = cfg(config, "head_dim", None)
    if hd is None:
        hidden = positive(config, "hidden_size")
        if hidden % heads:
            raise MappingError(
                f"config: hidden_size {hidden} is not divisible by num_attention_heads {heads}; set head_dim "
                "or fix the head count"
            )
        hd = hidden // heads
    return int(hd)


def positive(config: Any, key: str) -> int:
    v = cfg(config, key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise MappingError(f"config.{key} must be a positive integer, got {v!r}")
    return v


def kv_heads(config: Any) -> int:
    heads = positive(config, "num_attention_heads")
    kv = cfg(config, "num_key_value_heads", None) or heads
    if not isinstance(kv, int) or kv <= 0 or heads % kv:
        raise MappingError(
            f"config: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv!r}"
        )
    return kv


def attention_mlp_sizes(config: Any) -> dict[str, int]:
    """Row sizes of fused ``qkv_proj`` and ``gate_up_proj`` for GQA decoders."""
    hd = head_dim(config)
    inter = positive(config, "intermediate_size")
    return {
        "q": positive(config, "num_attention_heads") * hd,
        "k": kv_heads(config) * hd,
        "v": kv_heads(config) * hd,
        "gate": inter,
        "up": inter,
    }


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: its HF -> vLLM table and the config facts the rules need."""

    name: str
    model_types: tuple[str, ...]
    params: Mapping[str, Rule]
    sizes: Callable[[Any], dict[str, int]] = attention_mlp_sizes
    #: HF name -> HF name it is tied to when the config ties word embeddings (absent from vLLM then).
    tied: Mapping[str, str] = field(default_factory=dict)
    #: tie_word_embeddings when the config does not say (dict configs); ``always_tied`` ignores the config.
    tie_default: bool = False
    always_tied: bool = False
    #: vLLM pads vocab rows to a multiple of this (``DEFAULT_VOCAB_PADDING_SIZE``).
    vocab_pad: int = 64

    def is_tied(self, config: Any) -> bool:
        if self.always_tied:
            return True
        return bool(cfg(config, "tie_word_embeddings", self.tie_default))

    def vocab_size(self, config: Any) -> int:
        return positive(config, "vocab_size")

    def padded_vocab(self, config: Any) -> int:
        v = self.vocab_size(config)
        return -(-v // self.vocab_pad) * self.vocab_pad


def llama_like(**extra: Rule) -> dict[str, Rule]:
    """The Llama decoder table, shared by most dense decoders; ``extra`` adds per-arch tensors."""
    attn, mlp = "model.layers.{}.self_attn.", "model.layers.{}.mlp."
    table: dict[str, Rule] = {"model.embed_tokens.weight": Vocab()}
    for p in QKV:
        for suffix in ("weight", "bias"):
            table[f"{attn}{p}_proj.{suffix}"] = Rows(f"{attn}qkv_proj.{suffix}", part=p, parts=QKV)
    table[f"{attn}o_proj.weight"] = Same()
    table[f"{attn}o_proj.bias"] = Same()
    for p in GATE_UP:
        for suffix in ("weight", "bias"):
            table[f"{mlp}{p}_proj.{suffix}"] = Rows(f"{mlp}gate_up_proj.{suffix}", part=p, parts=GATE_UP)
    table[f"{mlp}down_proj.weight"] = Same()
    table[f"{mlp}down_proj.bias"] = Same()
    table["model.layers.{}.input_layernorm.weight"] = Same()
    table["model.layers.{}.post_attention_layernorm.weight"] = Same()
    table["model.norm.weight"] = Same()
    table["lm_head.weight"] = Vocab()
    table.update(extra)
    return table


TIED_LM_HEAD = {"lm_head.weight": "model.embed_tokens.weight"}

# Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (q_norm/k_norm). Observed on vLLM 0.25.1 (Llama: names,
# shapes, [q|k|v] and [gate|up] row order, vocab 1000 -> 1024, untied lm_head padded like the embedding);
# source: vllm/model_executor/models/{llama,mistral,qwen2,qwen3}.py (Qwen2/3 subclass Llama's layout).
LLAMA = ArchSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    params=llama_like(**{
        "model.layers.{}.self_attn.q_norm.weight": Same(),
        "model.layers.{}.self_attn.k_norm.weight": Same(),
    }),
    tied=TIED_LM_HEAD,
)

ARCHITECTURES: list[ArchSpec] = [LLAMA]


def register(spec: ArchSpec) -> None:
    """Add an architecture (or replace the one serving the same model types)."""
    ARCHITECTURES[:] = [a for a in ARCHITECTURES if not set(a.model_types) & set(spec.model_types)]
    ARCHITECTURES.append(spec)


def supported_model_types() -> list[str]:
    return sorted(mt for a in ARCHITECTURES for mt in a.model_types)


def get_arch(config: Any) -> ArchSpec:
    mt = model_type(config)
    for a in ARCHITECTURES:
        if mt in a.model_types:
            return a
    raise MappingError(
        f"unknown architecture {mt!r}: ipcbridge maps {', '.join(supported_model_types())}. "
        "Add a table with ipcbridge.mapping.register(ArchSpec(...)) or use a supported model"
    )

"""The vocabulary of the mapping tables, and an architecture's table with one config bound to it.

A table maps an HF name template (``{}`` stands for a layer index) to a rule naming the tensor it lives in
on the other side (vLLM's layout for :mod:`~ipcbridge.mapping.tables.vllm`, Meta's for
:mod:`~ipcbridge.mapping.tables.meta`) and how. Every rule works both ways, and says for each direction
whether it is a zero-copy view (an *alias*) or needs a *copy*: vLLM -> HF is always a view (row slice, vocab
slice, transpose); HF -> vLLM copies wherever vLLM fuses, pads or transposes; the rotary permutation copies
both ways.

The rules hold no sizes: row counts, vocab sizes and head counts come from the model's config. A plan reads
them once, into a :class:`BoundArch`, and resolves every tensor against that.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ipcbridge.errors import MappingError
from ipcbridge.hf import config_value, head_dim, kv_heads, positive

# ---- rules ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Base rule. ``target`` is the name template in the other layout; ``None`` means the HF template."""

    target: str | None = None
    #: How the HF tensor is obtained from the other layout's tensor, for plans and error messages.
    op: ClassVar[str] = "same"
    #: Whether building the other layout's tensor from HF tensors needs a copy (concatenation, padding).
    copy_to_target: ClassVar[bool] = False
    #: Whether the HF tensor needs a copy of the other layout's tensor (a view otherwise).
    copy_to_hf: ClassVar[bool] = False


@dataclass(frozen=True)
class Same(Rule):
    """The HF tensor is the other layout's tensor (possibly under another name)."""


@dataclass(frozen=True)
class Rows(Rule):
    """The HF tensor is the ``part`` row block of a target tensor fused from ``parts`` (in that order).

    Row sizes come from the architecture's ``sizes(config)``: e.g. ``q``/``k``/``v`` of ``qkv_proj`` or
    ``gate``/``up`` of ``gate_up_proj``. Works for weights (rows) and biases (elements) alike.
    """

    part: str = ""
    parts: tuple[str, ...] = ()
    op: ClassVar[str] = "rows"
    copy_to_target: ClassVar[bool] = True


@dataclass(frozen=True)
class Vocab(Rule):
    """The HF tensor is the first ``vocab_size`` rows of a target tensor padded to the arch's multiple."""

    op: ClassVar[str] = "vocab"
    copy_to_target: ClassVar[bool] = True


@dataclass(frozen=True)
class Transposed(Rule):
    """The HF tensor is the transpose of the target tensor (HF ``Conv1D`` keeps ``[in, out]``)."""

    op: ClassVar[str] = "transpose"
    copy_to_target: ClassVar[bool] = True


@dataclass(frozen=True)
class Rotary(Rule):
    """The HF tensor is the other layout's tensor with each head's rotary pairs regrouped.

    Meta/torchtitan interleave rotary pairs within a head; HF and vLLM split the head in halves (see
    :func:`ipcbridge.mapping.rotary.permute_rotary`). ``heads`` says which head count the rows are grouped
    by: ``"q"`` (num_attention_heads) for ``wq``, ``"kv"`` (num_key_value_heads) for ``wk``. A row
    permutation is no strided view, so it is a copy both ways.
    """

    heads: str = "q"
    op: ClassVar[str] = "rotary"
    copy_to_target: ClassVar[bool] = True
    copy_to_hf: ClassVar[bool] = True


QKV = ("q", "k", "v")
GATE_UP = ("gate", "up")
#: Qwen2-MoE's shared expert fuses its own gate/up, sized by shared_expert_intermediate_size.
SHARED_GATE_UP = ("shared_gate", "shared_up")
#: HF's usual tie: the output projection is the input embedding.
TIED_LM_HEAD: Mapping[str, str] = {"lm_head.weight": "model.embed_tokens.weight"}


# ---- row sizes of fused tensors, per architecture --------------------------------------------------------


def qkv_sizes(config: Any) -> dict[str, int]:
    """Row sizes of a fused ``[q | k | v]`` projection (GQA aware; MHA when the config has no kv heads)."""
    hd = head_dim(config)
    return {
        "q": positive(config, "num_attention_heads") * hd,
        "k": kv_heads(config) * hd,
        "v": kv_heads(config) * hd,
    }


def attention_mlp_sizes(config: Any) -> dict[str, int]:
    """Row sizes of fused ``qkv_proj`` and ``gate_up_proj`` for GQA decoders."""
    inter = positive(config, "intermediate_size")
    return {**qkv_sizes(config), "gate": inter, "up": inter}


def moe_sizes(config: Any) -> dict[str, int]:
    """Row sizes for MoE decoders: attention, dense-MLP layers (``mlp_only_layers``), and Qwen2-MoE's shared
    expert when the config has one. Routed experts need none: each is a whole-tensor alias."""
    shared = int(config_value(config, "shared_expert_intermediate_size", 0) or 0)
    return {**attention_mlp_sizes(config), "shared_gate": shared, "shared_up": shared}


def no_rows(config: Any) -> dict[str, int]:
    """For tables without ``Rows`` rules: nothing fused differently on the two sides."""
    return {}


# ---- architectures --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: its HF -> other-layout table and the config facts the rules need.

    The other layout is vLLM's or Meta's (:mod:`ipcbridge.mapping.registry` keeps the tables by layout); a
    rule's ``target`` names the tensor in that layout.
    """

    name: str
    model_types: tuple[str, ...]
    params: Mapping[str, Rule]
    sizes: Callable[[Any], dict[str, int]] = attention_mlp_sizes
    #: HF name -> HF name it is tied to when the config ties word embeddings (absent from the target then).
    tied: Mapping[str, str] = field(default_factory=dict)
    #: tie_word_embeddings when the config does not say (dict configs); ``always_tied`` ignores the config.
    tie_default: bool = False
    always_tied: bool = False
    #: vLLM pads vocab rows to a multiple of this (``DEFAULT_VOCAB_PADDING_SIZE``).
    vocab_pad: int = 64
    #: config field -> (the only value this table maps, why): variants the engine or the table refuses.
    requires: Mapping[str, tuple[Any, str]] = field(default_factory=dict)

    def is_tied(self, config: Any) -> bool:
        if self.always_tied:
            return True
        return bool(config_value(config, "tie_word_embeddings", self.tie_default))

    def vocab_size(self, config: Any) -> int:
        return positive(config, "vocab_size")

    def padded_vocab(self, config: Any) -> int:
        v = self.vocab_size(config)
        return -(-v // self.vocab_pad) * self.vocab_pad

    def check(self, config: Any) -> None:
        """Refuse config variants this table does not map, naming the field."""
        for key, (want, why) in self.requires.items():
            got = config_value(config, key, want)
            if got != want:
                raise MappingError(
                    f"config.{key}={got!r} is not supported for {self.name!r}: {why}. Use a config with "
                    f"{key}={want!r}"
                )


@dataclass(frozen=True)
class BoundArch:
    """An :class:`ArchSpec` with the facts of one config read once, for every tensor of a plan.

    Only the facts the table's rules use are read (``None`` otherwise), so a table without ``Vocab`` rules
    never asks the config for a vocab size: a config is refused for exactly the fields its table needs.
    """

    spec: ArchSpec
    #: The layout ``spec``'s targets are in (``"vllm"`` or ``"meta"``).
    layout: str
    tied: bool
    #: Row count of each fused part (``Rows`` rules).
    sizes: Mapping[str, int]
    vocab: int | None
    padded_vocab: int | None
    #: Head counts (``Rotary`` rules): num_attention_heads and num_key_value_heads.
    q_heads: int | None
    kv_heads: int | None

    @classmethod
    def of(cls, spec: ArchSpec, config: Any, layout: str) -> BoundArch:
        rules = list(spec.params.values())
        sizes = spec.sizes(config) if any(isinstance(r, Rows) for r in rules) else {}
        missing = sorted({p for r in rules if isinstance(r, Rows) for p in r.parts} - sizes.keys())
        if missing:
            raise MappingError(f"table {spec.name!r}: its sizes() gives no row count for part(s) {missing}")
        bad = sorted({r.heads for r in rules if isinstance(r, Rotary)} - {"q", "kv"})
        if bad:
            raise MappingError(f"Rotary(heads={bad[0]!r}) in table {spec.name!r}: heads must be 'q' or 'kv'")
        vocab = any(isinstance(r, Vocab) for r in rules)
        rotary = any(isinstance(r, Rotary) for r in rules)
        return cls(
            spec=spec, layout=layout, tied=spec.is_tied(config), sizes=sizes,
            vocab=spec.vocab_size(config) if vocab else None,
            padded_vocab=spec.padded_vocab(config) if vocab else None,
            q_heads=positive(config, "num_attention_heads") if rotary else None,
            kv_heads=kv_heads(config) if rotary else None,
        )

    @property
    def name(self) -> str:
        return self.spec.name

    def rows(self, rule: Rows | Vocab) -> tuple[int, int, int]:
        """(start, stop, total rows) of ``rule``'s block in its target tensor."""
        if isinstance(rule, Vocab):
            return 0, self.vocab or 0, self.padded_vocab or 0  # read in of(): the table has a Vocab rule
        start = sum(self.sizes[p] for p in rule.parts[: rule.parts.index(rule.part)])
        return start, start + self.sizes[rule.part], sum(self.sizes[p] for p in rule.parts)

    def heads(self, rule: Rotary) -> int:
        """The head count ``rule``'s rows are grouped by."""
        return (self.q_heads if rule.heads == "q" else self.kv_heads) or 0  # read in of(): a Rotary rule

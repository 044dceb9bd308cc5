"""The vocabulary of the mapping tables: how one HF tensor relates to one tensor of another layout.

A table maps an HF name template (``{}`` stands for a layer index) to a rule naming the tensor it lives in
on the other side (vLLM's layout for :mod:`~ipcbridge.mapping.archs`, Meta's for
:mod:`~ipcbridge.mapping.meta`) and how. Every rule works both ways, and says for each direction whether
it is a zero-copy view (an *alias*) or needs a *copy*: vLLM -> HF is always a view (row slice, vocab slice,
transpose); HF -> vLLM copies wherever vLLM fuses, pads or transposes; the rotary permutation copies both
ways.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Rule:
    """Base rule. ``vllm`` is the vLLM name template; ``None`` means the same name as the HF template."""

    vllm: str | None = None
    #: How the HF tensor is obtained from the vLLM one, for plans and error messages.
    op: ClassVar[str] = "same"
    #: Whether building the other layout's tensor from HF tensors needs a copy (concatenation, padding).
    copy_to_vllm: ClassVar[bool] = False
    #: Whether the HF tensor needs a copy of the other layout's tensor (a view otherwise).
    copy_to_hf: ClassVar[bool] = False


@dataclass(frozen=True)
class Same(Rule):
    """The HF tensor is the vLLM tensor (possibly under another name)."""


@dataclass(frozen=True)
class Rows(Rule):
    """The HF tensor is the ``part`` row block of a vLLM tensor fused from ``parts`` (in that order).

    Row sizes come from the architecture's ``sizes(config)``: e.g. ``q``/``k``/``v`` of ``qkv_proj`` or
    ``gate``/``up`` of ``gate_up_proj``. Works for weights (rows) and biases (elements) alike.
    """

    part: str = ""
    parts: tuple[str, ...] = ()
    op: ClassVar[str] = "rows"
    copy_to_vllm: ClassVar[bool] = True


@dataclass(frozen=True)
class Vocab(Rule):
    """The HF tensor is the first ``vocab_size`` rows of a vLLM tensor padded to the arch's multiple."""

    op: ClassVar[str] = "vocab"
    copy_to_vllm: ClassVar[bool] = True


@dataclass(frozen=True)
class Transposed(Rule):
    """The HF tensor is the transpose of the vLLM tensor (HF ``Conv1D`` keeps ``[in, out]``)."""

    op: ClassVar[str] = "transpose"
    copy_to_vllm: ClassVar[bool] = True


@dataclass(frozen=True)
class Rotary(Rule):
    """The HF tensor is the other layout's tensor with each head's rotary pairs regrouped.

    Meta/torchtitan interleave rotary pairs within a head; HF and vLLM split the head in halves (see
    :func:`ipcbridge.mapping.meta.permute_rotary`). ``heads`` says which head count the rows are grouped by:
    ``"q"`` (num_attention_heads) for ``wq``, ``"kv"`` (num_key_value_heads) for ``wk``. A row permutation
    is no strided view, so it is a copy both ways.
    """

    heads: str = "q"
    op: ClassVar[str] = "rotary"
    copy_to_vllm: ClassVar[bool] = True
    copy_to_hf: ClassVar[bool] = True


QKV = ("q", "k", "v")
GATE_UP = ("gate", "up")

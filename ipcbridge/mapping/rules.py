"""The vocabulary of the mapping tables: how one HF tensor relates to one vLLM tensor.

A table maps an HF name template (``{}`` stands for a layer index) to a rule naming the vLLM tensor it
lives in and how. Every rule works both ways: the vLLM -> HF direction is a zero-copy view (an *alias*),
the HF -> vLLM direction builds the engine's tensor (a *copy* wherever tensors are fused or padded).
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
    #: Whether building the vLLM tensor from HF tensors needs a copy (concatenation, padding).
    copy_to_vllm: ClassVar[bool] = False


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


QKV = ("q", "k", "v")
GATE_UP = ("gate", "up")

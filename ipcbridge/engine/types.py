"""Values engines return to the trainer. Plain data: they cross the control socket as JSON."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerateOutput:
    """One completion: the new tokens, the engine's logprob of each, and the weights that produced it.

    ``finish_reason`` is vLLM's: ``"stop"`` when a stop or EOS token ended it (that token is the last one),
    ``"length"`` when it ran to ``max_tokens``."""

    token_ids: list[int]
    logprobs: list[float]
    weight_version: int
    finish_reason: str = "length"

"""The embedded engine's sampler: tokens and their logprobs from one decode step's logits, and the EOS ids.

Pure functions of tensors, kept apart from the engine's state so they are tested alone. The meanings are
vLLM's (Note [sampling like vLLM] in :mod:`ipcbridge.engine.inputs`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ipcbridge.engine.inputs import Sampling

logger = logging.getLogger(__name__)


def filter_logits(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``scaled`` (rows of temperature-scaled logits) with every token outside the top-k and the top-p
    nucleus set to ``-inf``. The most likely token always survives, as in vLLM and transformers."""
    out = scaled.clone()
    vocab = out.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out[out < kth] = float("-inf")
    if top_p < 1.0:
        probs, order = torch.sort(torch.softmax(out, dim=-1), dim=-1, descending=True)
        # A token is dropped when the tokens ranked above it already reach top_p.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out[drop] = float("-inf")
    return out


def sample_tokens(logits: torch.Tensor, temperature: float, sampling: Sampling,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, their logprobs) for each row of ``logits`` ``[rows, vocab]``.

    Greedy at ``temperature <= 0`` (top-k/top-p cannot change the argmax). Logprobs follow
    ``sampling.logprobs``: ``"raw"`` from the logits as they are, ``"processed"`` after the temperature
    (a greedy request has no temperature to apply, so both are raw).
    """
    logits = logits.float()
    if temperature <= 0:
        toks = torch.argmax(logits, dim=-1)
        lp = torch.log_softmax(logits, dim=-1)
    else:
        scaled = logits / temperature
        probs = torch.softmax(filter_logits(scaled, sampling.top_k, sampling.top_p), dim=-1)
        toks = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)
        lp = torch.log_softmax(scaled if sampling.logprobs == "processed" else logits, dim=-1)
    return toks, lp.gather(-1, toks[:, None])[:, 0]


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def eos_token_ids(config: Any, source: dict[str, Any]) -> list[int]:
    """The ids that end a completion: the model directory's ``generation_config.json`` ``eos_token_id``
    when it has one, else the one the model config implies (transformers' ``GenerationConfig``)."""
    from transformers import GenerationConfig

    path = source.get("path")
    if path:
        try:
            return _ids(GenerationConfig.from_pretrained(path).eos_token_id)
        except (OSError, ValueError):
            logger.debug("no generation_config.json in %s; EOS from the model config", path)
    return _ids(GenerationConfig.from_model_config(config).eos_token_id)

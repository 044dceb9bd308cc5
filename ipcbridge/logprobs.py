"""What a model says about a sequence: its logprobs and its greedy continuation, for parity checks.

An engine serving the same weights as an HF model should give the same logprobs and the same greedy
tokens; ``Bridge.check``, the embedded engine's ``score`` and the tests compare them with these.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def sequence_logprobs(model: nn.Module, prompt: list[int], completion: list[int]) -> list[float]:
    """log p(completion[i] | prompt + completion[:i]) under ``model``, in float32."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + completion], device=device)
    logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    lp = torch.log_softmax(logits, dim=-1)
    return lp.gather(1, torch.tensor(completion, device=device)[:, None])[:, 0].tolist()


@torch.no_grad()
def greedy(model: nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    """``max_tokens`` greedy tokens after ``prompt`` under ``model`` (full recompute per token, no cache):
    what an engine serving the same weights should generate."""
    device = next(model.parameters()).device
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(int(model(torch.tensor([ids], device=device)).logits[0, -1].float().argmax()))
    return ids[len(prompt):]

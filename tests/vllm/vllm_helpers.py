"""Shared pieces of the vllm-marked tests: tiny configs, weight init through the bridge, HF greedy decoding,
the decisive training step, and a results log (``$IPCBRIDGE_RESULTS``, one JSON object per line).

Not a test module. Imported as ``tests.vllm.vllm_helpers``: ``tests`` is a package, so this folder is
``tests.vllm`` and never shadows the real ``vllm`` package (only the repository root is on sys.path).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from ipcbridge.logprobs import greedy
from ipcbridge.vllm.testing import init_weights_
from tests import helpers

ARCHS = ("llama", "qwen2", "qwen3")


def require_vllm() -> None:
    # A deep module, not "vllm": a folder named tests/vllm could pass as a namespace package "vllm".
    pytest.importorskip("vllm.entrypoints.llm", reason="needs vllm>=0.25.1,<0.34 and a GPU (GPU machine)")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    # vLLM forks its engine process unless CUDA is initialized here; a test run that starts with these
    # tests initializes CUDA only later, inside the forked child, which then cannot use it.
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"


def tiny_config(arch: str) -> Any:
    """The shared tiny config at a size vLLM's Triton attention takes (head_dim 64); vocab 1000 is padded
    to 1024 by vLLM. qwen2 ties embeddings and has q/k/v biases, qwen3 has q_norm/k_norm."""
    return helpers.tiny_config(
        arch, tied=arch == "qwen2", vocab_size=1000, hidden_size=256, intermediate_size=512, head_dim=64,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    )


def record(test: str, **data: Any) -> None:
    """Append one result line to $IPCBRIDGE_RESULTS (and print it: pytest -s shows it)."""
    line = json.dumps({"test": test, "time": time.strftime("%H:%M:%S"), **data}, default=str)
    print("RESULT", line, flush=True)
    path = os.environ.get("IPCBRIDGE_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def init_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """The worker's HF-style init, written *through the attached views* (so into vLLM's memory)."""
    init_weights_(model, seed, std)


hf_greedy = greedy  # the HF model's greedy continuation (full recompute per token, cache-free)


@torch.no_grad()
def top1_agreement(model: torch.nn.Module, prompt: list[int], tokens: list[int]) -> dict[str, Any]:
    """Teacher-forced on ``tokens``: how often they are the HF model's argmax, and the largest logprob gap
    by which the HF model preferred another token (0 where it agrees)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + tokens], device=device)
    lp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1: -1].float(), -1)
    chosen = lp.gather(1, torch.tensor(tokens, device=device)[:, None])[:, 0]
    gap = lp.max(-1).values - chosen
    return {"agree": int((gap == 0).sum()), "of": len(tokens), "max_gap": float(gap.max())}


def decisive_step(bridge: Any, prompts: list[list[int]], target: int, lr: float = 1e-2,
                  inside: Callable[[], None] | None = None) -> None:
    """One Adam step (a sign step of size ``lr`` for every weight) toward emitting ``target`` after each
    prompt, fenced with ``bridge.update()``. The gradient is computed before the fence (reading the weights
    while the engine generates is harmless); only the step itself runs inside it, after ``inside()`` (which
    tests use to send requests while the engine is paused)."""
    model = bridge.model
    device = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    opt.zero_grad(set_to_none=True)
    loss = torch.zeros((), device=device)
    for p in prompts:
        seq = p + [target] * 8
        logits = model(torch.tensor([seq], device=device)).logits[0, len(p) - 1: -1].float()
        loss = loss + torch.nn.functional.cross_entropy(logits, torch.tensor([target] * 8, device=device))
    loss.backward()
    with bridge.update():
        if inside is not None:
            inside()
        opt.step()
    opt.zero_grad(set_to_none=True)
    del opt


def snapshot(model: torch.nn.Module) -> torch.nn.Module:
    """An independent HF model holding a copy of ``model``'s current weights (trainer memory; tiny models)."""
    from transformers import AutoModelForCausalLM

    p = next(model.parameters())
    with torch.device(p.device):
        copy = AutoModelForCausalLM.from_config(model.config, dtype=p.dtype)
    copy.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
    return copy.eval()


def classify(tokens: list[int], prompt: list[int], greedy: dict[str, list[int]],
             models: dict[str, torch.nn.Module], tol: float = 0.03) -> dict[str, Any]:
    """Which weight version produced ``tokens``: ``exact`` names the versions whose HF greedy continuation it
    equals; ``consistent`` those under which every token is the HF argmax or within ``tol`` nats of it
    (a bf16 near-tie, which HF and vLLM may break differently). ``label`` is "mix" if neither."""
    exact = [v for v, g in greedy.items() if g == tokens]
    gaps = {v: top1_agreement(m, prompt, tokens)["max_gap"] for v, m in models.items()}
    consistent = [v for v, gap in gaps.items() if gap <= tol]
    label = exact[0] if len(exact) == 1 else consistent[0] if len(consistent) == 1 else \
        "+".join(exact or consistent) or "mix"
    return {"label": label, "exact": exact, "max_gap": {v: round(g, 4) for v, g in gaps.items()}}


def cuda_allocated() -> int:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()

"""Colocated RL with real vLLM: the engine samples, the trainer steps the very weights vLLM serves.

One script, one GPU: ``vllm.LLM`` (through :class:`ipcbridge.vllm.colocate.VllmEngine`) generates from token
ids, ``ipcbridge.connect`` gives a Hugging Face model whose parameters are views of vLLM's weights (in the
EngineCore process, through CUDA IPC), and REINFORCE updates them in place inside ``bridge.update()``.
There is no weight sync: the next ``generate`` already samples from the new weights.

The task is a toy one so that it runs with dummy weights and no tokenizer: the reward of a completion is the
fraction of its tokens whose id is below ``GOOD_BELOW`` (10% of the vocabulary); the policy learns to emit
them.

    pip install "ipcbridge[vllm]"          # on a GPU machine, in a clone of this repository
    python examples/vllm_colocated_rl.py --steps 30

vLLM serves bf16, so the optimizer is wrapped in ``ipcbridge.optim.master_weights`` (exact fp32 masters for
+2 bytes per parameter; docs/precision.md).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch

import ipcbridge

GOOD_BELOW = 100


def reward(tokens: list[int]) -> float:
    return sum(t < GOOD_BELOW for t in tokens) / len(tokens)


def train(engine: Any, bridge: Any, *, steps: int = 30, batch: int = 16, prompt_len: int = 4,
          max_tokens: int = 12, lr: float = 3e-3, seed: int = 0,
          log: Callable[[str], None] | None = print) -> list[dict[str, float]]:
    """REINFORCE with a mean baseline. Returns one record per step (reward, versions, logprob parity)."""
    model = bridge.model
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    opt = ipcbridge.optim.master_weights(torch.optim.Adam(model.parameters(), lr=lr))
    g = torch.Generator().manual_seed(seed)
    endpoint = engine.ipcbridge_endpoint()
    history: list[dict[str, float]] = []
    for step in range(steps):
        prompts = torch.randint(GOOD_BELOW, vocab, (batch, prompt_len), generator=g).tolist()
        outs = engine.generate(prompts, max_tokens=max_tokens, temperature=1.0, seed=seed * 100_000 + step * batch)
        rewards = torch.tensor([reward(o.token_ids) for o in outs], device=device)
        advantage = rewards - rewards.mean()

        ids = torch.tensor([p + o.token_ids for p, o in zip(prompts, outs, strict=True)], device=device)
        completion = ids[:, prompt_len:]
        logits = model(ids).logits[:, prompt_len - 1: -1].float()
        logp = torch.log_softmax(logits, -1).gather(2, completion[..., None])[..., 0]
        vllm_logp = torch.tensor([o.logprobs for o in outs], device=device)
        loss = -(advantage[:, None] * logp).sum(1).mean() / max_tokens

        opt.zero_grad(set_to_none=True)
        loss.backward()
        with bridge.update():  # pause -> step -> device sync -> reset prefix cache, publish the version
            opt.step()

        rec = {
            "step": step,
            "reward": float(rewards.mean()),
            "sampled_with_version": outs[0].weight_version,
            "weight_version": bridge.weight_version,
            "engine_weight_version": endpoint.engine_weight_version(),
            "logprob_mean_abs_diff": float((logp.detach() - vllm_logp).abs().mean()),
        }
        history.append(rec)
        if log is not None:
            log(f"step {step:3d}  reward {rec['reward']:.3f}  weights v{rec['weight_version']}  "
                f"|logp_hf - logp_vllm| {rec['logprob_mean_abs_diff']:.4f}")
    return history


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Overwrite vLLM's dummy weights (uniform +-1e-3, norms included) with an HF-style init, through the
    attached views, i.e. directly in vLLM's memory."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name:
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=g, device=p.device) * std)


def main() -> None:
    from transformers import AutoConfig

    from ipcbridge.vllm.colocate import VllmEngine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen2", "qwen3", "mistral"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    config = AutoConfig.for_model(
        args.arch, vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )
    with VllmEngine(config) as engine:
        bridge = ipcbridge.connect(engine, check=True)
        report = bridge.check()
        print(f"attached {report.hf_parameters} HF parameters onto {report.engine_tensors} vLLM tensors; "
              f"trainer weight bytes: {report.trainer_weight_bytes}")
        with bridge.update():
            init_weights(bridge.model)
        history = train(engine, bridge, steps=args.steps, lr=args.lr)
        first = statistics.fmean(h["reward"] for h in history[:5])
        last = statistics.fmean(h["reward"] for h in history[-5:])
        print(f"reward: first 5 steps {first:.3f} -> last 5 steps {last:.3f}; "
              f"median fence {1e3 * (bridge.fence_seconds_median() or 0):.2f} ms")
        bridge.close()


if __name__ == "__main__":
    main()

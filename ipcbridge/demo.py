"""``ipcbridge demo``: colocated RL in a minute, on a tiny random Llama.

The engine samples completions; the reward is the fraction of sampled tokens equal to a target token;
the trainer runs REINFORCE (with a mean baseline) on the attached model, whose parameters *are* the
engine's weights; each optimizer step is fenced with ``bridge.update()``. The reward climbs because the
engine's next samples come from the weights the trainer just wrote, with no copy in between.
"""

from __future__ import annotations

import random
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

import ipcbridge
from ipcbridge.bridge import model_weight_bytes
from ipcbridge.optim import master_weights

TARGET_TOKEN = 7


def demo_config(vocab_size: int = 96) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )


@dataclass
class Summary:
    reward_first: float
    reward_last: float
    steps: int
    transport: str
    engine: str
    device: str
    dtype: str
    precision: str
    attach_seconds: float
    fence_seconds_median: float
    trainer_weight_bytes: int
    model_weight_bytes: int
    cuda_allocated_delta_bytes: int | None
    seconds: float


def reward(tokens: list[int], target: int = TARGET_TOKEN) -> float:
    return sum(t == target for t in tokens) / max(1, len(tokens))


def _start_engine(kind: str, config: Any, device: str | None, seed: int, dtype: str) -> Any:
    if kind == "local":
        return ipcbridge.LocalEngine(config, device=device, seed=seed, dtype=dtype)
    if kind == "vllm":
        from ipcbridge.vllm.colocate import VllmEngine

        return VllmEngine(config, seed=seed)
    raise ValueError(f"unknown engine {kind!r}; use 'local' or 'vllm'")


def _reinforce(model: Any, opt: torch.optim.Optimizer, ids: list[list[int]], advantages: list[float],
               prompt_len: int) -> None:
    """REINFORCE's gradient for sampled completions; the caller steps ``opt`` inside the fence."""
    device = next(model.parameters()).device
    tokens = torch.tensor(ids, device=device)
    logits = model(tokens).logits[:, prompt_len - 1 : -1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, tokens[:, prompt_len:, None])[..., 0]
    loss = -(torch.tensor(advantages, device=device)[:, None] * lp).sum(1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()


def _summary(bridge: ipcbridge.Bridge, engine: str, precision: str, rewards: list[float],
             cuda_delta: int | None) -> Summary:
    model = bridge.model
    param = next(model.parameters())
    return Summary(
        reward_first=statistics.fmean(rewards[:3]),
        reward_last=statistics.fmean(rewards[-3:]),
        steps=len(rewards),
        transport=bridge.transport,
        engine=engine,
        device=str(param.device),
        dtype=str(param.dtype).removeprefix("torch."),
        precision=precision,
        attach_seconds=bridge.attach_seconds,
        fence_seconds_median=bridge.fence_seconds_median() or 0.0,
        trainer_weight_bytes=bridge.trainer_weight_bytes(),
        model_weight_bytes=model_weight_bytes(model),
        cuda_allocated_delta_bytes=cuda_delta,
        seconds=0.0,
    )


def run(
    engine: str = "local",
    steps: int = 30,
    batch: int = 16,
    max_tokens: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
    dtype: str = "bfloat16",
    precision: str = "remainder",
    device: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Summary:
    """Run the demo loop; ``log`` receives one line per step. Returns the summary."""
    log = log or (lambda _line: None)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    config = demo_config()
    t_start = time.perf_counter()
    with _start_engine(engine, config, device, seed, dtype) as eng:
        cuda = torch.cuda.is_available() and getattr(eng, "device", "cpu") != "cpu"
        before = torch.cuda.memory_allocated() if cuda else 0
        with warnings.catch_warnings():
            if precision != "none":  # the warning's advice is taken below
                warnings.simplefilter("ignore", ipcbridge.PrecisionWarning)
            bridge = ipcbridge.connect(eng)
        delta = torch.cuda.memory_allocated() - before if cuda else None
        model = bridge.model
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        if precision != "none":  # bf16 weights train like fp32 (README, Precision)
            opt = master_weights(opt, precision, seed=seed)
        rewards: list[float] = []
        log(f"{'step':>4} {'reward':>7} {'version':>7}  sample")
        for step in range(steps):
            prompts = [[rng.randrange(1, config.vocab_size) for _ in range(4)] for _ in range(batch)]
            outs = eng.generate(prompts, max_tokens=max_tokens, temperature=1.0, seed=seed * 100003 + step)
            rs = [reward(o.token_ids) for o in outs]
            mean_r = statistics.fmean(rs)
            rewards.append(mean_r)
            log(f"{step:>4} {mean_r:>7.3f} {outs[0].weight_version:>7}  {outs[0].token_ids}")
            _reinforce(model, opt, [p + o.token_ids for p, o in zip(prompts, outs, strict=True)],
                       [r - mean_r for r in rs], len(prompts[0]))
            with bridge.update():
                opt.step()
        summary = _summary(bridge, engine, precision, rewards, delta)
        bridge.close()
    summary.seconds = time.perf_counter() - t_start
    return summary


def summary_dict(s: Summary) -> dict[str, Any]:
    return asdict(s)

"""``ipcbridge demo``: colocated RL in a minute, on a tiny random Llama.

The engine samples completions; the reward is the fraction of sampled tokens equal to a target token;
the trainer runs REINFORCE (with a mean baseline) on the attached model, whose parameters *are* the
engine's weights; each optimizer step is fenced with ``bridge.update()``. The reward climbs because the
engine's next samples come from the weights the trainer just wrote, with no copy in between.

The library never prints: progress and per-step rows go to the ``log`` callable (the CLI passes ``print``).
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

import ipcbridge
from ipcbridge.bridge import model_weight_bytes
from ipcbridge.optim import master_weights

TARGET_TOKEN = 7
#: ``reward_first`` / ``reward_last`` average this many steps, so one lucky batch does not decide them
WINDOW = 3


class Log(Protocol):
    """A ``print``-like sink: ``log(text)`` writes a line; ``log(text, end="")`` starts a line that the
    next call finishes (start-up phases print "starting the engine... 4.8 s" on one line)."""

    def __call__(self, text: str, *, end: str = ...) -> None: ...


def _silent(text: str, *, end: str = "\n") -> None:
    del text, end


def demo_config(vocab_size: int = 96) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )


@dataclass
class Step:
    step: int
    reward: float
    weight_version: int


@dataclass
class Summary:
    reward_first: float  # mean reward of the first WINDOW steps
    reward_last: float  # mean reward of the last WINDOW steps
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
    engine_start_seconds: float = 0.0
    reward_window: int = WINDOW
    per_step: list[Step] = field(default_factory=list)

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.per_step]


def reward(tokens: list[int], target: int = TARGET_TOKEN) -> float:
    return sum(t == target for t in tokens) / max(1, len(tokens))


@contextlib.contextmanager
def _phase(log: Log, text: str) -> Iterator[None]:
    """Log ``text...`` now and its duration when done, so a slow start-up is never silent."""
    log(f"{text}... ", end="")
    t0 = time.perf_counter()
    try:
        yield
    except BaseException:
        log("failed")
        raise
    log(f"{time.perf_counter() - t0:.2f} s")


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


def _summary(bridge: ipcbridge.Bridge, engine: str, precision: str, history: list[Step],
             cuda_delta: int | None) -> Summary:
    model = bridge.model
    param = next(model.parameters())
    rewards = [s.reward for s in history]
    return Summary(
        reward_first=statistics.fmean(rewards[:WINDOW]),
        reward_last=statistics.fmean(rewards[-WINDOW:]),
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
        per_step=history,
    )


def _connect(eng: Any, precision: str, log: Log) -> tuple[ipcbridge.Bridge, int | None]:
    """Attach the trainer; returns the bridge and the CUDA bytes attaching allocated (None on CPU)."""
    cuda = torch.cuda.is_available() and getattr(eng, "device", "cpu") != "cpu"
    before = torch.cuda.memory_allocated() if cuda else 0
    with _phase(log, "attaching the trainer to the engine's weights"), warnings.catch_warnings():
        if precision != "none":  # the warning's advice is taken in _train
            warnings.simplefilter("ignore", ipcbridge.PrecisionWarning)
        bridge = ipcbridge.connect(eng)
    return bridge, (torch.cuda.memory_allocated() - before if cuda else None)


def _train(eng: Any, bridge: ipcbridge.Bridge, vocab_size: int, *, steps: int, batch: int, max_tokens: int,
           lr: float, seed: int, precision: str, log: Log) -> list[Step]:
    """The RL loop: sample, score, REINFORCE, step inside the fence. One logged row per step."""
    rng = random.Random(seed)
    model = bridge.model
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if precision != "none":  # bf16 weights train like fp32 (README, Precision)
        opt = master_weights(opt, precision, seed=seed)
    history: list[Step] = []
    log(f"{'step':>4} {'reward':>7} {'version':>7}  sample (token ids; {TARGET_TOKEN} scores)")
    for step in range(steps):
        prompts = [[rng.randrange(1, vocab_size) for _ in range(4)] for _ in range(batch)]
        outs = eng.generate(prompts, max_tokens=max_tokens, temperature=1.0, seed=seed * 100003 + step)
        rs = [reward(o.token_ids) for o in outs]
        mean_r = statistics.fmean(rs)
        history.append(Step(step, mean_r, int(outs[0].weight_version)))
        log(f"{step:>4} {mean_r:>7.3f} {outs[0].weight_version:>7}  {outs[0].token_ids}")
        _reinforce(model, opt, [p + o.token_ids for p, o in zip(prompts, outs, strict=True)],
                   [r - mean_r for r in rs], len(prompts[0]))
        with bridge.update():
            opt.step()
    return history


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
    log: Log | Callable[..., None] | None = None,
) -> Summary:
    """Run the demo loop and return its summary.

    ``log`` (``print``-like, see :class:`Log`) receives start-up progress and one row per step; the default
    is silent.
    """
    if steps < 1 or batch < 1:
        raise ValueError(f"steps={steps}, batch={batch}: both must be at least 1")
    log = log or _silent
    torch.manual_seed(seed)
    config = demo_config()
    t_start = time.perf_counter()
    where = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with contextlib.ExitStack() as stack:
        # entering is part of starting: VllmEngine starts vLLM in __enter__, LocalEngine in __init__
        with _phase(log, f"starting the {engine} engine ({where}, {dtype})"):
            eng = stack.enter_context(_start_engine(engine, config, device, seed, dtype))
        engine_seconds = time.perf_counter() - t_start
        bridge, delta = _connect(eng, precision, log)
        history = _train(eng, bridge, config.vocab_size, steps=steps, batch=batch, max_tokens=max_tokens,
                         lr=lr, seed=seed, precision=precision, log=log)
        summary = _summary(bridge, engine, precision, history, delta)
        bridge.close()
    summary.seconds = time.perf_counter() - t_start
    summary.engine_start_seconds = engine_seconds
    return summary


def summary_dict(s: Summary) -> dict[str, Any]:
    """The summary as plain JSON types; ``per_step`` is a list of {step, reward, weight_version}."""
    return asdict(s)


def plot(s: Summary, path: str) -> None:
    """Write the reward curve to ``path`` (PNG). Needs matplotlib: ``pip install "ipcbridge[plot]"``."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError('plotting needs matplotlib; pip install "ipcbridge[plot]"') from e
    matplotlib.use("Agg")  # a file, never a window: works on headless machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    try:
        ax.plot([p.step for p in s.per_step], s.rewards, marker="o", markersize=3)
        ax.set(xlabel="step", ylabel=f"reward (share of token {TARGET_TOKEN})", ylim=(-0.02, 1.02),
               title=f"ipcbridge demo: {s.engine} engine, {s.device}, {s.dtype}, transport {s.transport}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)

"""What the embedded engine accepts: the model's limits a request must fit, and each request's budget.

Note [bounded requests]
    Nothing a request asks for may hold the engine longer than the request itself is willing to wait.
      * Sizes: ``max_tokens`` and every prompt are checked against the model's context
        (``max_position_embeddings``) and vocabulary, in the trainer's process before the request is sent
        (``LocalEngine`` learns the limits from ``ping``) and again in the engine, which trusts no client.
      * Time: each request carries its deadline (the client's ``request_timeout``). Waiting at the pause
        gate, waiting for the forward lock and every decode step check it, so a request never holds the
        forward lock more than one decode step past its deadline, and a pause waiting for in-flight work
        (Note [pause gate] in :mod:`ipcbridge.engine.core`) waits no longer than that either.
      * Cancellation: a client that gave up closes its connection; the engine sees that between decode
        steps and stops generating for nobody.
      * Fan-out: ``n`` completions per prompt are capped at :data:`MAX_N`, so one request's work stays a
        bounded multiple of its prompts.

Note [sampling like vLLM]
    :class:`Sampling` carries the knobs RL frameworks set on vLLM's ``SamplingParams`` (TRL's GRPO among
    them), with vLLM's names and meanings: ``n`` completions per prompt, ``top_k`` (0 or -1: off),
    ``top_p``, ``stop_token_ids`` (the stop token is the last one returned), ``ignore_eos`` (else the
    model's EOS ids from its generation config stop too) and ``logprobs`` as vLLM's ``logprobs_mode``:
    ``"raw"`` (``log_softmax`` of the model's logits, what ``Bridge.check`` compares) or ``"processed"``
    (after the temperature, before top-k/top-p: what a trainer that divides its logits by the temperature
    computes, e.g. TRL's importance-sampling correction). The defaults are the engine's behaviour before
    these existed: one completion, no filtering, no stopping, raw logprobs.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ipcbridge.errors import EngineError, RequestError
from ipcbridge.wire import INT64_MAX

#: The context assumed for a config that declares none: HF's own default ``max_position_embeddings``
#: for most decoders, and small enough that a request within it cannot run for long.
FALLBACK_CONTEXT = 2048
#: The seeds ``torch.Generator.manual_seed`` takes.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1
#: The deadline of a request that names none (the default ``LocalEngine(request_timeout=...)``).
DEFAULT_DEADLINE_SECONDS = 60.0
#: The dtypes the engine keeps weights in (the names ``python -m ipcbridge.engine.server --dtype`` takes).
ENGINE_DTYPES = ("float32", "bfloat16", "float16", "float64")
#: Completions per prompt one request may ask for (Note [bounded requests]).
MAX_N = 256
#: ``Sampling.logprobs`` values (vLLM's ``logprobs_mode`` names, without the suffix).
LOGPROBS_MODES = ("raw", "processed")
#: The device types the engine's weights can be shared from: /dev/shm (cpu) and CUDA IPC (cuda).
ENGINE_DEVICES = ("cpu", "cuda")


def check_int(value: Any, what: str, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """An int (not a bool or a float) in ``[minimum, maximum]``, or ``RequestError`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        bound = f">= {minimum}" if maximum == INT64_MAX else f"in [{minimum}, {maximum}]"
        raise RequestError(f"{what} must be an int {bound}, got {value!r:.60}")
    return value


def check_number(value: Any, what: str, minimum: float = 0.0) -> float:
    """A finite number (not a bool) at least ``minimum``, or ``RequestError`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise RequestError(f"{what} must be a finite number >= {minimum}, got {value!r:.60}")
    return float(value)


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _tokens(value: Any, what: str, vocab: int) -> list[int]:
    """``value`` if it is a non-empty list of token ids in ``[0, vocab)``; else ``RequestError`` saying which."""
    if not isinstance(value, list):
        detail = f"got {type(value).__name__}" + ("; convert it with .tolist()" if hasattr(value, "tolist") else "")
    elif not value:
        detail = "got an empty list"
    else:
        bad = next(((j, t) for j, t in enumerate(value) if not _is_token(t) or not 0 <= t < vocab), None)
        if bad is None:
            return value
        j, t = bad
        detail = (f"{what}[{j}] is {t!r:.40} ({type(t).__name__}), not an int" if not _is_token(t) else
                  f"{what}[{j}] = {t} is outside the model's vocabulary (vocab_size={vocab})")
    raise RequestError(f"{what} must be a non-empty list of token ids in [0, {vocab}); {detail}")


def check_prompts(prompts: Any) -> None:
    """``RequestError`` unless ``prompts`` is a non-empty list; names the usual slip, one prompt (a flat list
    of ints) where a list of prompts belongs. Each prompt's tokens are checked by ``_tokens``."""
    if isinstance(prompts, list) and prompts and all(_is_token(t) for t in prompts):
        raise RequestError(
            "generate: prompts must be a list of token-id lists, e.g. [[1, 2, 3]]; got a flat list of ints: wrap "
            "it in a list"
        )
    if not isinstance(prompts, list) or not prompts:
        got = "an empty list" if isinstance(prompts, list) else type(prompts).__name__
        raise RequestError(
            f"generate: prompts must be a non-empty list of prompts (lists of token ids), e.g. [[1, 2, 3]]; got {got}"
        )


def engine_device(device: str | torch.device | None) -> str:
    """The engine's device as a string: ``device``, or ``cuda`` when this torch sees a GPU, else ``cpu``.

    Checked in the trainer's process before an engine starts, so a bad device fails in milliseconds rather
    than after the engine has loaded the model: ``ValueError`` with the fix.
    """
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r:.60} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in ENGINE_DEVICES:
        raise ValueError(f"device={device!r}: the embedded engine runs on {' or '.join(ENGINE_DEVICES)}; use one")
    if dev.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(
                f"device={device!r}, but this torch ({torch.__version__}) is a CPU-only build; use device='cpu', "
                "or install a CUDA build of torch"
            )
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
            raise ValueError(
                f"device={device!r}, but torch sees no GPU (CUDA_VISIBLE_DEVICES={visible!r}); use device='cpu', "
                "or run where a GPU is visible"
            )
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device={device!r}, but torch sees {count} GPU(s): use cuda:0 .. cuda:{count - 1}")
    return str(dev)


def engine_dtype(dtype: torch.dtype | str | None, device: str) -> str:
    """The name of the engine's weight dtype (default: bfloat16 on CUDA, float32 on CPU); ``ValueError``
    listing the accepted ones otherwise. Checked in the trainer's process, like :func:`engine_device`."""
    if dtype is None:
        return "bfloat16" if device.startswith("cuda") else "float32"
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, (str, torch.dtype)) else None
    if name not in ENGINE_DTYPES:
        raise ValueError(
            f"dtype={dtype!r:.60} is not one the engine keeps weights in; use one of "
            f"{', '.join(ENGINE_DTYPES)} (a torch.dtype or its name)"
        )
    return name


@dataclass(frozen=True)
class Limits:
    """The model's limits every request must fit. Crosses to the trainer in ``ping``'s reply."""

    #: Positions the model can attend to: a prompt plus the tokens generated after it.
    context: int
    vocab: int

    def __post_init__(self) -> None:
        check_int(self.context, "limits.context", minimum=1)
        check_int(self.vocab, "limits.vocab", minimum=1)

    @classmethod
    def of_config(cls, config: Any) -> Limits:
        context = getattr(config, "max_position_embeddings", None)
        if isinstance(context, bool) or not isinstance(context, int) or context < 1:
            context = FALLBACK_CONTEXT
        return cls(context=context, vocab=int(config.vocab_size))

    @classmethod
    def from_dict(cls, d: Any) -> Limits:
        if not isinstance(d, Mapping) or "context" not in d or "vocab" not in d:
            raise EngineError(
                f"the engine did not report its limits (context, vocab) but {str(d)[:100]!r}: it runs another "
                "ipcbridge version; use the same one in the engine and the trainer"
            )
        return cls(context=d["context"], vocab=d["vocab"])

    def to_dict(self) -> dict[str, int]:
        return {"context": self.context, "vocab": self.vocab}

    def check_generate(self, prompts: Any, max_tokens: Any, temperature: Any, seed: Any,
                       sampling: Sampling | None = None) -> None:
        """``RequestError`` naming the argument unless a ``generate`` request fits (Note [bounded requests])."""
        check_prompts(prompts)
        if sampling is not None:
            sampling.check_vocab(self.vocab)
        check_int(max_tokens, "generate: max_tokens", minimum=1)
        for i, prompt in enumerate(prompts):
            _tokens(prompt, f"generate: prompts[{i}]", self.vocab)
            if len(prompt) + max_tokens > self.context:
                raise RequestError(
                    f"generate: prompts[{i}] has {len(prompt)} tokens and max_tokens={max_tokens}, together more than "
                    f"the model's context (max_position_embeddings={self.context}); ask for at most "
                    f"{max(0, self.context - len(prompt))} tokens, or shorten the prompt"
                )
        check_number(temperature, "generate: temperature")
        if seed is not None:
            check_int(seed, "generate: seed", minimum=_SEED_MIN, maximum=_SEED_MAX)

    def check_score(self, prompt: Any, completion: Any) -> None:
        """``RequestError`` naming the argument unless a ``score`` request fits."""
        _tokens(prompt, "score: prompt", self.vocab)
        _tokens(completion, "score: completion", self.vocab)
        if len(prompt) + len(completion) > self.context:
            raise RequestError(
                f"score: the prompt ({len(prompt)} tokens) and completion ({len(completion)}) are together longer "
                f"than the model's context (max_position_embeddings={self.context}); score a shorter sequence"
            )


@dataclass(frozen=True)
class Sampling:
    """How to sample beyond the temperature: Note [sampling like vLLM]. Crosses the control socket as a dict
    (:meth:`to_dict`); every field is checked here, in the trainer's process and again in the engine."""

    n: int = 1
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = True
    logprobs: str = "raw"

    def __post_init__(self) -> None:
        check_int(self.n, "generate: n", minimum=1, maximum=MAX_N)
        top_p = self.top_p
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
            raise RequestError(f"generate: top_p must be a number in (0, 1], got {top_p!r:.60}")
        check_int(self.top_k, "generate: top_k", minimum=-1)
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(_is_token(t) and t >= 0
                                                                        for t in self.stop_token_ids):
            raise RequestError(f"generate: stop_token_ids must be a list of token ids, got {self.stop_token_ids!r:.80}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.ignore_eos, bool):
            raise RequestError(f"generate: ignore_eos must be a bool, got {self.ignore_eos!r:.60}")
        if self.logprobs not in LOGPROBS_MODES:
            raise RequestError(f"generate: logprobs must be one of {LOGPROBS_MODES}, got {self.logprobs!r:.60}")

    @classmethod
    def from_dict(cls, d: Any) -> Sampling:
        """From a request's ``sampling`` argument; ``RequestError`` for anything else than its fields."""
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise RequestError(f"generate: sampling must be a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise RequestError(f"generate: unknown sampling fields {unknown[:5]}; use the same ipcbridge version in "
                               "the engine and the trainer")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "top_p": self.top_p, "top_k": self.top_k, "stop_token_ids": list(self.stop_token_ids),
                "ignore_eos": self.ignore_eos, "logprobs": self.logprobs}

    def check_vocab(self, vocab: int) -> None:
        bad = [t for t in self.stop_token_ids if t >= vocab]
        if bad:
            raise RequestError(f"generate: stop_token_ids {bad[:5]} are outside the model's vocabulary "
                               f"(vocab_size={vocab})")


def _never_gone() -> bool:
    return False


@dataclass(frozen=True)
class Budget:
    """How long one request may run in the engine, and whether its client is still waiting for it.

    Lives in the engine only (the client sends ``deadline`` seconds); ``gone`` is polled between decode steps.
    """

    seconds: float
    deadline: float
    gone: Callable[[], bool] = field(default=_never_gone, compare=False)

    @classmethod
    def start(cls, seconds: float, gone: Callable[[], bool] = _never_gone) -> Budget:
        """A budget of ``seconds`` from now."""
        return cls(seconds=seconds, deadline=time.monotonic() + seconds, gone=gone)

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def check(self, what: str) -> None:
        """Raise ``EngineError`` if the request's client has gone or its deadline has passed."""
        if self.gone():
            raise EngineError(f"{what} stopped: its client went away (it was cancelled or gave up waiting)")
        if time.monotonic() >= self.deadline:
            raise EngineError(
                f"{what} ran past its deadline of {self.seconds:.1f}s and was stopped; raise the request timeout "
                "(LocalEngine(request_timeout=...)) or ask for fewer tokens"
            )

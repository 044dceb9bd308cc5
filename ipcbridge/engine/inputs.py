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
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ipcbridge.errors import EngineError
from ipcbridge.wire import INT64_MAX

#: The context assumed for a config that declares none: HF's own default ``max_position_embeddings``
#: for most decoders, and small enough that a request within it cannot run for long.
FALLBACK_CONTEXT = 2048
#: The seeds ``torch.Generator.manual_seed`` takes.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1
#: The deadline of a request that names none (the default ``LocalEngine(request_timeout=...)``).
DEFAULT_DEADLINE_SECONDS = 60.0


def check_int(value: Any, what: str, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """An int (not a bool or a float) in ``[minimum, maximum]``, or ``EngineError`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        bound = f">= {minimum}" if maximum == INT64_MAX else f"in [{minimum}, {maximum}]"
        raise EngineError(f"{what} must be an int {bound}, got {value!r:.60}")
    return value


def check_number(value: Any, what: str, minimum: float = 0.0) -> float:
    """A finite number (not a bool) at least ``minimum``, or ``EngineError`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise EngineError(f"{what} must be a finite number >= {minimum}, got {value!r:.60}")
    return float(value)


def _tokens(value: Any, what: str, vocab: int) -> list[int]:
    if (not isinstance(value, list) or not value
            or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in value)):
        raise EngineError(f"{what} must be a non-empty list of token ids in [0, {vocab})")
    return value


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

    def check_generate(self, prompts: Any, max_tokens: Any, temperature: Any, seed: Any) -> None:
        """``EngineError`` naming the argument unless a ``generate`` request fits (Note [bounded requests])."""
        if not isinstance(prompts, list) or not prompts:
            raise EngineError("generate: prompts must be a non-empty list of prompts (lists of token ids)")
        check_int(max_tokens, "generate: max_tokens", minimum=1)
        for i, prompt in enumerate(prompts):
            _tokens(prompt, f"generate: prompts[{i}]", self.vocab)
            if len(prompt) + max_tokens > self.context:
                raise EngineError(
                    f"generate: prompts[{i}] has {len(prompt)} tokens and max_tokens={max_tokens}, together more than "
                    f"the model's context (max_position_embeddings={self.context}); ask for at most "
                    f"{max(0, self.context - len(prompt))} tokens, or shorten the prompt"
                )
        check_number(temperature, "generate: temperature")
        if seed is not None:
            check_int(seed, "generate: seed", minimum=_SEED_MIN, maximum=_SEED_MAX)

    def check_score(self, prompt: Any, completion: Any) -> None:
        """``EngineError`` naming the argument unless a ``score`` request fits."""
        _tokens(prompt, "score: prompt", self.vocab)
        _tokens(completion, "score: completion", self.vocab)
        if len(prompt) + len(completion) > self.context:
            raise EngineError(
                f"score: the prompt ({len(prompt)} tokens) and completion ({len(completion)}) are together longer "
                f"than the model's context (max_position_embeddings={self.context}); score a shorter sequence"
            )


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

"""TRL's generation on ``vllm serve``: ``POST /v1/completions`` from token ids, answered as TRL's colocate path.

:class:`~ipcbridge.integrations.trl.BridgeGeneration` calls :func:`generate` when the bridge's endpoint is
an :class:`~ipcbridge.vllm.http.HttpEndpoint` (``ipcbridge.connect("http://host:port")``). No TRL import
here: the request and the answer are plain data, tested against a fake server.

Note [TRL's generate over HTTP]
    TRL's colocate path builds ``SamplingParams(n=1, temperature, top_p, top_k, min_p, repetition_penalty,
    max_tokens, logprobs, **generation_kwargs)`` and returns, per completion, the prompt's ids, the
    completion's ids, and per token the ``logprobs + 1`` (at most) best logprobs with their token ids, by
    rank. vLLM's OpenAI-compatible ``/v1/completions`` takes the same sampling fields (``CompletionRequest``
    of 0.25.1 to 0.33, read from each release) and a prompt as token ids (``prompt: [[ids], ...]``). What
    makes the answer exact and parseable:

    * ``return_token_ids``: each choice carries ``token_ids`` and ``prompt_token_ids`` (no detokenizing,
      works under ``--skip-tokenizer-init``); ``return_tokens_as_token_ids``: the keys of
      ``top_logprobs`` are ``"token_id:<id>"``, never text that two tokens could share.
    * ``logprobs``: TRL's own count; vLLM computes them in the server's ``--logprobs-mode`` (TRL's
      importance-sampling correction wants ``processed_logprobs``, as TRL's colocate engine is started;
      :func:`served_logprobs_mode` asks). vLLM clamps ``-inf`` to ``-9999``; JSON keeps no rank, so the
      ``top_logprobs`` of a step are ordered by value (ties may order differently from vLLM's ranks).
    * ``n``: TRL repeats each prompt ``num_generations`` times in a row; each run becomes one prompt with
      ``n`` (vLLM shares its prefill), the choices come back prompt-major (``index``), and each prompt's
      ids are repeated per completion, as TRL's server mode does.
    * ``cache_salt``: the endpoint's (Note [stale KV: reset or salt] in :mod:`ipcbridge.vllm.base`), so
      ``kv_reset="salted"`` is safe. ``return_weight_versions`` (0.33+; ignored before, vLLM logs unknown
      fields at debug level): each choice's version spans, which must name the trainer's version.
    * The answer must fit the client's body cap (``MAX_BODY_BYTES``, ~75 bytes a token with one logprob):
      the prompts are split into requests of an estimated :data:`CHUNK_FRACTION` of the cap, sent at once
      from a thread pool so the server still batches them all; each request retries a 503 within the one
      deadline (Note [a 503 during a fence] in :mod:`ipcbridge.vllm.http`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from ipcbridge.errors import BridgeError
from ipcbridge.vllm.endpoints import output_weight_version
from ipcbridge.vllm.http import HttpEndpoint

logger = logging.getLogger(__name__)

#: Fields this module sets in every request; ``generation_kwargs`` may not override them.
RESERVED = ("model", "prompt", "n", "logprobs", "stream", "echo", "return_token_ids", "return_tokens_as_token_ids",
            "cache_salt", "return_weight_versions", "prompt_logprobs")
#: Estimated answer bytes per completion token, and per extra top logprob (vLLM's JSON, with margin).
BYTES_PER_TOKEN = 100
BYTES_PER_TOP_LOGPROB = 40
#: The share of the body cap one request's estimated answer may take.
CHUNK_FRACTION = 0.5
#: Requests in flight at once (the server batches them; more only queue in vLLM's scheduler).
MAX_IN_FLIGHT = 64
_TOKEN_KEY = "token_id:"
_TOKEN_KEY_RE = re.compile(r"token_id:([0-9]{1,19})")


@dataclass(frozen=True)
class CompletionSettings:
    """TRL's sampling settings as ``/v1/completions`` fields (Note [TRL's generate over HTTP]). Checked here,
    in the trainer's process, at the trainer's construction: a bad field fails before the first step."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = 0
    structured_outputs_regex: str | None = None
    generation_kwargs: dict[str, Any] = field(default_factory=dict)
    #: The model's vocabulary (``config.vocab_size``): an answer's token ids must lie in it.
    vocab: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "top_k"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise BridgeError(f"GRPOConfig {name} must be a finite number, got {v!r:.60}; vllm serve's "
                                  "/v1/completions would refuse the request at the first step")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise BridgeError(f"max_completion_length must be an int >= 1, got {self.max_tokens!r}")
        lp = self.logprobs
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or lp < 0):
            raise BridgeError(f"GRPOConfig logprobs must be None or an int >= 0, got {lp!r}")
        clash = sorted(set(self.generation_kwargs) & set(RESERVED))
        if clash:
            raise BridgeError(f"GRPOConfig(generation_kwargs) {clash} are set by ipcbridge's vllm serve generation "
                              f"(it reads the answer by them); remove them")
        try:
            json.dumps(self.generation_kwargs, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise BridgeError(f"GRPOConfig(generation_kwargs) must be JSON for vllm serve's /v1/completions: {e}") from None

    def body(self, model: str, prompts: list[list[int]], n: int, salt: str | None) -> dict[str, Any]:
        """One ``/v1/completions`` request for ``prompts``, ``n`` completions each."""
        body: dict[str, Any] = {
            "model": model, "prompt": [list(p) for p in prompts], "n": n, "max_tokens": self.max_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "min_p": 0.0 if self.min_p is None else self.min_p, "repetition_penalty": self.repetition_penalty,
            "return_token_ids": True, "return_tokens_as_token_ids": True, "return_weight_versions": True,
        }
        if self.logprobs is not None:
            body["logprobs"] = self.logprobs
        if self.structured_outputs_regex is not None:
            body["structured_outputs"] = {"regex": self.structured_outputs_regex}
        body.update(self.generation_kwargs)  # as TRL's colocate path: they override the settings above
        if salt is not None:
            body["cache_salt"] = salt
        return body

    def chunk_size(self, n: int, max_body: int) -> int:
        """Prompts per request, so that one answer is estimated at :data:`CHUNK_FRACTION` of ``max_body``."""
        per_token = BYTES_PER_TOKEN + BYTES_PER_TOP_LOGPROB * (self.logprobs or 0)
        per_prompt = n * self.max_tokens * per_token
        return max(1, int(max_body * CHUNK_FRACTION) // per_prompt)


def in_runs(prompts: list[list[int]], g: int) -> bool:
    """Whether ``prompts`` is runs of ``g`` equal prompts (how TRL repeats each prompt for its group)."""
    if g <= 1 or len(prompts) % g:
        return False
    return all(list(prompts[i]) == list(prompts[i - i % g]) for i in range(len(prompts)))


def _token_id(key: str, vocab: int | None, where: str) -> int:
    m = _TOKEN_KEY_RE.fullmatch(key) if isinstance(key, str) else None
    if m is None:
        raise BridgeError(f"{where}: a top_logprobs key {str(key)[:40]!r} is not 'token_id:<id>'; the server ignored "
                          "return_tokens_as_token_ids (vLLM >= 0.25.1 honours it)")
    return _check_ids([int(m[1])], vocab, where, "a top_logprobs token id")[0]


def _check_ids(ids: list[Any], vocab: int | None, where: str, what: str) -> list[int]:
    """``ids`` if every one is a token id of the model (an int in ``[0, vocab)``), else ``BridgeError``: a
    trainer that embeds an id outside its vocabulary fails far from here (or, on a GPU, with a device assert)."""
    bad = [t for t in ids if type(t) is not int or t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        raise BridgeError(f"{where}: {what} {str(bad[:5])[:120]} are not token ids of the model (vocab_size={vocab}); "
                          "the server serves another model or is not vLLM; connect to the engine you attached to")
    return ids


def _logprob(x: Any, where: str) -> float | None:
    """A logprob as vLLM writes one: finite (it clamps -inf to -9999) and <= 0, or None."""
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x > 0:
        raise BridgeError(f"{where}: logprob {x!r:.40} is not a finite number <= 0; the server is not vLLM or "
                          "its answer is corrupt")
    return float(x)


def _choice_logprobs(choice: dict[str, Any], tokens: list[int], settings: CompletionSettings,
                     where: str) -> tuple[list[Any], list[Any]]:
    """Per token: (logprobs best first, their token ids), at most ``k + 1`` each, as TRL's ``extract_logprobs``."""
    lp, k = choice.get("logprobs"), settings.logprobs or 0
    if (not isinstance(lp, dict) or not isinstance(lp.get("token_logprobs"), list)
            or len(lp["token_logprobs"]) != len(tokens)):
        raise BridgeError(f"{where}: logprobs missing or not one per token: {str(lp)[:200]!r}")
    if k == 0:
        return [[_logprob(x, where)] for x in lp["token_logprobs"]], [[t] for t in tokens]
    steps = lp.get("top_logprobs") or [None] * len(tokens)
    if not isinstance(steps, list) or len(steps) != len(tokens):
        raise BridgeError(f"{where}: top_logprobs not one per token: {str(steps)[:200]!r}")
    logprobs, ids = [], []
    for step, tok in zip(steps, tokens, strict=True):
        if step is None:
            logprobs.append([None])
            ids.append([tok])
            continue
        if not isinstance(step, dict) or len(step) > k + 1:
            raise BridgeError(f"{where}: a step's top_logprobs is not a dict of at most logprobs + 1 = {k + 1} "
                              f"entries: {str(step)[:200]!r}")
        ranked = sorted(((_token_id(key, settings.vocab, where), _logprob(v, where)) for key, v in step.items()),
                        key=lambda kv: -kv[1])
        ids.append([t for t, _ in ranked])
        logprobs.append([v for _, v in ranked])
    return logprobs, ids


def parse_choices(resp: Any, prompts: list[list[int]], n: int, settings: CompletionSettings, version: int,
                  where: str) -> list[tuple[list[int], list[int], Any, Any]]:
    """(prompt ids, completion ids, logprobs, logprob token ids) per completion, prompt-major; ``BridgeError``
    for an answer that does not match the request or names another weight version than ``version``."""
    choices = resp.get("choices") if isinstance(resp, dict) else None
    if not isinstance(choices, list) or len(choices) != len(prompts) * n:
        got = len(choices) if isinstance(choices, list) else str(resp)[:200]
        raise BridgeError(f"{where}: expected {len(prompts) * n} choices ({len(prompts)} prompts x n={n}), got {got!r}")
    try:
        choices = sorted(choices, key=lambda c: int(c["index"]))
    except (TypeError, KeyError, ValueError):
        raise BridgeError(f"{where}: a choice without an integer index") from None
    out = []
    for i, c in enumerate(choices):
        tokens = c.get("token_ids")
        if c.get("index") != i or not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise BridgeError(f"{where}: choice {i} has no token_ids (the server ignored return_token_ids; vLLM "
                              f">= 0.25.1 honours it) or a wrong index: {str(c)[:200]!r}")
        _check_choice(c, tokens, prompts[i // n], settings, version, f"{where} choice {i}")
        prompt = list(prompts[i // n])
        if settings.logprobs is None:
            out.append((prompt, tokens, None, None))
        else:
            out.append((prompt, tokens, *_choice_logprobs(c, tokens, settings, f"{where} choice {i}")))
    return out


def _check_choice(c: dict[str, Any], tokens: list[int], prompt: list[int], settings: CompletionSettings,
                  version: int, where: str) -> None:
    """A choice answers its own prompt, with token ids of the model, no longer than asked, by ``version``."""
    _check_ids(tokens, settings.vocab, where, "token_ids")
    limit = settings.generation_kwargs.get("max_tokens", settings.max_tokens)
    if isinstance(limit, int) and len(tokens) > limit:
        raise BridgeError(f"{where}: {len(tokens)} tokens, more than max_tokens={limit}; the server is not vLLM")
    echoed = c.get("prompt_token_ids")
    if echoed is not None and echoed != list(prompt):
        raise BridgeError(f"{where}: prompt_token_ids {str(echoed)[:80]} are not the prompt sent "
                          f"({str(list(prompt))[:80]}); the answer belongs to another request")
    spans = [SimpleNamespace(**s) for s in c.get("weight_versions") or [] if isinstance(s, dict)]
    served = output_weight_version(SimpleNamespace(weight_versions=spans), version)
    if served != version:
        raise BridgeError(f"{where} was sampled with weight version {served}, not the trainer's "
                          f"{version}; train one policy per engine")


def generate(endpoint: HttpEndpoint, settings: CompletionSettings, prompts: list[list[int]], num_generations: int,
             version: int, timeout: float) -> tuple[list[Any], list[Any], Any, Any]:
    """TRL's ``VLLMGeneration.generate`` answer, (prompt_ids, completion_ids, logprobs, logprob_token_ids), for
    ``prompts`` (TRL's, each repeated ``num_generations`` times in a row), from ``vllm serve`` within
    ``timeout`` seconds. Note [TRL's generate over HTTP]."""
    if not prompts:
        return [], [], (None if settings.logprobs is None else []), (None if settings.logprobs is None else [])
    g = num_generations if in_runs(prompts, num_generations) else 1
    unique = [list(p) for p in prompts[::g]]
    size = settings.chunk_size(g, endpoint.max_body_bytes)
    chunks = [unique[i:i + size] for i in range(0, len(unique), size)]
    model, salt = endpoint.model_id(), endpoint.cache_salt()
    deadline = time.monotonic() + timeout

    def one(chunk: list[list[int]]) -> list[tuple[list[int], list[int], Any, Any]]:
        resp = endpoint.completions(settings.body(model, chunk, g, salt), max(0.001, deadline - time.monotonic()))
        return parse_choices(resp, chunk, g, settings, version, f"/v1/completions at {endpoint.url}")

    if len(chunks) == 1:
        rows = one(chunks[0])
    else:
        with ThreadPoolExecutor(min(len(chunks), MAX_IN_FLIGHT), thread_name_prefix="ipcbridge-completions") as pool:
            rows = [r for part in pool.map(one, chunks) for r in part]
    logger.debug("%d completions from %d request(s) to %s", len(rows), len(chunks), endpoint.url)
    prompt_ids, completion_ids, logprobs, token_ids = (list(x) for x in zip(*rows, strict=True))
    if settings.logprobs is None:
        return prompt_ids, completion_ids, None, None
    return prompt_ids, completion_ids, logprobs, token_ids


def served_logprobs_mode(endpoint: HttpEndpoint) -> str | None:
    """The server's ``--logprobs-mode`` from ``GET /server_info?config_format=json`` (a dev-mode route); ``None``
    where the server does not say (an older or trimmed route, or a config that does not serialise)."""
    try:
        info = endpoint.request("GET", "/server_info", query={"config_format": "json"})
        mode = info["vllm_config"]["model_config"]["logprobs_mode"]
    except (BridgeError, TypeError, KeyError) as e:
        logger.debug("%s: no logprobs_mode in /server_info (%s)", endpoint.where, e)
        return None
    return str(mode) if mode is not None else None

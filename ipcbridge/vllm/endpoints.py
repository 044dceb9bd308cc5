"""Endpoints for in-process vLLM engines: the offline ``vllm.LLM`` and ``AsyncLLM``.

Both reach the worker with ``collective_rpc`` (the model lives in the EngineCore child process under V1
multiprocessing, the default, so attaching is truly cross-process). Everything they share with the HTTP
endpoint is in :class:`~ipcbridge.vllm.base.VllmEndpoint`.

Note [the LLM fence]
    ``LLM.generate`` blocks its caller until every request is done, so in a single-threaded trainer nothing
    is generating while ``optimizer.step()`` runs: ``engine_pause`` has nothing to do, and the lease (kept
    in this process, one gate per ``LLM`` object) is the whole pause. Two bridges on one ``LLM`` share that
    gate, so their fences never interleave. ``engine_resume`` drops the prefix cache and publishes the next
    weight version in the worker; there is no generation to resume. Calling ``generate`` from another
    thread while updating is unsupported (nothing makes it wait): use ``AsyncLLM`` or ``vllm serve``, whose
    pause really waits. If the trainer dies mid-fence, the engine dies with it (same process).

Note [AsyncLLM from synchronous code]
    ``AsyncLLM``'s methods are coroutines bound to the event loop the engine runs in (its output handler
    task lives there). ``connect``/``bridge.update()`` are synchronous, so this endpoint submits each
    coroutine to that loop with ``run_coroutine_threadsafe`` and waits. It must therefore be called from
    another thread than the loop's: ``await asyncio.to_thread(ipcbridge.connect, engine)`` and
    ``await asyncio.to_thread(train_step)``. Called on the loop's own thread it would deadlock, so it raises
    (before taking any lease). A trainer thread that hangs inside the fence is resumed by the lease
    watchdog when its lease runs out.

Note [the AsyncLLM pause]
    The pause is mode ``"wait"``: in-flight requests finish on the old weights, so every output comes from
    one weight version. ``"keep"`` would freeze them mid-sequence and continue them on the new weights over
    KV computed with the old ones (a mixed output), and ``"abort"`` would throw away their work. What a
    client sees *during* the fence depends on the release: up to 0.32 a request that arrives is queued and
    runs after the resume; from 0.33 on ``"wait"`` (and ``"abort"``) *reject* it with a retryable
    ``RetryableRequestError`` (HTTP 503 under ``vllm serve``), only ``"keep"`` queues. ipcbridge keeps
    ``"wait"`` on 0.33 and documents the 503s (``docs/vllm.md``): exactness over queueing.

    ``clear_cache=False``: the fence invalidates KV itself, once, after the step (Note [stale KV: reset or
    salt] in :mod:`ipcbridge.vllm.base`), which also lets ``kv_reset="salted"`` skip the reset entirely.
    (0.31+ raises from a ``clear_cache`` pause whose reset fails; ours checks the reset's result instead.)

    ``AsyncLLM.pause_generation`` ends, in every release, with ``asyncio.sleep(0.02)`` so that final
    outputs of drained requests reach their callers first ("not required for correctness", says vLLM).
    The fence does not need that ordering (those tokens were computed with the old weights either way),
    so :func:`_pause_engine_core` awaits the engine core client's pause coroutine directly, the call that
    ``pause_generation`` itself makes (``pause_scheduler_async``; ``pause_generation_async`` from 0.33,
    which is the one that rejects new requests). Where neither exists, the public method is used.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from ipcbridge.endpoints import OnEventLoop, engine_loop
from ipcbridge.errors import BridgeError
from ipcbridge.fence import Lease
from ipcbridge.vllm.base import VllmEndpoint, check_kv_reset
from ipcbridge.vllm.extension import EXTENSION_QUALNAME, is_ipcbridge_extension
from ipcbridge.vllm.features import VllmFeatures, vllm_classes
from ipcbridge.vllm.policy import EngineFacts, refusal_reason

logger = logging.getLogger(__name__)


def _check_engine_config(vllm_config: Any, what: str, streaming: bool = False) -> None:
    """Refuse early, in the driver, what the worker would refuse (Note [what cannot be aliased]).

    ``streaming``: the endpoint is for ``ipcbridge.stream``, which copies into the engine's weights instead
    of aliasing them, so only the extension is required; the worker still refuses what streaming cannot
    feed (TP > 1) when asked for its stream layout."""
    ext = getattr(vllm_config.parallel_config, "worker_extension_cls", "") or ""
    if not is_ipcbridge_extension(ext):
        raise BridgeError(
            f"this {what} was started without ipcbridge's worker extension (worker_extension_cls={ext!r}); "
            f"start it with worker_extension_cls={EXTENSION_QUALNAME!r} so the worker can export its weights"
        )
    if streaming:
        return
    # The environment is the worker's own concern (it checks its PYTORCH_CUDA_ALLOC_CONF itself).
    reason = refusal_reason(EngineFacts.from_vllm_config(vllm_config, environ={}))
    if reason:
        raise BridgeError(reason)


def greedy_params(max_tokens: int, temperature: float = 0.0, seed: int | None = None) -> Any:
    """SamplingParams for token-id in/out generation with the sampled tokens' logprobs."""
    from vllm import SamplingParams

    # logprobs=0: only the sampled token's logprob, computed by vLLM from the raw logits (logprobs_mode
    # "raw_logprobs", the default), which is what the HF model's log_softmax is compared with.
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, ignore_eos=True,
                          detokenize=False, logprobs=0)


#: Per-prompt seeds of one ``generate`` call are ``seed * PROMPT_SEED_STRIDE + i`` (a prime > any batch).
PROMPT_SEED_STRIDE = 1_000_003


def prompt_seed(seed: int, i: int) -> int:
    return (seed * PROMPT_SEED_STRIDE + i) % (2**63)


def completion_logprobs(completion: Any) -> tuple[list[int], list[float]]:
    """(token ids, logprob of each) of one vLLM ``CompletionOutput``."""
    tokens = [int(t) for t in completion.token_ids]
    lps = completion.logprobs
    if lps is None:
        raise BridgeError("vLLM returned no logprobs; request them with SamplingParams(logprobs=0)")
    return tokens, [float(lps[i][t].logprob) for i, t in enumerate(tokens)]


def output_weight_version(completion: Any, fallback: int) -> int:
    """The weight version vLLM attached to ``completion`` (``weight_versions`` spans, 0.32+), else ``fallback``.

    ipcbridge publishes its version to vLLM as a decimal string, so a span holds it back; spans of more than
    one version mean the output mixes weights, which ipcbridge's fences exist to prevent.
    """
    spans = getattr(completion, "weight_versions", None)
    if not spans:
        return fallback
    versions = {str(getattr(span, "version", "")) for span in spans}
    if len(versions) != 1:
        raise BridgeError(f"one vLLM output was sampled under weight versions {sorted(versions)}; a fence let "
                          "generation run during an update")
    (v,) = versions
    return int(v) if v.isascii() and v.isdigit() else fallback  # "²".isdigit(), but int("²") fails


def salted_prompt(prompt: list[int], salt: str | None) -> dict[str, Any]:
    """A token-ids prompt for vLLM, with ``cache_salt`` (Note [stale KV: reset or salt])."""
    d: dict[str, Any] = {"prompt_token_ids": list(prompt)}
    if salt is not None:
        d["cache_salt"] = salt
    return d


def probe_features(engine: Any, vllm_config: Any, features: VllmFeatures | None) -> VllmFeatures:
    """``features`` if given (tests), else probed from ``engine`` and the installed vLLM's classes."""
    if features is not None:
        if not isinstance(features, VllmFeatures):
            raise BridgeError(f"features must be a VllmFeatures, got {type(features).__name__}")
        return features
    found = VllmFeatures.probe(engine, vllm_config, *vllm_classes())
    logger.debug("vLLM features: %s", found.describe())
    if found.pause_rejects_new:
        logger.info("this vLLM rejects new requests (retryable, HTTP 503) during each fence; see docs/vllm.md")
    return found


def _configure(endpoint: VllmEndpoint, engine: Any, vllm_config: Any, what: str, timeout: float | None,
               kv_reset: str, features: VllmFeatures | None, streaming: bool) -> None:
    """What both in-process endpoints set up alike: the engine's config checked (:func:`_check_engine_config`),
    ``kv_reset`` checked, features probed, the lease gate keyed by the engine object."""
    _check_engine_config(vllm_config, what, streaming)
    endpoint.kv_reset = check_kv_reset(kv_reset)
    endpoint.features = probe_features(engine, vllm_config, features)
    endpoint.gate_key = engine
    endpoint.timeout = timeout
    endpoint.weight_version = 0


class LLMEndpoint(VllmEndpoint):
    """The control channel of an offline ``vllm.LLM``. See Note [the LLM fence]."""

    name = "vllm-llm"
    counts_version_here = True  # Note [an in-process engine's version is counted here]

    def __init__(self, llm: Any, timeout: float | None = 300.0, *, kv_reset: str = "always",
                 features: VllmFeatures | None = None, streaming: bool = False) -> None:
        _configure(self, llm, llm.llm_engine.vllm_config, "vllm.LLM", timeout, kv_reset, features, streaming)
        self.llm = llm

    def collective_rpc(self, method: str, *args: Any) -> Any:
        try:
            return self.llm.collective_rpc(method, timeout=self.timeout, args=args)
        except Exception as e:
            raise BridgeError(
                f"collective_rpc({method!r}) failed in the vLLM engine: {e}. Is the engine alive and started "
                f"with worker_extension_cls={EXTENSION_QUALNAME!r}?"
            ) from e

    def engine_pause(self) -> None:
        pass  # Note [the LLM fence]: LLM.generate is blocking, nothing is in flight.

    def reset_prefix_cache(self) -> bool | None:
        return self.llm.reset_prefix_cache()

    def set_engine_weight_version(self, version: str) -> None:
        self.llm.update_weight_version(version)

    def resume_generation(self) -> None:
        pass  # nothing was paused in the engine

    def generate_versioned(self, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0,
                           seed: int | None = None) -> list[tuple[list[int], list[float], int]]:
        """Generate from token ids; one (tokens, logprobs, weight version) per prompt.

        Each prompt carries :meth:`cache_salt` (Note [stale KV: reset or salt]). vLLM seeds each request:
        prompt ``i`` gets ``seed * PROMPT_SEED_STRIDE + i``, so repeated prompts in a call still differ and calls
        with consecutive seeds (one per training step) never share a seed. The version is vLLM's own
        (``weight_versions``, 0.32+) where outputs carry it, else the one this endpoint last published.
        """
        params = [greedy_params(max_tokens, temperature, None if seed is None else prompt_seed(seed, i))
                  for i in range(len(prompts))]
        salt = self.cache_salt() if self.features.cache_salt else None
        outs = self.llm.generate([salted_prompt(p, salt) for p in prompts], params, use_tqdm=False)
        results = []
        for o in outs:
            tokens, lps = completion_logprobs(o.outputs[0])
            results.append((tokens, lps, output_weight_version(o.outputs[0], self.weight_version)))
        return results

    def generate(self, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0,
                 seed: int | None = None) -> list[tuple[list[int], list[float]]]:
        """Generate from token ids; one (tokens, logprobs) per prompt (see :meth:`generate_versioned`)."""
        return [(t, lp) for t, lp, _ in self.generate_versioned(prompts, max_tokens, temperature, seed)]

    def sample(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        return self.generate([prompt], max_tokens)[0]


class AsyncLLMEndpoint(OnEventLoop, VllmEndpoint):
    """The control channel of an in-process ``AsyncLLM``. See Note [AsyncLLM from synchronous code]."""

    name = "vllm-async-llm"
    where = "the AsyncLLM worker"
    counts_version_here = True

    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop | None = None,
                 timeout: float | None = 600.0, *, kv_reset: str = "always",
                 features: VllmFeatures | None = None, streaming: bool = False) -> None:
        _configure(self, engine, engine.vllm_config, "AsyncLLM", timeout, kv_reset, features, streaming)
        self.engine = engine
        self.loop = engine_loop(engine, loop)

    def collective_rpc(self, method: str, *args: Any) -> Any:
        try:
            return self._run(self.engine.collective_rpc(method, timeout=self.timeout, args=args))
        except BridgeError:
            raise
        except Exception as e:
            raise BridgeError(f"collective_rpc({method!r}) failed in the AsyncLLM engine: {e}") from e

    def pause(self, lease: Lease, wait: float) -> None:
        self._check_thread()  # refuse on the loop's thread before taking the lease
        super().pause(lease, wait)

    def engine_pause(self) -> None:
        self._run(_pause_engine_core(self.engine, self.features))

    def reset_prefix_cache(self) -> bool | None:
        return self._run(self.engine.reset_prefix_cache())

    def set_engine_weight_version(self, version: str) -> None:
        self._run(self.engine.update_weight_version(version))

    def resume_generation(self) -> None:
        self._run(self.engine.resume_generation())

    async def _generate(self, prompt: list[int], params: Any) -> tuple[list[int], list[float]]:
        final = None
        salt = self.cache_salt() if self.features.cache_salt else None
        async for out in self.engine.generate(salted_prompt(prompt, salt), params,
                                              request_id=f"ipcbridge-{uuid.uuid4().hex}"):
            final = out
        if final is None:
            raise BridgeError("AsyncLLM.generate returned no output")
        return completion_logprobs(final.outputs[0])

    def sample(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        return self._run(self._generate(prompt, greedy_params(max_tokens)))


async def _pause_engine_core(engine: Any, features: VllmFeatures) -> None:
    """``AsyncLLM.pause_generation(mode="wait", clear_cache=False)`` without its 20 ms settle sleep.
    Note [the AsyncLLM pause]: the engine core client's pause coroutine is private API, named by
    ``features.core_pause``; the public method is the fallback."""
    if features.core_pause:
        await getattr(engine.engine_core, features.core_pause)(mode="wait", clear_cache=False)
    else:
        await engine.pause_generation(mode="wait", clear_cache=False)


def endpoint_for(target: Any, **options: Any) -> LLMEndpoint | AsyncLLMEndpoint:
    """The endpoint for a ``vllm.LLM`` or ``AsyncLLM`` (``ipcbridge.connect`` calls this); ``options`` (e.g.
    ``kv_reset="salted"``, or ``streaming=True`` for ``ipcbridge.stream``, which skips the aliasing-only
    refusals) go to the endpoint's constructor."""
    from vllm import LLM
    from vllm.v1.engine.async_llm import AsyncLLM

    if isinstance(target, LLM):
        return LLMEndpoint(target, **options)
    if isinstance(target, AsyncLLM):
        return AsyncLLMEndpoint(target, **options)
    raise TypeError(
        f"ipcbridge cannot connect to a {type(target).__module__}.{type(target).__name__}; pass a vllm.LLM, "
        "an AsyncLLM, or the http://host:port of `vllm serve`"
    )

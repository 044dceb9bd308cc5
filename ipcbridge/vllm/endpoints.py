"""Endpoints for in-process vLLM engines: the offline ``vllm.LLM`` and ``AsyncLLM``.

Both reach the worker with ``collective_rpc`` (the model lives in the EngineCore child process under V1
multiprocessing, the default, so attaching is truly cross-process).

Note [the LLM fence]
    ``LLM.generate`` blocks its caller until every request is done, so in a single-threaded trainer nothing
    is generating while ``optimizer.step()`` runs: ``pause`` has nothing to wait for. ``resume`` drops the
    prefix cache (KV blocks computed with the old weights must not be reused by the next prompt with the
    same prefix) and records the weight version in the worker. Calling ``generate`` from another thread
    while updating is unsupported: use ``AsyncLLM`` or ``vllm serve``, whose pause really waits.

Note [AsyncLLM from synchronous code]
    ``AsyncLLM``'s methods are coroutines bound to the event loop the engine runs in (its output handler
    task lives there). ``connect``/``bridge.update()`` are synchronous, so this endpoint submits each
    coroutine to that loop with ``run_coroutine_threadsafe`` and waits. It must therefore be called from
    another thread than the loop's: ``await asyncio.to_thread(ipcbridge.connect, engine)`` and
    ``await asyncio.to_thread(train_step)``. Called on the loop's own thread it would deadlock, so it raises.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import uuid
from collections.abc import Coroutine
from typing import Any

from ipcbridge.errors import BridgeError
from ipcbridge.manifest import Manifest
from ipcbridge.vllm.extension import EXTENSION_QUALNAME, EngineFacts, Reply, refusal_reason

logger = logging.getLogger(__name__)


def _check_engine_config(vllm_config: Any, what: str) -> None:
    """Refuse early, in the driver, what the worker would refuse (Note [what cannot be aliased])."""
    ext = getattr(vllm_config.parallel_config, "worker_extension_cls", "") or ""
    if ext != EXTENSION_QUALNAME:
        raise BridgeError(
            f"this {what} was started without ipcbridge's worker extension (worker_extension_cls={ext!r}); "
            f"start it with worker_extension_cls={EXTENSION_QUALNAME!r} so the worker can export its weights"
        )
    # The environment is the worker's own concern (it checks its PYTORCH_CUDA_ALLOC_CONF itself).
    reason = refusal_reason(EngineFacts.from_vllm_config(vllm_config, environ={}))
    if reason:
        raise BridgeError(reason)


def _single(results: Any, method: str) -> Reply:
    if not isinstance(results, list) or len(results) != 1:
        n = len(results) if isinstance(results, list) else results
        raise BridgeError(
            f"collective_rpc({method!r}) answered from {n} workers; ipcbridge attaches to one worker "
            "(tensor_parallel_size=1, pipeline_parallel_size=1)"
        )
    return Reply.from_json(results[0])


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


class _WorkerCalls:
    """What both in-process endpoints ask the worker's :class:`WorkerExtension`, through their ``rpc``."""

    weight_version: int

    def rpc(self, method: str, *args: Any) -> Any:
        raise NotImplementedError

    def manifest(self) -> Manifest:
        m = Manifest.from_dict(self.rpc("ipcbridge_manifest"))
        self.weight_version = m.weight_version
        return m

    def engine_weight_version(self) -> int:
        """The weight version the worker holds (asks the worker)."""
        return int(self.rpc("ipcbridge_weight_version"))


class LLMEndpoint(_WorkerCalls):
    """The control channel of an offline ``vllm.LLM``. See Note [the LLM fence]."""

    name = "vllm-llm"

    def __init__(self, llm: Any, timeout: float | None = 300.0) -> None:
        _check_engine_config(llm.llm_engine.vllm_config, "vllm.LLM")
        self.llm = llm
        self.timeout = timeout
        #: The version last published to the worker (mirrors the worker's counter).
        self.weight_version = 0

    def rpc(self, method: str, *args: Any) -> Any:
        try:
            results = self.llm.collective_rpc(method, timeout=self.timeout, args=args)
        except Exception as e:
            raise BridgeError(
                f"collective_rpc({method!r}) failed in the vLLM engine: {e}. Is the engine alive and started "
                f"with worker_extension_cls={EXTENSION_QUALNAME!r}?"
            ) from e
        return _single(results, method).unwrap()

    def pause(self) -> None:
        pass  # Note [the LLM fence]: LLM.generate is blocking, nothing is in flight.

    def resume(self, weight_version: int) -> None:
        self.llm.reset_prefix_cache()
        self.weight_version = self.rpc("ipcbridge_set_weight_version", int(weight_version))

    def info(self) -> dict[str, Any]:
        return self.rpc("ipcbridge_info")

    def generate(self, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0,
                 seed: int | None = None) -> list[tuple[list[int], list[float]]]:
        """Generate from token ids; one (tokens, logprobs) per prompt.

        vLLM seeds each request: prompt ``i`` gets ``seed * PROMPT_SEED_STRIDE + i``, so repeated prompts in a
        call still differ and calls with consecutive seeds (one per training step) never share a seed.
        """
        params = [greedy_params(max_tokens, temperature, None if seed is None else prompt_seed(seed, i))
                  for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return [completion_logprobs(o.outputs[0]) for o in outs]

    def sample(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        return self.generate([prompt], max_tokens)[0]

    def close(self) -> None:
        pass


class AsyncLLMEndpoint(_WorkerCalls):
    """The control channel of an in-process ``AsyncLLM``. See Note [AsyncLLM from synchronous code].

    The fence: ``pause_generation(mode="wait")`` lets in-flight requests finish on the old weights and holds
    new ones; ``resume`` resets the prefix cache, records the version in the worker and resumes.
    """

    name = "vllm-async-llm"

    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop | None = None,
                 timeout: float | None = 600.0) -> None:
        _check_engine_config(engine.vllm_config, "AsyncLLM")
        self.engine = engine
        self.timeout = timeout
        self.weight_version = 0
        if loop is None:
            handler = getattr(engine, "output_handler", None)
            if handler is not None:
                loop = handler.get_loop()
            else:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    loop = None
        if loop is None:
            raise BridgeError(
                "this AsyncLLM is not bound to an event loop yet; create it inside a running loop "
                "(asyncio.run(main())) and call `await asyncio.to_thread(ipcbridge.connect, engine)`, or pass "
                "loop= to AsyncLLMEndpoint"
            )
        self.loop = loop

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            coro.close()
            raise BridgeError(
                "ipcbridge's AsyncLLM endpoint was called on the engine's own event-loop thread, where waiting "
                "would deadlock; call it from a worker thread: `await asyncio.to_thread(ipcbridge.connect, "
                "engine)` and `await asyncio.to_thread(train_step)`"
            )
        if self.loop.is_closed() or not self.loop.is_running():
            coro.close()
            raise BridgeError("the AsyncLLM's event loop is not running; the engine has stopped")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(self.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise BridgeError(f"AsyncLLM did not answer within {self.timeout}s") from None

    def rpc(self, method: str, *args: Any) -> Any:
        try:
            results = self._run(self.engine.collective_rpc(method, timeout=self.timeout, args=args))
        except BridgeError:
            raise
        except Exception as e:
            raise BridgeError(f"collective_rpc({method!r}) failed in the AsyncLLM engine: {e}") from e
        return _single(results, method).unwrap()

    def pause(self) -> None:
        self._run(self.engine.pause_generation(mode="wait"))

    def resume(self, weight_version: int) -> None:
        try:
            self._run(self.engine.reset_prefix_cache())
            self.weight_version = self.rpc("ipcbridge_set_weight_version", int(weight_version))
        finally:
            # Never leave the engine paused, even if the bookkeeping failed.
            self._run(self.engine.resume_generation())

    async def _generate(self, prompt: list[int], params: Any) -> tuple[list[int], list[float]]:
        final = None
        async for out in self.engine.generate({"prompt_token_ids": list(prompt)}, params,
                                              request_id=f"ipcbridge-{uuid.uuid4().hex}"):
            final = out
        if final is None:
            raise BridgeError("AsyncLLM.generate returned no output")
        return completion_logprobs(final.outputs[0])

    def sample(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        return self._run(self._generate(prompt, greedy_params(max_tokens)))

    def close(self) -> None:
        pass


def endpoint_for(target: Any) -> LLMEndpoint | AsyncLLMEndpoint:
    """The endpoint for a ``vllm.LLM`` or ``AsyncLLM`` (``ipcbridge.connect`` calls this)."""
    from vllm import LLM
    from vllm.v1.engine.async_llm import AsyncLLM

    if isinstance(target, LLM):
        return LLMEndpoint(target)
    if isinstance(target, AsyncLLM):
        return AsyncLLMEndpoint(target)
    raise TypeError(
        f"ipcbridge cannot connect to a {type(target).__module__}.{type(target).__name__}; pass a vllm.LLM, "
        "an AsyncLLM, or the http://host:port of `vllm serve`"
    )


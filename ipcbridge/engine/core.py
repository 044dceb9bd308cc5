"""The embedded engine's state: an HF model's weights in vLLM's layout, generation, and the pause gate.

It keeps the weights the way vLLM does (fused ``qkv_proj``/``gate_up_proj``, padded vocab, built by
``mapping.to_vllm``), runs its own HF model as zero-copy views over them (``attach`` in-process),
generates with a KV cache and a prefix cache, exports the same manifest a vLLM worker would, and obeys
pause/resume so a trainer can fence its updates. The process around it, and its control socket, are in
:mod:`ipcbridge.engine.server`.

Note [pause gate]
    The engine's pause is a lease (:class:`ipcbridge.fence.LeaseGate`; Note [owned, leased pauses]):
    ``pause`` grants it to one trainer at a time, closes the gate and waits until no generation is in
    flight; requests that arrive meanwhile wait at the gate, or fail with the holder's name. Only the
    lease's id resumes it, and so does the watchdog when the lease runs out. Resuming first drops the prefix
    cache (its KV was computed with the old weights), then moves the version forward (the engine owns
    it) and opens the gate. So every generation runs entirely on one weight version, the one it reports.
    No generation holds the gate or the forward lock past its own deadline (Note [bounded requests] in
    :mod:`ipcbridge.engine.inputs`), so neither can a pause's wait for in-flight work.

Note [n rows, one prefill]
    A request for ``n`` completions of one prompt prefills it once (or takes it from the prefix cache) and
    decodes the ``n`` rows as one batch: the rows have one length, so no padding or attention mask enters
    and each row computes what a single request would. ``n=1`` is exactly the single-row decode. Rows that
    stopped keep riding along until the last one stops (their tokens are no longer recorded). Prompts of
    one request run one after another; batching prompts of different lengths would need padding, which
    changes the numerics the logprobs promise.

Where the trainer cannot map these weights, it streams its own into them: the engine's side of that is
:class:`ipcbridge.stream.receiver.StreamReceiver` (Note [streamed weights] there).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch

from ipcbridge.engine.inputs import DEFAULT_DEADLINE_SECONDS, Budget, Limits, Sampling
from ipcbridge.engine.sampling import eos_token_ids, sample_tokens
from ipcbridge.errors import EngineError
from ipcbridge.fence import Lease, LeaseGate
from ipcbridge.hf import load_hf_state_dict
from ipcbridge.logprobs import sequence_logprobs
from ipcbridge.stream.receiver import StreamReceiver

logger = logging.getLogger(__name__)

#: Prompts whose KV the engine keeps; a few dozen cover a trainer's repeated prompts.
PREFIX_CACHE_SIZE = 64


class Engine:
    """The engine's state. Owns the vLLM-layout tensors; its HF model and every consumer only view them."""

    def __init__(self, source: dict[str, Any], device: str, dtype: torch.dtype) -> None:
        import ipcbridge
        from ipcbridge.mapping import to_vllm

        config, hf_state = load_hf_state_dict(source)
        # Own, contiguous storage per vLLM tensor (to_vllm may alias an HF tensor for unfused ones).
        self.weights = {
            n: t.to(device=device, dtype=dtype, copy=True).contiguous() for n, t in to_vllm(hf_state, config).items()
        }
        del hf_state
        self.config = config
        # Export first: on CPU this moves the storages into shared memory in place (see transports.shm),
        # and the views below must be taken of the final memory.
        self.export_manifest = ipcbridge.export(self.weights, config, layout="vllm")
        self.model = ipcbridge.attach(self.weights, config)
        self.model.requires_grad_(False)
        self.limits = Limits.of_config(self.model.config)
        #: What ``ignore_eos=False`` stops at: the generation config's EOS ids (Note [sampling like vLLM]).
        self.eos_token_ids = eos_token_ids(config, source)
        self.device = torch.device(device)
        self.version = 0
        self.gate = LeaseGate(self._publish, name=f"the embedded engine (pid {os.getpid()})")
        self.lock = threading.Lock()  # one forward pass at a time
        self.prefix_cache: OrderedDict[tuple[int, ...], tuple[Any, torch.Tensor]] = OrderedDict()
        self.stats = {"requests": 0, "prefix_hits": 0, "prefix_drops": 0, "pauses": 0, "stream_receives": 0,
                      "stream_bytes": 0}
        self.receiver = StreamReceiver(self.weights, self.device, self.stats)

    def ping(self) -> dict[str, Any]:
        """Who and where the engine is, and the limits a request must fit (the client checks them first)."""
        return {"pid": os.getpid(), "version": self.version, "paused": self.gate.paused, "holder": self.gate.holder,
                **self.limits.to_dict()}

    # -- generation ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _forward(self, budget: Budget, what: str) -> Iterator[None]:
        """Hold the forward lock, waiting for it no longer than ``budget`` allows."""
        if not self.lock.acquire(timeout=budget.remaining()):
            raise EngineError(
                f"{what}: another request held the engine for the whole {budget.seconds:.1f}s deadline of this "
                "one; retry, or raise the request timeout"
            )
        try:
            yield
        finally:
            self.lock.release()

    def _prefill(self, prompt: list[int]) -> tuple[Any, torch.Tensor]:
        key = tuple(prompt)
        hit = self.prefix_cache.get(key)
        if hit is not None:
            self.prefix_cache.move_to_end(key)
            self.stats["prefix_hits"] += 1
            return copy.deepcopy(hit[0]), hit[1]
        out = self.model(torch.tensor([prompt], device=self.device), use_cache=True)
        logits = out.logits[0, -1]
        self.prefix_cache[key] = (copy.deepcopy(out.past_key_values), logits)
        if len(self.prefix_cache) > PREFIX_CACHE_SIZE:
            self.prefix_cache.popitem(last=False)
        return out.past_key_values, logits

    @torch.inference_mode()
    def generate_one(self, prompt: list[int], max_tokens: int, temperature: float, sampling: Sampling,
                     generator: torch.Generator | None, budget: Budget) -> list[dict[str, Any]]:
        """``sampling.n`` completions of ``prompt``, decoded as one batch over one prefill (Note [n rows, one
        prefill]). Each row stops at its own stop token; the batch stops when every row has."""
        budget.check("generate")
        cache, logits = self._prefill(prompt)
        n = sampling.n
        if n > 1:
            cache.batch_repeat_interleave(n)
        logits = logits.unsqueeze(0).expand(n, -1)
        stops = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(self.eos_token_ids))
        rows: list[dict[str, Any]] = [{"token_ids": [], "logprobs": [], "weight_version": self.version,
                                       "finish_reason": "length"} for _ in range(n)]
        live = list(range(n))
        for i in range(max_tokens):
            toks, lps = sample_tokens(logits, temperature, sampling, generator)
            for r in list(live):
                rows[r]["token_ids"].append(int(toks[r]))
                rows[r]["logprobs"].append(float(lps[r]))
                if int(toks[r]) in stops:
                    rows[r]["finish_reason"] = "stop"
                    live.remove(r)
            if not live or i + 1 == max_tokens:
                break
            budget.check("generate")  # between decode steps: Note [bounded requests]
            out = self.model(toks[:, None].to(self.device), past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1]
        return rows

    def generate(self, prompts: list[list[int]], max_tokens: int, temperature: float, seed: int | None,
                 wait: float, caller: str = "", budget: Budget | None = None,
                 sampling: Sampling | None = None) -> list[dict[str, Any]]:
        """``sampling.n`` completions per prompt, prompt-major (vLLM's order for ``n``), all on one version."""
        budget = budget or Budget.start(DEFAULT_DEADLINE_SECONDS)
        sampling = sampling or Sampling()
        self.limits.check_generate(prompts, max_tokens, temperature, seed, sampling)
        generator = None
        if temperature > 0:
            generator = torch.Generator().manual_seed(seed if seed is not None else self.stats["requests"])
        with self.gate.enter(caller, min(wait, budget.remaining())), self._forward(budget, "generate"):
            self.stats["requests"] += 1
            return [row for p in prompts for row in self.generate_one(p, max_tokens, temperature, sampling,
                                                                       generator, budget)]

    def score(self, prompt: list[int], completion: list[int], wait: float, caller: str = "",
              budget: Budget | None = None) -> list[float]:
        """Logprobs of ``completion`` after ``prompt`` from one full forward pass (no caches)."""
        budget = budget or Budget.start(DEFAULT_DEADLINE_SECONDS)
        self.limits.check_score(prompt, completion)
        with self.gate.enter(caller, min(wait, budget.remaining())), self._forward(budget, "score"):
            budget.check("score")
            return sequence_logprobs(self.model, prompt, completion)

    # -- weight updates ------------------------------------------------------------------------------

    def pause(self, lease: Lease, wait: float, drain: float) -> None:
        self.gate.acquire(lease, wait, drain)
        self.stats["pauses"] += 1

    def _publish(self, reason: str) -> int:
        """Step 4 of Note [the fence], called by the gate with its lock held: no generation runs."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats["prefix_drops"] += len(self.prefix_cache)
        self.prefix_cache.clear()
        self.version += 1
        logger.info("weight version %d (%s)", self.version, reason)
        return self.version

    def manifest(self) -> dict[str, Any]:
        return self.export_manifest.replace(weight_version=self.version).to_dict()

    # -- streamed weights (Note [streamed weights] in ipcbridge.stream.receiver) -----------------------

    def stream_init(self, stream_id: str, host: str, port: int, backend: str, timeout: float,
                    plan: dict[str, Any]) -> None:
        self.receiver.init(stream_id, host, port, backend, timeout, plan)

    def stream_receive(self, stream_id: str) -> dict[str, Any]:
        return self.receiver.receive(stream_id, paused=self.gate.paused, lock=self.lock)

    def stream_close(self, stream_id: str | None = None, wait: float = -1) -> None:
        self.receiver.close(stream_id, wait)

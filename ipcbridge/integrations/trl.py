"""TRL's ``GRPOTrainer`` on ipcbridge: the policy trains the very weights the engine serves; no weight sync.

    bridge = ipcbridge.connect(engine)          # a LocalEngine, a vllm.LLM (in this process or not)
    trainer = GRPOTrainer(bridge, reward_funcs=reward, args=GRPOConfig(use_vllm=True, ...),
                          train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

Everything else is TRL's own: its generation path (sampling parameters, the engine's logprobs, the
importance-sampling correction), its loss, its logging. Supported: TRL 1.16 (:data:`SUPPORTED_TRL`); what
this module relies on is probed by :func:`check_trl`, by attribute, not by version string.

Note [one generation class, swapped for one constructor call]
    ``GRPOTrainer.__init__`` builds its generation backend as ``VLLMGeneration(model=..., mode=...,
    temperature=..., ...)`` through the name ``VLLMGeneration`` of its own module, with no factory hook,
    and in colocate mode that class starts a second ``vllm.LLM`` loading a copy of the weights. This
    trainer rebinds that one name to :class:`BridgeGeneration` for the duration of ``super().__init__``
    (under a lock, restored in a ``finally``), so TRL's own constructor runs unchanged and hands our class
    exactly the sampling settings it would give vLLM. The alternatives were worse: constructing with
    ``use_vllm=False`` and flipping attributes afterwards depends on every attribute TRL derives from
    ``use_vllm`` at init; replacing ``_generate_single_turn`` copies TRL's longest method. The swap depends
    on one module-level name and three methods, all probed by :func:`check_trl`.

Note [sync_weights is a check]
    TRL calls ``sync_weights()`` before generating whenever the optimizer step moved. Here the trainer's
    parameters *are* the engine's weights and ``BridgeCallback`` fences every step (the engine drops its
    prefix cache and publishes a new weight version), so there is nothing to copy. What is left to check,
    in microseconds to a millisecond: every parameter still aliases the engine's memory (a cast or resize
    would silently train a copy); nothing was written outside a fence (if so, publish it now); and the
    engine serves the version the trainer last published (another writer would make the completions
    off-policy without TRL knowing). The embedded engine also stamps every completion with its version,
    and :meth:`BridgeGeneration.generate` checks those too, as it does vLLM's (0.32+ in-process, 0.33+ over
    HTTP).

Note [three engines, one generation class]
    What ``ipcbridge.connect`` reached decides how :class:`BridgeGeneration` generates, with TRL's settings:

    * a ``vllm.LLM``, whether its worker runs in this process (TRL's colocate shape,
      ``distributed_executor_backend="external_launcher"``) or in vLLM's EngineCore child (the default V1
      multiprocessing, attached through the worker extension and CUDA IPC): TRL's own colocate path,
      ``self.llm.generate(prompts, SamplingParams(...))``, on that ``LLM``. ``LLM.generate`` hands the
      request to the EngineCore wherever it runs, so both shapes are one path; only the fence differs (a
      direct call in-process, ``collective_rpc`` to the extension otherwise). ``self.llm`` is the ``LLM``
      behind :class:`_VersionedLLM`, which salts TRL's prompts under ``kv_reset="salted"``.
    * ``vllm serve`` by URL: ``POST /v1/completions`` from token ids (:mod:`ipcbridge.integrations.trl_serve`,
      Note [TRL's generate over HTTP]). TRL's server mode (``trl vllm-serve``, TRL's own server with its
      NCCL weight transfer) is not this: its weights are a copy by design.
    * the embedded ``LocalEngine``: the same settings to ``LocalEngine.generate``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import trl
from trl.generation.vllm_generation import VLLMGeneration
from trl.trainer import grpo_trainer as _grpo_module

from ipcbridge.bridge import Bridge
from ipcbridge.errors import BridgeError
from ipcbridge.integrations import refuse_second_engine, trl_serve
from ipcbridge.integrations.hf_trainer import BridgeCallback
from ipcbridge.integrations.trl_serve import in_runs as _in_runs
from ipcbridge.vllm.endpoints import output_weight_version
from ipcbridge.vllm.http import HttpEndpoint

logger = logging.getLogger(__name__)

#: The TRL releases this module is tested with. Others work if :func:`check_trl` passes.
SUPPORTED_TRL = ">=1.16,<1.17"
#: What :func:`check_trl` probes: Note [one generation class, swapped for one constructor call].
_GENERATION_METHODS = ("_init_vllm", "sync_weights", "generate")
#: Engine sampling settings the embedded engine implements; TRL's others must keep their neutral value.
_NEUTRAL = {"min_p": (0.0, None), "repetition_penalty": (1.0, None)}
#: ``GRPOConfig.generation_kwargs`` keys the embedded engine understands (vLLM's ``SamplingParams`` names).
_LOCAL_GENERATION_KWARGS = ("seed", "stop_token_ids", "ignore_eos")

_SWAP_LOCK = threading.Lock()

__all__ = [
    "SUPPORTED_TRL",
    "BridgeGeneration",
    "GRPOTrainer",
    "check_served",
    "check_trl",
    "colocated_llm",
    "refuse_second_engine",
    "served_version",
]


def check_trl() -> None:
    """``BridgeError`` naming the TRL version and :data:`SUPPORTED_TRL` unless TRL has what this module swaps."""
    missing = [] if isinstance(getattr(_grpo_module, "VLLMGeneration", None), type) else [
        "trl.trainer.grpo_trainer.VLLMGeneration"]
    missing += [f"VLLMGeneration.{m}" for m in _GENERATION_METHODS if not callable(getattr(VLLMGeneration, m, None))]
    if missing:
        raise BridgeError(
            f"TRL {trl.__version__} lacks {missing}, which ipcbridge's GRPOTrainer relies on; install a TRL it "
            f"supports: pip install 'trl{SUPPORTED_TRL}'"
        )


# ---- the engine behind the bridge ---------------------------------------------------------------------


def _engine_of(bridge: Bridge) -> tuple[str, Any]:
    """("local", LocalEngine), ("vllm", vllm.LLM) or ("http", HttpEndpoint): who generates for TRL (Note
    [three engines, one generation class]). ``BridgeError`` otherwise."""
    endpoint = bridge.endpoint
    if isinstance(endpoint, HttpEndpoint):
        return "http", endpoint
    llm = getattr(endpoint, "llm", None)
    if llm is not None:
        return "vllm", llm
    engine = getattr(endpoint, "engine", None)
    if engine is not None and callable(getattr(engine, "generate", None)) and endpoint.name == "local-engine":
        return "local", engine
    raise BridgeError(
        f"ipcbridge's GRPOTrainer generates through the bridge's engine, and cannot generate with a "
        f"{endpoint.name!r} endpoint; connect to a LocalEngine, a vllm.LLM (in this process, TRL's colocate "
        "shape, or its own engine process) or a vllm serve URL"
    )


def served_version(bridge: Bridge) -> int:
    """The weight version the bridge's engine serves now (asks the engine: one RPC, or an attribute read)."""
    endpoint = bridge.endpoint
    ask = getattr(endpoint, "engine_weight_version", None)
    if callable(ask):
        return int(ask())
    engine = getattr(endpoint, "engine", None)
    if engine is not None and hasattr(engine, "weight_version"):
        return int(engine.weight_version)
    raise BridgeError(f"the {endpoint.name!r} endpoint cannot report the engine's weight version")


def check_served(bridge: Bridge, aliasing: bool = True) -> None:
    """Note [sync_weights is a check]: aliasing (``aliasing=False`` skips this part, which walks every
    parameter against every storage of the engine), unfenced writes published, the engine on our version."""
    outside = bridge.parameters_outside_engine() if aliasing else []
    if outside:
        raise BridgeError(
            f"{outside[:4]} no longer alias the engine's memory (cast, resized or moved), so TRL would train a copy "
            "the engine never serves; keep the model on the engine's device and dtype (GRPOConfig(bf16=...) "
            "autocasts, it does not cast) and reconnect"
        )
    if bridge.unfenced_writes():
        with bridge.update():  # update() logs which; the engine drops its stale KV and moves its version
            pass
    served = served_version(bridge)
    if served != bridge.weight_version:
        raise BridgeError(
            f"the engine serves weight version {served}, but this trainer last published {bridge.weight_version}: "
            "something else wrote the weights (another bridge or trainer on this engine?), so TRL's completions "
            "would be off-policy; train one policy per engine"
        )


# ---- TRL's generation class, on the bridge ------------------------------------------------------------


class BridgeGeneration(VLLMGeneration):
    """TRL's ``VLLMGeneration`` whose engine is the bridge's: no engine of its own, no weight copy.

    TRL constructs it (Note [one generation class, swapped for one constructor call]) with its usual
    arguments, and generates where the bridge connected (Note [three engines, one generation class]).
    ``sync_weights`` is a check (Note [sync_weights is a check]); ``sync_seconds`` records how long each took.
    """

    def __init__(self, bridge: Bridge, *args: Any, **kwargs: Any) -> None:
        self.bridge = bridge
        self.kind, self.engine = _engine_of(bridge)
        self.sync_seconds: list[float] = []
        super().__init__(*args, **kwargs)

    def _init_vllm(self) -> None:
        if self.accelerator.num_processes != 1:
            raise BridgeError(
                f"ipcbridge's GRPOTrainer runs in one process ({self.accelerator.num_processes} were started): every "
                "rank would write the same engine's weights; run it without accelerate launch / torchrun"
            )
        if self.tensor_parallel_size != 1 or self.enable_sleep_mode:
            raise BridgeError(
                "GRPOConfig(vllm_tensor_parallel_size > 1 or vllm_enable_sleep_mode=True): the bridge's engine is "
                "already running on one GPU and sleep mode would free the weights the trainer aliases; unset both"
            )
        self.llm = None
        if self.kind == "local":
            self._check_local_settings()
        elif self.kind == "http":
            self.completion_settings = trl_serve.CompletionSettings(
                self.max_completion_length, self.temperature, self.top_p, self.top_k, self.min_p,
                self.repetition_penalty, self.logprobs, self.structured_outputs_regex, dict(self.generation_kwargs),
                vocab=getattr(getattr(self.bridge.model, "config", None), "vocab_size", None))
            _warn_logprobs_mode(trl_serve.served_logprobs_mode(self.engine), "vllm serve --logprobs-mode "
                                "processed_logprobs")
        else:
            mode = getattr(self.engine.llm_engine.vllm_config.model_config, "logprobs_mode", None)
            _warn_logprobs_mode(None if mode is None else str(getattr(mode, "value", mode)),
                                "logprobs_mode='processed_logprobs' (colocated_llm does)")
            endpoint = self.bridge.endpoint
            salted = getattr(endpoint, "kv_reset", "always") == "salted"
            self.llm = _VersionedLLM(self.engine, endpoint if salted else None, self.bridge)
        self.accelerator.wait_for_everyone()

    def _check_local_settings(self) -> None:
        for name, neutral in _NEUTRAL.items():
            if getattr(self, name) not in neutral:
                raise BridgeError(f"the embedded engine has no {name}; set GRPOConfig({name}={neutral[0]}) or use vLLM")
        unknown = sorted(set(self.generation_kwargs) - set(_LOCAL_GENERATION_KWARGS))
        if unknown:
            raise BridgeError(f"GRPOConfig(generation_kwargs) {unknown} are not understood by the embedded engine; "
                              f"it takes {list(_LOCAL_GENERATION_KWARGS)}")
        if self.structured_outputs_regex is not None:
            raise BridgeError("the embedded engine has no structured outputs; unset vllm_structured_outputs_regex")

    def sync_weights(self) -> None:
        """Not a copy: Note [sync_weights is a check]. Aliasing is checked in full at the first sync only:
        after it, every optimizer step's ``update()`` refuses a model that no longer aliases before it
        pauses the engine (a cast cannot go unnoticed past one step), and the full walk costs milliseconds
        for a model of a few hundred tensors."""
        t0 = time.perf_counter()
        check_served(self.bridge, aliasing=not self.sync_seconds)
        self.sync_seconds.append(time.perf_counter() - t0)

    def generate(self, prompts: list[list[int]], images: Any, num_generations: int,
                 profiler: Any = None) -> tuple[Any, Any, Any, Any]:
        if images is not None and any(i is not None for i in images):
            raise BridgeError("ipcbridge maps text-only decoders; this dataset has images")
        if self.kind == "vllm":
            self.mode = "colocate"  # TRL's in-process path: ``self.llm.generate`` with TRL's SamplingParams
            return super().generate(prompts, None, num_generations, profiler)
        if self.kind == "http":
            with profiler or contextlib.nullcontext():
                return trl_serve.generate(self.engine, self.completion_settings, prompts, num_generations,
                                          self.bridge.weight_version, self.server_timeout)
        return self._generate_local(prompts, num_generations)

    def _generate_local(self, prompts: list[list[int]], num_generations: int) -> tuple[Any, Any, Any, Any]:
        """TRL's colocate contract, (prompt_ids, completion_ids, logprobs, logprob_token_ids), from the
        embedded engine. TRL repeats each prompt ``num_generations`` times in a row; such runs become one
        request with ``n`` (one prefill, one batch: Note [n rows, one prefill] in ipcbridge.engine.core)."""
        g = num_generations if _in_runs(prompts, num_generations) else 1
        kw = self.generation_kwargs
        eos = getattr(self.processing_class, "eos_token_id", None)
        stop = [*kw.get("stop_token_ids", ()), *([eos] if isinstance(eos, int) else [])]
        outs = self.engine.generate(
            [list(p) for p in prompts[::g]], max_tokens=self.max_completion_length, temperature=self.temperature,
            seed=kw.get("seed"), n=g, top_p=self.top_p, top_k=self.top_k or 0, stop_token_ids=stop,
            ignore_eos=kw.get("ignore_eos", False), logprobs="processed",
        )
        stale = {o.weight_version for o in outs} - {self.bridge.weight_version}
        if stale:
            raise BridgeError(f"the engine generated with weight version(s) {sorted(stale)}, not the trainer's "
                              f"{self.bridge.weight_version}; train one policy per engine")
        completion_ids = [o.token_ids for o in outs]
        logprobs = [[[lp] for lp in o.logprobs] for o in outs]
        token_ids = [[[t] for t in o.token_ids] for o in outs]
        return [list(p) for p in prompts], completion_ids, logprobs, token_ids


def _warn_logprobs_mode(mode: str | None, fix: str) -> None:
    if mode is not None and mode != "processed_logprobs":
        logger.warning("the vLLM engine computes logprobs_mode=%s, which biases TRL's importance-sampling correction "
                       "(it compares them with logprobs after the temperature); start it with %s", mode, fix)


class _VersionedLLM:
    """The ``vllm.LLM`` TRL's colocate path calls, with two additions to ``generate`` (everything else is the
    ``LLM``'s own): each prompt carries the endpoint's ``cache_salt`` where the bridge was connected with
    ``kv_reset="salted"`` (TRL's prompts carry none, and without the per-fence reset an unsalted prompt could
    hit KV of the old weights: Note [stale KV: reset or salt]), and where vLLM stamps outputs with weight
    versions (0.32+) each must be the trainer's."""

    def __init__(self, llm: Any, salting: Any, bridge: Bridge) -> None:
        self._llm, self._salting, self._bridge = llm, salting, bridge

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def generate(self, prompts: list[dict[str, Any]], *args: Any, **kwargs: Any) -> Any:
        if self._salting is not None:
            salt = self._salting.cache_salt()
            prompts = [{**p, "cache_salt": salt} for p in prompts]
        outputs = self._llm.generate(prompts, *args, **kwargs)
        version = self._bridge.weight_version
        for out in outputs:
            for c in out.outputs:
                if output_weight_version(c, version) != version:
                    raise BridgeError(f"vLLM sampled a completion with weight version {output_weight_version(c, -1)}, "
                                      f"not the trainer's {version}; train one policy per engine")
        return outputs


@contextmanager
def _generation_class(bridge: Bridge) -> Iterator[None]:
    """Note [one generation class, swapped for one constructor call]."""
    check_trl()
    with _SWAP_LOCK:
        original = _grpo_module.VLLMGeneration
        _grpo_module.VLLMGeneration = functools.partial(BridgeGeneration, bridge)  # type: ignore[assignment]
        try:
            yield
        finally:
            _grpo_module.VLLMGeneration = original


def colocated_llm(model: str, args: Any, **overrides: Any) -> Any:
    """A ``vllm.LLM`` in this process, started as TRL's colocate mode starts its own
    (``VLLMGeneration._init_vllm`` of TRL 1.16, same arguments from ``args``, a ``GRPOConfig``), so the
    engine, its KV cache and its logprobs (``processed_logprobs``) are TRL's. ``ipcbridge.connect(llm)``
    then attaches to it in-process (:mod:`ipcbridge.vllm.inprocess`). ``overrides`` go to ``vllm.LLM``."""
    from trl.trainer.utils import ensure_master_addr_port
    from vllm import LLM

    # external_launcher joins a torch.distributed world of one, as TRL arranges it.
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    ensure_master_addr_port()
    kwargs = dict(
        model=model, tensor_parallel_size=1, gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        max_model_len=args.vllm_max_model_length, max_num_seqs=args.per_device_train_batch_size
        * args.steps_per_generation, enable_sleep_mode=False, model_impl=args.vllm_model_impl,
        distributed_executor_backend="external_launcher", seed=0, max_num_batched_tokens=4096,
        logprobs_mode="processed_logprobs", trust_remote_code=args.trust_remote_code,
    )
    return LLM(**{**kwargs, **overrides})


# ---- the trainer --------------------------------------------------------------------------------------


class GRPOTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` training ``bridge.model``, generating with the bridge's engine.

    Takes every ``trl.GRPOTrainer`` argument; ``model`` defaults to ``bridge.model`` (anything else is
    refused) and ``args`` must say ``use_vllm=True`` (the generation settings go to the bridge's engine;
    ``vllm_mode`` is ignored: the engine is wherever the bridge connected). A :class:`BridgeCallback` is
    added to fence each optimizer step, and the optimizer is wrapped in
    :func:`ipcbridge.optim.master_weights` (``master_weights=`` mode; ``None`` to skip) when the weights
    are 16-bit. ``generation.sync_seconds`` records each ``sync_weights`` check.
    """

    def __init__(self, bridge: Bridge, reward_funcs: Any, args: Any = None, *, model: Any = None,
                 master_weights: str | None = "remainder", **kwargs: Any) -> None:
        if not isinstance(bridge, Bridge):
            raise TypeError(f"GRPOTrainer's first argument is an ipcbridge Bridge (ipcbridge.connect(engine)), "
                            f"got {type(bridge).__name__}")
        bridge._model()  # BridgeError for a closed bridge, before TRL builds anything around model=None
        if master_weights is not None:
            from ipcbridge.optim import MODES

            if master_weights not in MODES:  # else refused at train(), after TRL and the trainer are built
                raise BridgeError(f"GRPOTrainer(master_weights={master_weights!r}): use one of {MODES} or None")
        if model is not None and model is not bridge.model:
            raise BridgeError("GRPOTrainer(model=...) must be bridge.model (or left out): any other model's steps "
                              "never reach the engine")
        if args is None or not getattr(args, "use_vllm", False):
            raise BridgeError("pass args=GRPOConfig(use_vllm=True, ...): ipcbridge's GRPOTrainer generates with "
                              "the bridge's engine through TRL's vLLM path")
        args = copy.copy(args)  # the caller's config is left as it was
        args.vllm_mode = "colocate"
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(c, BridgeCallback) and c.bridge is bridge for c in callbacks):
            callbacks.append(BridgeCallback(bridge))
        self.bridge = bridge
        self._master_mode = master_weights
        with _generation_class(bridge):
            super().__init__(model=bridge.model, reward_funcs=reward_funcs, args=args, callbacks=callbacks, **kwargs)

    @property
    def generation(self) -> BridgeGeneration:
        return self.vllm_generation

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        low = any(p.dtype in (torch.bfloat16, torch.float16) for p in self.bridge.model.parameters())
        if low and self._master_mode is not None and not _is_master(optimizer):
            from ipcbridge.optim import master_weights

            self.optimizer = optimizer = master_weights(optimizer, mode=self._master_mode)
        return optimizer


def _is_master(optimizer: Any) -> bool:
    from ipcbridge.optim.master import MasterWeights

    return isinstance(optimizer, MasterWeights)

"""A ``vllm.LLM`` whose worker runs in this very process: TRL's colocate shape.

TRL's colocate mode starts ``LLM(..., distributed_executor_backend="external_launcher")`` in the trainer's
own process: vLLM then runs its EngineCore and its one worker in-process (no ``VLLM_ENABLE_V1_MULTIPROCESSING``
child), and the model's parameters are tensors of this process. CUDA refuses to open a process's own IPC
handles, so the cross-process path (``collective_rpc`` returning a manifest of handles) cannot be used as is.

Note [attaching to our own process's vLLM]
    :class:`InProcessLLMEndpoint` reaches the worker directly (:func:`inprocess_worker`, the same path TRL's
    colocate ``sync_weights`` uses), exports the model's parameters with :func:`ipcbridge.export`, and
    ``connect`` opens that manifest as this process's own export (Note [opening your own export] in
    :mod:`ipcbridge.handles`): the attached model's parameters are views of the very tensors vLLM computes
    with, bound by the same mapping code as every other engine. No worker extension is needed and nothing
    crosses a process. Ownership: vLLM's worker owns the tensors for the ``LLM``'s life; the views go stale
    when it is shut down, or would if it re-allocated its weights (sleep mode, which the policy refuses).

    The fence is Note [the LLM fence] in :mod:`ipcbridge.vllm.endpoints`: ``LLM.generate`` blocks its
    caller, so nothing is in flight during ``optimizer.step()``. Resuming drops the prefix cache and moves
    the weight version forward; the version lives on the worker object under the attribute the worker
    extension uses (:data:`VERSION_ATTR`), so the engine still owns it (Note [the engine owns the weight
    version] in :mod:`ipcbridge.vllm.extension`) and two bridges on one ``LLM`` count one sequence.

``ipcbridge.connect(llm)`` picks this endpoint for an in-process ``LLM`` through :func:`endpoint_for`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from ipcbridge.endpoints import InProcessLeases
from ipcbridge.errors import BridgeError, reset_failed
from ipcbridge.manifest import Manifest
from ipcbridge.vllm import endpoints as cross_process
from ipcbridge.vllm.base import engine_record
from ipcbridge.vllm.extension import build_manifest, engine_config_dict, model_parameters, unwrap_model
from ipcbridge.vllm.policy import EngineFacts, refusal_reason

logger = logging.getLogger(__name__)

#: The worker attribute holding the weight version (``WorkerExtension._ipcbridge_weight_version``'s name).
VERSION_ATTR = "_ipcbridge_weight_version"


def inprocess_worker(llm: Any) -> Any | None:
    """The vLLM worker of ``llm`` if it runs in this process, else ``None``.

    vLLM V1's ``LLMEngine`` keeps ``model_executor`` only when its EngineCore runs in-process (it is set
    "for v0 compatibility" when multiprocessing is off, which ``external_launcher`` implies); the executor's
    ``driver_worker`` is a ``WorkerWrapperBase`` around the ``Worker``. These are private names, read here
    only, and the same ones TRL's colocate weight sync uses (``...model_executor.driver_worker.model_runner``).
    """
    executor = getattr(getattr(llm, "llm_engine", None), "model_executor", None)
    wrapper = getattr(executor, "driver_worker", None)
    if wrapper is None:
        return None
    worker = getattr(wrapper, "worker", None)
    return wrapper if worker is None else worker


def worker_model(worker: Any) -> nn.Module:
    """The ``nn.Module`` the in-process worker serves."""
    runner = getattr(worker, "model_runner", None)
    if runner is None:
        raise BridgeError("the in-process vLLM worker has no model_runner; is the LLM fully started?")
    model = runner.get_model() if callable(getattr(runner, "get_model", None)) else getattr(runner, "model", None)
    return unwrap_model(model)


class InProcessLLMEndpoint(InProcessLeases):
    """The control channel of a ``vllm.LLM`` running in this process. Note [attaching to our own process's vLLM]."""

    name = "vllm-inprocess"

    def __init__(self, llm: Any) -> None:
        worker = inprocess_worker(llm)
        if worker is None:
            raise BridgeError(
                "this vllm.LLM runs its engine in another process; connect with ipcbridge.connect(llm) and start it "
                "with worker_extension_cls='ipcbridge.vllm.WorkerExtension'"
            )
        self.llm = llm
        self.gate_key = llm  # shares the gate with any other endpoint of this LLM (Note [one gate per engine object])
        self.worker = worker
        self.vllm_config = llm.llm_engine.vllm_config
        # The worker's environment is this process's own (its allocator settings included).
        reason = refusal_reason(EngineFacts.from_vllm_config(self.vllm_config, os.environ, worker_model(worker)))
        if reason:
            raise BridgeError(reason)
        self.weight_version = self.engine_weight_version()

    def manifest(self) -> Manifest:
        """This process's own export of the served parameters; ``connect`` opens it as views of them."""
        model = worker_model(self.worker)
        _synchronize(model)  # dummy init or load_weights may still be running on vLLM's streams
        m = build_manifest(model_parameters(model), engine_config_dict(self.vllm_config.model_config),
                           self.engine_weight_version())
        self.weight_version = m.weight_version
        return m

    def engine_weight_version(self) -> int:
        """The worker's version, first moved up to any that an ``LLMEndpoint`` of this ``LLM`` counted (Note [an
        in-process engine's version is counted here] in :mod:`ipcbridge.vllm.base`)."""
        kept = engine_record(self.gate_key).version or 0
        version = max(int(getattr(self.worker, VERSION_ATTR, 0)), kept)
        setattr(self.worker, VERSION_ATTR, version)
        return version

    def engine_pause(self) -> None:
        pass  # Note [the LLM fence]: LLM.generate is blocking, nothing is in flight.

    def engine_resume(self) -> int:
        """Drop the prefix cache (its KV was computed with the old weights), then publish the next version."""
        reset = self.llm.reset_prefix_cache()
        version = self.engine_weight_version() + 1
        setattr(self.worker, VERSION_ATTR, version)
        engine_record(self.gate_key).heard(version)
        self.weight_version = version
        if reset is False:  # published all the same: the weights did change
            raise reset_failed(self.name)
        return version

    def sample(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy tokens and raw logprobs, as :meth:`ipcbridge.vllm.endpoints.LLMEndpoint.sample`."""
        out = self.llm.generate([{"prompt_token_ids": list(prompt)}], cross_process.greedy_params(max_tokens),
                                use_tqdm=False)
        return cross_process.completion_logprobs(out[0].outputs[0])

    def close(self) -> None:
        """Nothing to release: the LLM keeps running."""


def _synchronize(model: nn.Module) -> None:
    p = next(model.parameters(), None)
    if p is not None and p.is_cuda:
        torch.cuda.synchronize(p.device)


def endpoint_for(target: Any, **options: Any) -> Any:
    """:class:`InProcessLLMEndpoint` for a ``vllm.LLM`` running in this process (only an ``LLM`` has an
    in-process ``llm_engine.model_executor``), else the cross-process endpoint
    :func:`ipcbridge.vllm.endpoints.endpoint_for` picks, with ``options``."""
    if inprocess_worker(target) is not None:
        if options:
            raise BridgeError(f"endpoint options {sorted(options)} are for an LLM in another process; the "
                              "in-process LLM takes none")
        return InProcessLLMEndpoint(target)
    return cross_process.endpoint_for(target, **options)

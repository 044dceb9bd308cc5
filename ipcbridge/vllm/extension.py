"""The engine side: a mixin vLLM adds to its GPU worker, exporting the weights the worker serves.

``LLM(..., worker_extension_cls="ipcbridge.vllm.WorkerExtension")`` or ``vllm serve ...
--worker-extension-cls ipcbridge.vllm.WorkerExtension`` makes vLLM add :class:`WorkerExtension` to the
bases of its worker class, so its ``ipcbridge_*`` methods can be called with ``collective_rpc`` (offline
``LLM``, ``AsyncLLM``) or ``POST /collective_rpc`` (``vllm serve`` with ``VLLM_SERVER_DEV_MODE=1``). Every
method answers one JSON string (Note [replies cross vLLM's msgpack channel] in :mod:`ipcbridge.vllm.rpc`).

Only what production needs lives here: the manifest, the weight version, and process facts. Test and
benchmark helpers (re-initialising weights, the copy-based baseline) are in
:class:`ipcbridge.vllm.testing.TestingWorkerExtension`, a subclass.

Note [the engine owns the weight version]
    The worker keeps the weight version of the weights it serves. Each fence ends with
    ``ipcbridge_publish_weight_version``, which moves it forward by one and returns the new value; the
    bridge reports what the worker returned. Since one counter counts, two bridges on one engine (or a
    lease that ran out and was resumed by the watchdog) never publish the same version twice, and a
    trainer that reconnects continues from the engine's version instead of restarting at 0. An engine that
    is an object of the trainer's process keeps that counter in that process instead, and the worker is
    told before it answers with its version (Note [an in-process engine's version is counted here] in
    :mod:`ipcbridge.vllm.base`).

Note [every attribute prefixed]
    vLLM adds the extension to its worker class's bases after checking that no non-dunder attribute of the
    extension already exists on the worker (an ``AssertionError`` at engine start otherwise), and each
    release adds worker attributes. So every attribute here, and in the mixins the lead adds to the bases,
    is ``ipcbridge_``/``_ipcbridge_``-prefixed; ``tests/vllm/test_extension.py`` scans the class for it.
    The only exceptions are the two hooks vLLM 0.33+ looks up by name (:data:`VLLM_HOOKS`): it calls
    ``init_worker_extension(worker)`` after the device is set up and before the model loads, and
    ``destroy_worker_extension(worker)`` before the worker shuts down. Older releases never call them,
    which is why nothing relies on them: the state they reset has class-level defaults.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ipcbridge import mapping
from ipcbridge.errors import BridgeError
from ipcbridge.hf import config_dict
from ipcbridge.manifest import Manifest
from ipcbridge.vllm.loader_plan import LoaderPlanMixin
from ipcbridge.vllm.policy import EngineFacts, refusal_reason
from ipcbridge.vllm.receiver import StreamReceiverMixin
from ipcbridge.vllm.rpc import EXTENSION_QUALNAME, parse_int, worker_method

logger = logging.getLogger(__name__)

#: Names vLLM itself looks up on the extension (0.33+): the only attributes without the ``ipcbridge`` prefix.
VLLM_HOOKS = ("init_worker_extension", "destroy_worker_extension")

__all__ = ["EXTENSION_QUALNAME", "VLLM_HOOKS", "WorkerExtension", "build_manifest", "extension_class", "model_parameters",
           "unwrap_model"]


# ---- the served model ---------------------------------------------------------------------------------


def unwrap_model(model: Any) -> nn.Module:
    """The ``nn.Module`` under vLLM's CUDA-graph / micro-batch wrappers (they expose ``unwrap()``)."""
    for _ in range(8):
        if isinstance(model, nn.Module):
            return model
        unwrap = getattr(model, "unwrap", None)
        if not callable(unwrap):
            break
        model = unwrap()
    if isinstance(model, nn.Module):
        return model
    raise BridgeError(f"the vLLM worker's model is a {type(model).__name__}, not a torch module; cannot export it")


def model_parameters(model: Any) -> dict[str, torch.Tensor]:
    """The model's parameters by vLLM name (tied ones appear once), as the module's own objects.

    vLLM's parameters are ``nn.Parameter`` subclasses (``BasevLLMParameter``). They are handed to
    :func:`ipcbridge.export` as they are: it ``detach()``-es each (a tensor over the same storage, which is
    all it reads: shape, stride, offset, storage) and keeps weak references to the originals.
    """
    module = unwrap_model(model)
    params: dict[str, torch.Tensor] = dict(module.named_parameters())
    if not params:
        raise BridgeError("the vLLM worker's model has no parameters to export")
    return params


def engine_config_dict(model_config: Any) -> dict[str, Any]:
    """The engine's HF config (``model_config.hf_config``) as a JSON-safe dict."""
    hf = getattr(model_config, "hf_config", None)
    if hf is None:
        raise BridgeError("the vLLM model config has no hf_config; ipcbridge needs the model's HF config")
    return config_dict(hf)


def build_manifest(params: Mapping[str, torch.Tensor], config: Mapping[str, Any], weight_version: int) -> Manifest:
    """The manifest of ``params`` (vLLM layout) with ``config``: :func:`ipcbridge.export`, reused."""
    from ipcbridge.handles import export

    return export(dict(params), config=config, layout="vllm", weight_version=weight_version)


# ---- which classes are ours ---------------------------------------------------------------------------


def extension_class(value: Any) -> type | None:
    """The class an engine's ``worker_extension_cls`` names (a qualname string or a class); ``None`` if unset.

    Importing the named module runs it in this (the driver's) process; vLLM imports it in the worker too.
    """
    if isinstance(value, type):
        return value
    if not value:
        return None
    if not isinstance(value, str):
        raise BridgeError(f"worker_extension_cls is a {type(value).__name__} ({value!r}); expected a qualname")
    module, _, name = value.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError) as e:
        raise BridgeError(
            f"cannot import the engine's worker_extension_cls={value!r} in the trainer ({e}); start the engine "
            f"with worker_extension_cls={EXTENSION_QUALNAME!r}"
        ) from None
    if not isinstance(cls, type):
        raise BridgeError(f"worker_extension_cls={value!r} does not name a class; use {EXTENSION_QUALNAME!r}")
    return cls


def is_ipcbridge_extension(value: Any) -> bool:
    """Whether ``worker_extension_cls`` is :class:`WorkerExtension` or a subclass of it."""
    cls = extension_class(value)
    return cls is not None and issubclass(cls, WorkerExtension)


# ---- the extension ------------------------------------------------------------------------------------


class WorkerExtension(LoaderPlanMixin, StreamReceiverMixin):
    """Mixed into vLLM's GPU worker by ``worker_extension_cls``; runs in the process that holds the model.

    Ownership: the worker owns the weight memory for the engine's whole life. A manifest lends it: the
    trainer's views stay valid while this engine runs and keeps its parameters (``load_weights`` copies into
    them in place, so it keeps them). They go stale when the engine exits, and would go stale if the engine
    re-allocated its weights (sleep/wake, which is refused); ask for a fresh manifest after a restart. The
    worker also owns the weight version (Note [the engine owns the weight version]).

    vLLM requires every non-dunder attribute here to be absent from its worker class, hence the
    ``ipcbridge_`` prefix on everything but vLLM's own hooks (Note [every attribute prefixed]). Mixins
    added to the bases keep that rule; they may define the hooks too (each hook here calls the next one
    in the MRO).
    """

    _ipcbridge_weight_version: int = 0
    #: Set by ``destroy_worker_extension``: the worker is shutting down, its memory is about to go.
    _ipcbridge_closed: bool = False

    def init_worker_extension(self) -> None:
        """vLLM 0.33+: the worker's device is ready, the model not loaded yet. Starts the version at 0."""
        self._ipcbridge_weight_version = 0
        self._ipcbridge_closed = False
        nxt = getattr(super(), "init_worker_extension", None)
        if callable(nxt):
            nxt()
        logger.debug("ipcbridge: worker extension initialised in pid %d", os.getpid())

    def destroy_worker_extension(self) -> None:
        """vLLM 0.33+: the worker is about to shut down; later exports are refused (views would go stale)."""
        self._ipcbridge_closed = True
        nxt = getattr(super(), "destroy_worker_extension", None)
        if callable(nxt):
            nxt()

    def _ipcbridge_check_open(self) -> None:
        if self._ipcbridge_closed:
            raise BridgeError("the vLLM worker is shutting down; its weights cannot be exported. Connect again "
                              "after the engine restarts")

    def _ipcbridge_model(self) -> nn.Module:
        runner = getattr(self, "model_runner", None)
        if runner is not None and hasattr(runner, "get_model"):
            return unwrap_model(runner.get_model())
        return unwrap_model(self.get_model())  # type: ignore[attr-defined]

    def _ipcbridge_facts(self, model: nn.Module | None = None) -> EngineFacts:
        return EngineFacts.from_vllm_config(self.vllm_config, os.environ, model)  # type: ignore[attr-defined]

    @worker_method
    def ipcbridge_manifest(self) -> dict[str, Any]:
        """The manifest of every parameter of this worker's model, with the engine's HF config and version."""
        self._ipcbridge_check_open()
        model = self._ipcbridge_model()
        reason = refusal_reason(self._ipcbridge_facts(model))
        if reason:
            raise BridgeError(reason)
        # The weights may still be written by kernels on vLLM's streams (dummy init, load_weights):
        # wait so the trainer's first read sees them.
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        manifest = build_manifest(
            model_parameters(model), engine_config_dict(self.vllm_config.model_config),  # type: ignore[attr-defined]
            self._ipcbridge_weight_version,
        )
        if not mapping.has_table(self.vllm_config.model_config.hf_config):  # type: ignore[attr-defined]
            # No table for this architecture: the trainer binds the plan vLLM's own loader implies.
            manifest = manifest.replace(loader_plan=self._ipcbridge_loader_plan().to_dict())
        logger.info("ipcbridge: exported %d tensors (%d bytes), weight version %d",
                    len(manifest.tensors), manifest.total_bytes(), manifest.weight_version)
        return manifest.to_dict()

    @worker_method
    def ipcbridge_publish_weight_version(self) -> int:
        """Move the weight version one step forward (a fence just ended); the new version."""
        self._ipcbridge_weight_version += 1
        return self._ipcbridge_weight_version

    @worker_method
    def ipcbridge_weight_version(self, at_least: int | str | None = None) -> int:
        """The weight version last published (0 before any). ``at_least``: a version the trainer's process
        counted for this engine (Note [an in-process engine's version is counted here] in
        :mod:`ipcbridge.vllm.base`); the worker's moves up to it first, never back."""
        if at_least is not None:
            floor = parse_int(at_least, "ipcbridge_weight_version's at_least")
            self._ipcbridge_weight_version = max(self._ipcbridge_weight_version, floor)
        return self._ipcbridge_weight_version

    @worker_method
    def ipcbridge_info(self) -> dict[str, Any]:
        """Process and memory facts of the worker, for tests, benchmarks and diagnostics."""
        model = self._ipcbridge_model()
        return {
            "pid": os.getpid(),
            "model_class": type(model).__name__,
            "device": str(next(model.parameters()).device),
            "memory_allocated": torch.cuda.memory_allocated() if torch.cuda.is_available() else 0,
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "weight_version": self._ipcbridge_weight_version,
            "refusal": refusal_reason(self._ipcbridge_facts(model)),
        }

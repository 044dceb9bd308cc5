"""Which vLLM engines ipcbridge can alias, and why not the others. Pure: neither vLLM nor CUDA.

The worker (:mod:`ipcbridge.vllm.extension`) checks :func:`refusal_reason` before it exports anything; the
driver-side endpoints check the same facts off the engine's config before they ask the worker, so a refused
engine fails at ``connect`` with the same message either way.

Note [what cannot be aliased]
    The trainer maps the worker's weight memory through legacy CUDA IPC (``cudaIpcGetMemHandle``), one
    unsharded copy, in the dtype vLLM stores. :func:`refusal_reasons` turns down, before anything is exported,
    the engines where that is impossible or would silently train the wrong thing: sleep mode and the cumem
    allocator (``cuMemCreate`` memory has no legacy IPC handle), ``expandable_segments`` (the same, through
    PyTorch), tensor/pipeline parallelism (each worker holds a shard), quantized weights (packed integer or
    fp8 tensors a trainer cannot step), CPU-offloaded weights (copied to the GPU per step: nothing stable to
    alias), and architectures the mapper has no table for. Each reason names the way out, and all of them
    are reported together, so one restart fixes every setting. Where only the memory or the sharding
    stands in the way (sleep mode, ``expandable_segments``, TP/PP > 1), the way out includes
    ``ipcbridge.stream(engine, model)`` (:data:`STREAM`), which copies instead of aliasing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ipcbridge import mapping
from ipcbridge.errors import MappingError

logger = logging.getLogger(__name__)

#: What to use when an engine cannot be aliased (Note [what cannot be aliased]).
COPY_SYNC = (
    "copy-based weight sync (the trainer keeps its own weights and the worker copies them in with "
    "model.load_weights)"
)
#: The way out where only the memory or the sharding stands in the way: ipcbridge streams the trainer's own
#: weights into the engine's (on its GPU through a shared buffer, from another GPU over NCCL).
STREAM = (
    "ipcbridge.stream(engine, model): the trainer keeps its own weights and streams them into the engine's "
    "after each step, with the same update() fence (docs/nccl-fallback.md)"
)


@dataclass(frozen=True)
class EngineFacts:
    """The settings of a vLLM engine that decide whether its weights can be aliased (validated on creation)."""

    quantization: str | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enable_sleep_mode: bool = False
    enable_cumem_allocator: bool = False
    #: PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF of the engine process, joined by ",".
    alloc_conf: str = ""
    model_type: str | None = None
    #: Devices the weights live on (``"cuda"``, ``"cpu"`` with ``cpu_offload_gb``); empty if unknown.
    weight_devices: tuple[str, ...] = field(default_factory=tuple)
    #: The unquantized MoE backends of the model's expert layers (``UnquantizedMoeBackend`` names); empty
    #: for dense models or when unknown (driver side).
    moe_backends: tuple[str, ...] = field(default_factory=tuple)
    #: Whether the worker can derive an alias plan from vLLM's loader for a model type without a table
    #: (:mod:`ipcbridge.vllm.loader_plan`); such a model is refused only if it cannot.
    derives_plans: bool = True

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"EngineFacts.{name} must be a positive int, got {v!r}")
        for name in ("enable_sleep_mode", "enable_cumem_allocator"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EngineFacts.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("quantization", "model_type"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"EngineFacts.{name} must be a str or None, got {v!r}")
        if not isinstance(self.alloc_conf, str):
            raise ValueError(f"EngineFacts.alloc_conf must be a str, got {self.alloc_conf!r}")
        for name in ("weight_devices", "moe_backends"):
            v = getattr(self, name)
            if not isinstance(v, tuple) or not all(isinstance(d, str) for d in v):
                raise ValueError(f"EngineFacts.{name} must be a tuple of str, got {v!r}")
        if not isinstance(self.derives_plans, bool):
            raise ValueError(f"EngineFacts.derives_plans must be a bool, got {self.derives_plans!r}")

    @classmethod
    def from_vllm_config(cls, vllm_config: Any, environ: Mapping[str, str] | None = None,
                         model: nn.Module | None = None) -> EngineFacts:
        """Read the facts off a ``VllmConfig`` (driver or worker side) and the engine's environment."""
        environ = os.environ if environ is None else environ
        mc, pc = vllm_config.model_config, vllm_config.parallel_config
        hf = getattr(mc, "hf_config", None)
        devices: tuple[str, ...] = ()
        backends: tuple[str, ...] = ()
        if model is not None:
            devices = tuple(sorted({p.device.type for p in model.parameters()}))
            backends = moe_backends(model)
        return cls(
            quantization=getattr(mc, "quantization", None) or None,
            tensor_parallel_size=int(getattr(pc, "tensor_parallel_size", 1)),
            pipeline_parallel_size=int(getattr(pc, "pipeline_parallel_size", 1)),
            enable_sleep_mode=bool(getattr(mc, "enable_sleep_mode", False)),
            enable_cumem_allocator=bool(getattr(mc, "enable_cumem_allocator", False)),
            alloc_conf=",".join(environ.get(k, "") for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")),
            model_type=getattr(hf, "model_type", None),
            weight_devices=devices,
            moe_backends=backends,
        )


#: MoE backends that keep vLLM's expert tensors as loaded (Note [MoE experts are whole-tensor aliases] in
#: :mod:`ipcbridge.mapping.tables.vllm`): Triton runs on w13/w2 as ``[gate | up]`` rows, unpadded on CUDA.
ALIASABLE_MOE_BACKENDS = ("TRITON", "BATCHED_TRITON")


def moe_backends(model: nn.Module) -> tuple[str, ...]:
    """The unquantized MoE backend of each expert layer of a vLLM model (``quant_method.unquantized_backend``,
    set in vLLM's ``UnquantizedFusedMoEMethod.__init__``), deduplicated."""
    found = set()
    for module in model.modules():
        backend = getattr(getattr(module, "quant_method", None), "unquantized_backend", None)
        if backend is not None:
            found.add(str(getattr(backend, "name", backend)))
    return tuple(sorted(found))


def _expandable_segments_on(alloc_conf: str) -> bool:
    # The allocator reads "key:value" pairs separated by commas; the last setting of a key wins.
    on = False
    for item in alloc_conf.split(","):
        key, _, value = item.strip().partition(":")
        if key.strip() == "expandable_segments":
            on = value.strip().lower() == "true"
    return on


def _memory_reasons(facts: EngineFacts) -> list[str]:
    """Refusals because the weight memory has no legacy CUDA IPC handle, or is not on the GPU for good."""
    reasons: list[str] = []
    if facts.enable_sleep_mode or facts.enable_cumem_allocator:
        setting = "enable_sleep_mode=True" if facts.enable_sleep_mode else "enable_cumem_allocator=True"
        reasons.append(
            f"the engine runs with {setting}, so its weights live in vLLM's cumem allocator (cuMemCreate "
            "memory), which legacy CUDA IPC cannot export. Start vLLM without enable_sleep_mode / "
            "enable_cumem_allocator (no --enable-sleep-mode); to keep the engine idle while training, "
            f"pause it instead of putting it to sleep. Or keep sleep mode and use {STREAM}"
        )
    if _expandable_segments_on(facts.alloc_conf):
        reasons.append(
            "the engine process runs with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; such memory "
            "cannot be exported through legacy CUDA IPC. Unset it (or set expandable_segments:False) in the "
            f"environment that starts vLLM; the trainer may keep it. Or keep it and use {STREAM}"
        )
    if facts.weight_devices and set(facts.weight_devices) != {"cuda"}:
        reasons.append(
            f"some weights are not on the GPU (devices {list(facts.weight_devices)}); CPU-offloaded weights "
            "are copied to the GPU per step, so there is nothing stable to alias. Start vLLM with "
            "cpu_offload_gb=0"
        )
    return reasons


def _model_reasons(facts: EngineFacts) -> list[str]:
    """Refusals because the weights are not one unsharded, steppable copy of a model the mapper knows."""
    reasons: list[str] = []
    if facts.tensor_parallel_size > 1 or facts.pipeline_parallel_size > 1:
        reasons.append(
            f"the engine is sharded (tensor_parallel_size={facts.tensor_parallel_size}, "
            f"pipeline_parallel_size={facts.pipeline_parallel_size}); ipcbridge attaches one unsharded "
            "model for now. Start vLLM with tensor_parallel_size=1 and pipeline_parallel_size=1, or use "
            f"{COPY_SYNC}: {STREAM}, with receiver='vllm' and the engine started with "
            "weight_transfer_config={'backend': 'nccl'} (vLLM's receiver shards on load)"
        )
    if facts.quantization:
        reasons.append(
            f"the engine serves quantized weights (quantization={facts.quantization!r}); a trainer cannot "
            "step packed/quantized tensors in place. Serve an unquantized bf16/fp16/fp32 checkpoint (no "
            f"--quantization), or keep the quantized engine and use {COPY_SYNC}"
        )
    if facts.model_type is not None and not facts.derives_plans:
        try:
            mapping.get_arch({"model_type": facts.model_type})
        except MappingError:
            reasons.append(
                f"ipcbridge has no vLLM<->HF mapping for model_type {facts.model_type!r} (it maps "
                f"{', '.join(mapping.supported_model_types())}) and this worker cannot derive one from vLLM's "
                "loader. Use one of those models, register a table with ipcbridge.mapping.register(...), start "
                f"vLLM with worker_extension_cls='ipcbridge.vllm.WorkerExtension', or use {COPY_SYNC}"
            )
    bad = [b for b in facts.moe_backends if b not in ALIASABLE_MOE_BACKENDS]
    if bad:
        reasons.append(
            f"the engine runs its experts on the {'/'.join(bad)} MoE backend, whose process_weights_after_loading "
            "re-lays w13/w2 out (FlashInfer swaps gate/up to [up | gate] or shuffles blocks; AITER shuffles; ROCm "
            "pads), so the HF experts are no view of them. Start vLLM with moe_backend='triton' (--moe-backend "
            f"triton), or use {COPY_SYNC}"
        )
    return reasons


def refusal_reasons(facts: EngineFacts) -> list[str]:
    """Why the engine's weights cannot be aliased, each with what to do instead (empty list: they can)."""
    return _memory_reasons(facts) + _model_reasons(facts)


def refusal_reason(facts: EngineFacts) -> str | None:
    """All of :func:`refusal_reasons` as one message, or ``None`` if the weights can be aliased."""
    reasons = refusal_reasons(facts)
    if not reasons:
        return None
    return "ipcbridge cannot alias this vLLM engine's weights: " + "; and ".join(reasons)

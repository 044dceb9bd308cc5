"""The engine side: a mixin vLLM adds to its GPU worker, exporting the weights the worker serves.

``LLM(..., worker_extension_cls="ipcbridge.vllm.WorkerExtension")`` or ``vllm serve ...
--worker-extension-cls ipcbridge.vllm.WorkerExtension`` makes vLLM add :class:`WorkerExtension` to the
bases of its worker class, so its ``ipcbridge_*`` methods can be called with ``collective_rpc`` (offline
``LLM``, ``AsyncLLM``) or ``POST /collective_rpc`` (``vllm serve`` with ``VLLM_SERVER_DEV_MODE=1``).

Note [replies cross vLLM's msgpack channel]
    ``collective_rpc`` results travel from the worker to the caller over msgpack, and ``/collective_rpc``
    turns anything but dicts and lists into ``str``. Anything else would need pickle, which vLLM refuses
    without ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``. So every ``ipcbridge_*`` method returns one JSON string,
    a :class:`Reply`, and takes only ``str``/``int`` arguments (``/collective_rpc`` passes strings). Errors
    are *returned*, not raised: the trainer then raises our message (cause and fix) rather than a worker
    traceback wrapped by vLLM.

Note [what cannot be aliased]
    The trainer maps the worker's weight memory through legacy CUDA IPC (``cudaIpcGetMemHandle``), one
    unsharded copy, in the dtype vLLM stores. :func:`refusal_reasons` turns down, before anything is exported,
    the engines where that is impossible or would silently train the wrong thing: sleep mode and the cumem
    allocator (``cuMemCreate`` memory has no legacy IPC handle), ``expandable_segments`` (the same, through
    PyTorch), tensor/pipeline parallelism (each worker holds a shard), quantized weights (packed integer or
    fp8 tensors a trainer cannot step), and architectures the mapper has no table for.

The pure functions here (facts, refusals, parameter collection, replies) need neither vLLM nor CUDA and are
tested on CPU; only :class:`WorkerExtension` runs inside vLLM.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ipcbridge.errors import BridgeError, ManifestError, MappingError

logger = logging.getLogger(__name__)

#: The qualified name to pass as ``worker_extension_cls`` / ``--worker-extension-cls``.
EXTENSION_QUALNAME = "ipcbridge.vllm.WorkerExtension"

REPLY_FORMAT = "ipcbridge.reply"

#: What to use when an engine cannot be aliased (Note [what cannot be aliased]).
COPY_SYNC = (
    "copy-based weight sync (the trainer keeps its own weights and the worker copies them in with "
    "model.load_weights)"
)


# ----------------------------------------------------------------------------------------------------
# Engine facts and refusals


@dataclass(frozen=True)
class EngineFacts:
    """The settings of a vLLM engine that decide whether its weights can be aliased."""

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

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"EngineFacts.{name} must be a positive int, got {v!r}")
        for name in ("enable_sleep_mode", "enable_cumem_allocator"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EngineFacts.{name} must be a bool, got {getattr(self, name)!r}")
        if self.quantization is not None and not isinstance(self.quantization, str):
            raise ValueError(f"EngineFacts.quantization must be a str or None, got {self.quantization!r}")
        if not isinstance(self.alloc_conf, str):
            raise ValueError(f"EngineFacts.alloc_conf must be a str, got {self.alloc_conf!r}")

    @classmethod
    def from_vllm_config(cls, vllm_config: Any, environ: Mapping[str, str] | None = None,
                         model: nn.Module | None = None) -> EngineFacts:
        """Read the facts off a ``VllmConfig`` (driver or worker side) and the engine's environment."""
        environ = os.environ if environ is None else environ
        mc, pc = vllm_config.model_config, vllm_config.parallel_config
        hf = getattr(mc, "hf_config", None)
        devices: tuple[str, ...] = ()
        if model is not None:
            devices = tuple(sorted({p.device.type for p in model.parameters()}))
        return cls(
            quantization=getattr(mc, "quantization", None) or None,
            tensor_parallel_size=int(getattr(pc, "tensor_parallel_size", 1)),
            pipeline_parallel_size=int(getattr(pc, "pipeline_parallel_size", 1)),
            enable_sleep_mode=bool(getattr(mc, "enable_sleep_mode", False)),
            enable_cumem_allocator=bool(getattr(mc, "enable_cumem_allocator", False)),
            alloc_conf=",".join(environ.get(k, "") for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")),
            model_type=getattr(hf, "model_type", None),
            weight_devices=devices,
        )


def _expandable_segments_on(alloc_conf: str) -> bool:
    # The allocator reads "key:value" pairs separated by commas; the last setting of a key wins.
    on = False
    for item in alloc_conf.split(","):
        key, _, value = item.strip().partition(":")
        if key.strip() == "expandable_segments":
            on = value.strip().lower() == "true"
    return on


def refusal_reasons(facts: EngineFacts) -> list[str]:
    """Why the engine's weights cannot be aliased, each with what to do instead (empty list: they can)."""
    from ipcbridge import mapping

    reasons: list[str] = []
    if facts.enable_sleep_mode or facts.enable_cumem_allocator:
        setting = "enable_sleep_mode=True" if facts.enable_sleep_mode else "enable_cumem_allocator=True"
        reasons.append(
            f"the engine runs with {setting}, so its weights live in vLLM's cumem allocator (cuMemCreate "
            "memory), which legacy CUDA IPC cannot export. Start vLLM without enable_sleep_mode / "
            "enable_cumem_allocator (no --enable-sleep-mode); to keep the engine idle while training, "
            "pause it instead of putting it to sleep"
        )
    if _expandable_segments_on(facts.alloc_conf):
        reasons.append(
            "the engine process runs with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; such memory "
            "cannot be exported through legacy CUDA IPC. Unset it (or set expandable_segments:False) in the "
            "environment that starts vLLM; the trainer may keep it"
        )
    if facts.tensor_parallel_size > 1 or facts.pipeline_parallel_size > 1:
        reasons.append(
            f"the engine is sharded (tensor_parallel_size={facts.tensor_parallel_size}, "
            f"pipeline_parallel_size={facts.pipeline_parallel_size}); ipcbridge attaches one unsharded "
            "model for now. Start vLLM with tensor_parallel_size=1 and pipeline_parallel_size=1, or use "
            f"{COPY_SYNC}"
        )
    if facts.quantization:
        reasons.append(
            f"the engine serves quantized weights (quantization={facts.quantization!r}); a trainer cannot "
            "step packed/quantized tensors in place. Serve an unquantized bf16/fp16/fp32 checkpoint (no "
            f"--quantization), or keep the quantized engine and use {COPY_SYNC}"
        )
    if facts.model_type is not None:
        try:
            mapping.get_arch({"model_type": facts.model_type})
        except MappingError:
            reasons.append(
                f"ipcbridge has no vLLM<->HF mapping for model_type {facts.model_type!r} (it maps "
                f"{', '.join(mapping.supported_model_types())}). Use one of those models, register a table "
                f"with ipcbridge.mapping.register(...), or use {COPY_SYNC}"
            )
    if facts.weight_devices and set(facts.weight_devices) != {"cuda"}:
        reasons.append(
            f"some weights are not on the GPU (devices {list(facts.weight_devices)}); CPU-offloaded weights "
            "are copied to the GPU per step, so there is nothing stable to alias. Start vLLM with "
            "cpu_offload_gb=0"
        )
    return reasons


def refusal_reason(facts: EngineFacts) -> str | None:
    """All of :func:`refusal_reasons` as one message, or ``None`` if the weights can be aliased."""
    reasons = refusal_reasons(facts)
    if not reasons:
        return None
    return "ipcbridge cannot alias this vLLM engine's weights: " + "; and ".join(reasons)


# ----------------------------------------------------------------------------------------------------
# Parameters and config


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


def hf_config_dict(model_config: Any) -> dict[str, Any]:
    """The engine's HF config as a JSON-safe dict (``to_json_string`` turns dtypes etc. into strings)."""
    hf = getattr(model_config, "hf_config", None)
    if hf is None:
        raise BridgeError("the vLLM model config has no hf_config; ipcbridge needs the model's HF config")
    if hasattr(hf, "to_json_string"):
        try:
            return json.loads(hf.to_json_string(use_diff=False))
        except (TypeError, ValueError):
            pass  # an attribute vLLM added is not JSON: fall back to str() for those values
    if hasattr(hf, "to_dict"):
        return json.loads(json.dumps(hf.to_dict(), default=str))
    raise BridgeError(f"cannot serialise the engine's HF config of type {type(hf).__name__}")


@torch.no_grad()
def init_weights_(model: nn.Module, seed: int = 0, std: float = 0.02) -> int:
    """HF-style init in place: norms 1, biases 0, the rest N(0, ``std``) from ``seed``. Returns the count.

    vLLM's dummy weights are uniform in [-1e-3, 1e-3], norms included, so every logit is ~0 and every
    greedy choice a near-tie; tests and demos need weights that say something.
    """
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    n = 0
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name:
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32) * std)
        n += 1
    return n


def build_manifest(params: Mapping[str, torch.Tensor], config: Mapping[str, Any], weight_version: int) -> Any:
    """The manifest of ``params`` (vLLM layout) with ``config``: :func:`ipcbridge.export`, reused."""
    from ipcbridge.handles import export

    return export(dict(params), config=config, layout="vllm", weight_version=weight_version)


# ----------------------------------------------------------------------------------------------------
# Replies (Note [replies cross vLLM's msgpack channel])


@dataclass(frozen=True)
class Reply:
    """One ``ipcbridge_*`` result as it crosses from the worker: a value, or an error message."""

    ok: bool
    value: Any = None
    error: str | None = None
    error_type: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.ok, bool):
            raise ManifestError(f"reply.ok must be a bool, got {self.ok!r}")
        if not self.ok and not isinstance(self.error, str):
            raise ManifestError("an error reply must carry an error message (str)")

    def to_json(self) -> str:
        d: dict[str, Any] = {"format": REPLY_FORMAT, "ok": self.ok}
        if self.ok:
            d["value"] = self.value
        else:
            d["error"] = self.error
            d["error_type"] = self.error_type
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: Any, where: str = "the vLLM worker") -> Reply:
        if not isinstance(text, (str, bytes)):
            raise BridgeError(
                f"{where} returned a {type(text).__name__}, not an ipcbridge reply; is worker_extension_cls "
                f"{EXTENSION_QUALNAME!r} and the same ipcbridge version installed in the engine?"
            )
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BridgeError(
                f"{where} returned {str(text)[:200]!r}, which is not an ipcbridge reply (not JSON: {e}); is "
                f"worker_extension_cls {EXTENSION_QUALNAME!r} and the same ipcbridge version installed in the engine?"
            ) from None
        if not isinstance(d, dict) or d.get("format") != REPLY_FORMAT:
            raise BridgeError(
                f"{where} returned JSON that is not an ipcbridge reply: {str(text)[:200]!r}; use the same "
                "ipcbridge version in the engine and the trainer"
            )
        try:
            return cls(ok=d.get("ok"), value=d.get("value"), error=d.get("error"), error_type=d.get("error_type"))
        except ManifestError as e:
            raise BridgeError(f"{where} returned a malformed ipcbridge reply: {e}") from None

    def unwrap(self) -> Any:
        """The value, or raise the worker's error as the same ipcbridge error type."""
        if self.ok:
            return self.value
        types = {"MappingError": MappingError, "ManifestError": ManifestError}
        raise types.get(self.error_type or "", BridgeError)(self.error)


def ok_reply(value: Any) -> str:
    return Reply(ok=True, value=value).to_json()


def error_reply(exc: BaseException) -> str:
    return Reply(ok=False, error=str(exc), error_type=type(exc).__name__).to_json()


def parse_version(version: int | str) -> int:
    """A weight version from ``collective_rpc`` args (an int, or a decimal string over HTTP)."""
    if isinstance(version, bool) or not isinstance(version, (int, str)):
        raise BridgeError(f"weight version must be an int or a decimal string, got {version!r}")
    try:
        v = int(version)
    except ValueError:
        raise BridgeError(f"weight version must be an int or a decimal string, got {version!r}") from None
    if v < 0:
        raise BridgeError(f"weight version must be >= 0, got {v}")
    return v


# ----------------------------------------------------------------------------------------------------
# The extension


class WorkerExtension:
    """Mixed into vLLM's GPU worker by ``worker_extension_cls``; runs in the process that holds the model.

    Ownership: the worker owns the weight memory for the engine's whole life. A manifest lends it: the
    trainer's views stay valid while this engine runs and keeps its parameters (``load_weights`` copies into
    them in place, so it keeps them). They go stale when the engine exits, and would go stale if the engine
    re-allocated its weights (sleep/wake, which is refused); ask for a fresh manifest after a restart.

    vLLM requires every non-dunder attribute here to be absent from its worker class, hence the
    ``ipcbridge_`` prefix on everything.
    """

    _ipcbridge_weight_version: int = 0

    def _ipcbridge_model(self) -> nn.Module:
        runner = getattr(self, "model_runner", None)
        if runner is not None and hasattr(runner, "get_model"):
            return unwrap_model(runner.get_model())
        return unwrap_model(self.get_model())  # type: ignore[attr-defined]

    def _ipcbridge_facts(self, model: nn.Module | None = None) -> EngineFacts:
        return EngineFacts.from_vllm_config(self.vllm_config, os.environ, model)  # type: ignore[attr-defined]

    def ipcbridge_manifest(self) -> str:
        """The manifest (JSON reply) of every parameter of this worker's model, with the engine's HF config."""
        try:
            model = self._ipcbridge_model()
            reason = refusal_reason(self._ipcbridge_facts(model))
            if reason:
                raise BridgeError(reason)
            # The weights may still be written by kernels on vLLM's streams (dummy init, load_weights):
            # wait so the trainer's first read sees them.
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            manifest = build_manifest(
                model_parameters(model), hf_config_dict(self.vllm_config.model_config),  # type: ignore[attr-defined]
                self._ipcbridge_weight_version,
            )
            logger.info("ipcbridge: exported %d tensors (%d bytes), weight version %d",
                        len(manifest.tensors), manifest.total_bytes(), manifest.weight_version)
            return ok_reply(manifest.to_dict())
        except Exception as e:  # returned, not raised: Note [replies cross vLLM's msgpack channel]
            logger.warning("ipcbridge_manifest failed: %s", e)
            return error_reply(e)

    def ipcbridge_set_weight_version(self, version: int | str) -> str:
        """Record the weight version the trainer's fence just published (JSON reply with the version)."""
        try:
            self._ipcbridge_weight_version = parse_version(version)
            return ok_reply(self._ipcbridge_weight_version)
        except Exception as e:
            return error_reply(e)

    def ipcbridge_weight_version(self) -> str:
        """The weight version last recorded by :meth:`ipcbridge_set_weight_version` (JSON reply)."""
        return ok_reply(self._ipcbridge_weight_version)

    def ipcbridge_info(self) -> str:
        """Process and memory facts of the worker (JSON reply), for tests and benchmarks."""
        try:
            model = self._ipcbridge_model()
            return ok_reply({
                "pid": os.getpid(),
                "model_class": type(model).__name__,
                "device": str(next(model.parameters()).device),
                "memory_allocated": torch.cuda.memory_allocated() if torch.cuda.is_available() else 0,
                "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                "weight_version": self._ipcbridge_weight_version,
                "refusal": refusal_reason(self._ipcbridge_facts(model)),
            })
        except Exception as e:
            return error_reply(e)

    def ipcbridge_init_weights(self, seed: int | str = 0, std: float | str = 0.02) -> str:
        """Overwrite the weights in place with an HF-style random init: norms 1, biases 0, the rest
        N(0, ``std``) from ``seed``. For engines started on a bare config (``load_format="dummy"``), whose
        dummy weights (uniform in [-1e-3, 1e-3], norms included) make every logit ~0. JSON reply: count."""
        try:
            n = init_weights_(self._ipcbridge_model(), parse_version(seed), float(std))
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return ok_reply(n)
        except Exception as e:
            return error_reply(e)

    def ipcbridge_load_weights(self, manifest_json: str) -> str:
        """Copy-based weight sync, for comparison: copy a trainer's exported HF-named weights into the model.

        This is what frameworks do today (vLLM's ``rlhf_colocate`` example): the trainer exports handles of
        its *own* weights, the worker opens them and ``model.load_weights`` copies every tensor in (fusing
        q/k/v and gate/up on the way). Here the handles travel as an ipcbridge manifest (JSON, no pickle).
        Returns (JSON reply) the number of tensors and the seconds spent opening and loading.
        """
        from ipcbridge.handles import open_manifest
        from ipcbridge.manifest import Manifest

        try:
            t0 = time.perf_counter()
            manifest = Manifest.from_json(manifest_json)
            opened = open_manifest(manifest)
            t1 = time.perf_counter()
            try:
                loaded = self._ipcbridge_model().load_weights(iter(opened.tensors.items()))  # type: ignore[operator]
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
            finally:
                opened.close()
            t2 = time.perf_counter()
            return ok_reply({
                "tensors": len(manifest.tensors),
                "loaded": None if loaded is None else len(loaded),
                "open_s": t1 - t0,
                "load_s": t2 - t1,
            })
        except Exception as e:
            return error_reply(e)


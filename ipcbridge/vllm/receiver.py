"""ipcbridge's weight-stream receiver inside a vLLM worker: buckets land straight in the fused parameters.

A mixin for :class:`~ipcbridge.vllm.WorkerExtension` (which provides ``_ipcbridge_model`` and the weight
version). The trainer reaches it through the endpoints' ``collective_rpc`` (``ipcbridge.stream(llm, model)``
picks it when the engine runs the extension); the transfer itself is :mod:`ipcbridge.stream`'s, the engine
half :class:`~ipcbridge.stream.receiver.StreamReceiver`, reused as it is.

Note [why not load_weights]
    vLLM's own receiver (``NCCLWeightTransferEngine``) allocates every chunk, views it back into HF
    checkpoint tensors and hands them to ``model.load_weights`` under layerwise reload, which copies each
    into the fused parameter (q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``) one small kernel at
    a time; measured at 0.20x of the link on 2x H200. Here the trainer packs buckets already in the
    engine's fused layout (Note [packing from HF tensors] in :mod:`ipcbridge.stream.bridge`), so each
    received tensor is one ``copy_`` into the parameter with the same name, from two receive buffers that
    the receiver allocates per push at the plan's size and nothing else. The price: whole tensors only, so
    one worker (``tensor_parallel_size=1``); a TP > 1 engine is fed by vLLM's receiver, which shards on load.

Note [receiving after sleep]
    vLLM's sleep mode allocates the weights through its cumem allocator, which ``connect()`` cannot alias;
    on one GPU such an engine is fed through the trainer's shared buffer instead
    (:mod:`ipcbridge.stream.ipc`, :meth:`ipcbridge_stream_init_ipc`). ``sleep()`` releases the weights'
    memory and ``wake_up()`` maps it again, and a level-2 sleep or a reload may hand out new tensors, so
    nothing here keeps parameters across calls: every receive resolves the model's parameters afresh and
    re-checks the stream's plan against them (:meth:`StreamReceiver.rebind`). Writing into a sleeping
    engine would fault on unmapped memory; the trainer's side refuses to push while the engine reports
    itself asleep (``VllmReceiverEndpoint.pause``).

Ownership: the parameters stay the worker's; the receiver writes them in place (so vLLM's CUDA graphs,
which captured their addresses, stay valid) and keeps no reference to the trainer's buffers. The engine
is idle while a ``collective_rpc`` runs in its worker (the RPC is served between steps), which is the
pause :meth:`StreamReceiver.receive` asks for; the trainer's fence drains and holds generation around it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from ipcbridge.errors import BridgeError
from ipcbridge.stream.ipc import IpcStreamReceiver
from ipcbridge.stream.plan import StreamPlan
from ipcbridge.transports.cuda_ipc import device_uuid
from ipcbridge.vllm.rpc import parse_float, parse_int, worker_method
from ipcbridge.wire import dtype_name

logger = logging.getLogger(__name__)


class StreamReceiverMixin:
    """Worker methods that receive ``ipcbridge.stream()`` pushes. Every name is ``ipcbridge_``-prefixed
    (vLLM requires extension attributes to be new to its worker class)."""

    _ipcbridge_stream: IpcStreamReceiver | None = None

    def _ipcbridge_stream_params(self) -> dict[str, torch.Tensor]:
        parallel = self.vllm_config.parallel_config  # type: ignore[attr-defined]
        tp = getattr(parallel, "tensor_parallel_size", 1)
        pp = getattr(parallel, "pipeline_parallel_size", 1)
        if tp != 1 or pp != 1:
            raise BridgeError(
                f"ipcbridge's stream receiver writes whole tensors into one worker, and this engine has "
                f"tensor_parallel_size={tp}, pipeline_parallel_size={pp}. Fix: start the engine with vLLM's NCCL "
                "weight transfer (weight_transfer_config={'backend': 'nccl'}) and stream with receiver='vllm', "
                "whose receiver shards on load"
            )
        # The same tensors ``ipcbridge_manifest`` exports (``extension.model_parameters``), read here directly:
        # the extension imports this module, so this module must not import it back.
        params = dict(self._ipcbridge_model().named_parameters())  # type: ignore[attr-defined]
        if not params:
            raise BridgeError("the vLLM worker's model has no parameters to stream into")
        return params

    def _ipcbridge_receiver(self, new_stream: bool = False) -> IpcStreamReceiver:
        """The worker's receiver, bound to the parameters as they are now (Note [receiving after sleep]); the
        open stream's plan is re-checked against them unless a ``new_stream`` (checked itself) replaces it."""
        params = self._ipcbridge_stream_params()
        if self._ipcbridge_stream is None:
            self._ipcbridge_stream = IpcStreamReceiver(params, next(iter(params.values())).device)
        else:
            self._ipcbridge_stream.rebind(params, check=not new_stream)
        return self._ipcbridge_stream

    @worker_method
    def ipcbridge_stream_layout(self) -> dict[str, Any]:
        """Name, dtype and shape of every parameter (vLLM layout) and the weight version: what the trainer
        plans a stream from. Exports no memory, so it works where ``ipcbridge_manifest`` refuses (sleep
        mode, expandable segments)."""
        params = self._ipcbridge_stream_params()
        device = next(iter(params.values())).device
        return {
            "tensors": [[n, dtype_name(p.dtype), list(p.shape)] for n, p in params.items()],
            "weight_version": int(getattr(self, "_ipcbridge_weight_version", 0)),
            # Which GPU, by UUID (indices differ across CUDA_VISIBLE_DEVICES): the trainer streams through a
            # shared buffer when it is its own.
            "gpu_uuid": device_uuid(device.index or 0) if device.type == "cuda" else "",
        }

    @worker_method
    def ipcbridge_stream_init(self, stream_id: str, host: str, port: int | str, backend: str,
                              timeout: float | str, plan_json: str) -> None:
        """Check the trainer's plan against the parameters and join its group as rank 1 (blocks until joined)."""
        plan = StreamPlan.from_json(plan_json)
        self._ipcbridge_receiver(new_stream=True).init(str(stream_id), str(host), parse_int(port, "port", 1), str(backend),
                                        parse_float(timeout, "timeout"), plan.to_dict())

    @worker_method
    def ipcbridge_stream_init_ipc(self, stream_id: str, host: str, port: int | str, timeout: float | str,
                                  plan_json: str, buffers_json: str) -> None:
        """Check the trainer's plan, map its shared buffer (a manifest, JSON) once and connect to its store."""
        plan = StreamPlan.from_json(plan_json)
        self._ipcbridge_receiver(new_stream=True).init_ipc(str(stream_id), str(host), parse_int(port, "port", 1),
                                            parse_float(timeout, "timeout"), plan.to_dict(), str(buffers_json))

    @worker_method
    def ipcbridge_stream_receive(self, stream_id: str) -> dict[str, Any]:
        """Receive one push into the parameters; ``{"bytes", "seconds"}`` once every bucket is written."""
        try:
            receiver = self._ipcbridge_receiver()
        except Exception:
            # The trainer is already sending: close its stream here too (unmapping a shared buffer) rather
            # than keep it until the next one replaces it.
            if self._ipcbridge_stream is not None:
                self._ipcbridge_stream.close(wait=5.0)
            raise
        # Served between engine steps: nothing generates while this runs (see the module's docstring).
        return receiver.receive(str(stream_id), paused=True, lock=contextlib.nullcontext())

    @worker_method
    def ipcbridge_stream_close(self, stream_id: str) -> None:
        """Leave the trainer's group if it is still ``stream_id``'s (an empty id: any)."""
        if self._ipcbridge_stream is not None:
            self._ipcbridge_stream.close(str(stream_id) or None, wait=5.0)

    @worker_method
    def ipcbridge_stream_memory(self, reset: int | str = 0) -> dict[str, int]:
        """This worker's CUDA memory (bytes allocated now, peak since the last reset, reserved); ``reset=1``
        then starts a new peak. Works on every worker of a TP > 1 engine (for benchmarks and diagnostics)."""
        if not torch.cuda.is_available():
            return {"allocated": 0, "peak": 0, "reserved": 0}
        torch.cuda.synchronize()
        out = {"allocated": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated(),
               "reserved": torch.cuda.memory_reserved()}
        if parse_int(reset, "reset"):
            torch.cuda.reset_peak_memory_stats()
        return out

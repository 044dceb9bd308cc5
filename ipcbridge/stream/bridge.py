"""stream(): the fallback where the engine's memory cannot be shared, so the trainer owns its own weights.

``ipcbridge.connect`` aliases the engine's weights and needs no copy at all; use it whenever the trainer can
map them. Where it cannot (the engine on another GPU or node, MIG, vLLM sleep-mode allocations), the
trainer keeps its own HF model and ``ipcbridge.stream(engine, model)`` copies it into the engine's tensors
after each step: packed into buckets in the engine's layout and broadcast, double-buffered, over a private
process group (NCCL for CUDA weights, gloo for CPU ones). The plan is :mod:`ipcbridge.stream.plan`'s, the
wire protocol :mod:`ipcbridge.stream.protocol`'s and the group :mod:`ipcbridge.stream.group`'s; the engine's
side is :mod:`ipcbridge.stream.receiver`.

Note [the streaming fence]
    ``with sb.update(): optimizer.step()`` is the shared fence (Note [the fence] in :mod:`ipcbridge.fence`)
    with the transfer as its commit step:
      1. the model is checked against the plan (names, shapes, dtypes, tied weights) before the engine
         is touched, then the engine's pause is leased (no generation in flight);
      2. the block runs on the trainer's own weights. The engine's are untouched, so if the block raises,
         the engine just resumes (its version still moves forward, as on every resume) and the exception
         propagates;
      3. the trainer's device work is synchronised and the model checked again;
      4. the engine receives, through an RPC that blocks until its last bucket is loaded and so runs in a
         background thread, while this thread packs and broadcasts the buckets;
      5. the lease is released: the engine drops caches of the old weights, moves its version forward and
         lets generation continue.
    If step 4 fails, the engine's weights may be partly written. The engine still resumes (it must not stay
    paused) at a new version, so nothing computed from the old weights survives; both sides close the
    stream, and ``BridgeError`` says to open a new stream and ``push()``.

Note [packing from HF tensors]
    The plan is in the engine's (vLLM) layout. Building that layout with ``mapping.to_vllm`` would copy
    every fused and padded tensor once per push, and packing would copy it again. Instead each bucket slice
    of the send buffer is viewed under HF names with ``mapping.hf_views`` (the very views ``attach`` binds)
    and the trainer's HF tensors are copied straight into them: q, k and v land in their rows of
    ``qkv_proj``, a vocab tensor in the first ``vocab_size`` rows of its padded one. Rows no HF tensor
    covers (vocab padding) are zeroed, as ``to_vllm`` pads. One copy per push, into the buffer that goes
    on the wire, and no second mapping to keep in step with the tables.
"""

from __future__ import annotations

import logging
import secrets
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn

from ipcbridge import mapping
from ipcbridge.endpoints import CanReceiveStream, Endpoint, resolve_endpoint
from ipcbridge.errors import BridgeError
from ipcbridge.fence import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_WAIT_SECONDS,
    Fence,
    check_settings,
    cuda_devices,
    synchronize,
)
from ipcbridge.manifest import Manifest
from ipcbridge.stream.calls import EngineCall, failure
from ipcbridge.stream.group import TorchGroup, check_backend, master_store
from ipcbridge.stream.layout import Layout, check_fits, engine_layout
from ipcbridge.stream.plan import Bucket, StreamPlan, plan_buckets, unpack
from ipcbridge.stream.protocol import READY_KEY, new_buffers, send

logger = logging.getLogger(__name__)

def _model_device(model: nn.Module) -> torch.device:
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        raise BridgeError(
            f"the model's parameters are on {sorted(map(str, devices)) or 'no device'}; stream() needs a model "
            "with parameters, all on one device: model.to(device)"
        )
    (device,) = devices
    if device.type == "meta":
        raise BridgeError("the model's parameters are on the meta device (no values to stream); load its weights first")
    return device


class StreamBridge:
    """A trainer-owned HF model streaming its weights into an engine. Make one with :func:`ipcbridge.stream`.

    ``with sb.update(): opt.step()`` fences a step and copies the new weights into the engine (Note [the
    streaming fence]); :meth:`push` copies the current weights without a step. ``bytes_sent`` and
    ``push_seconds`` count the transfers; :meth:`stats` sums them up.
    """

    def __init__(self, endpoint: Endpoint, model: nn.Module, weight_version: int, *, plan: StreamPlan,
                 backend: str, timeout: float, host: str, lease_seconds: float = DEFAULT_LEASE_SECONDS,
                 wait: float = DEFAULT_WAIT_SECONDS) -> None:
        self.endpoint = endpoint
        self.model = model
        self.plan = plan
        self.backend = backend
        self.timeout = timeout
        self.host = host
        #: Names this stream in the engine, which serves one stream at a time: the newest.
        self.stream_id = secrets.token_hex(8)
        self.bytes_sent = 0
        self.push_seconds: list[float] = []
        self.connect_seconds = 0.0
        self._config = model.config
        self._layout = self._make_layout(plan, model)
        self._tied_names = frozenset(a for a, _ in self._layout.tied)
        self._device = _model_device(model)
        # NCCL and a shared buffer (backend "ipc") carry the model's own device; gloo goes through host memory.
        self._buffer_device = self._device if backend in ("nccl", "ipc") else torch.device("cpu")
        self._group: Any = None  # a TorchGroup, or a CommGroup into vLLM's receiver: a Group with close(abort)
        self._params: dict[str, torch.Tensor] = {}  # the model's tensors, during a push only
        #: The two send buffers, allocated at the first push and kept until close: pushes allocate nothing.
        self._buffers: list[torch.Tensor] | None = None
        #: (bucket, buffer) -> (views to zero, (HF name, view) to copy into): views of ``_buffers``, dropped with them.
        self._packing: dict[tuple[int, int], tuple[list[torch.Tensor], list[tuple[str, torch.Tensor]]]] = {}
        #: The engine's own time per push, first post to last load (no RPC legs): the transfer itself.
        self.receive_seconds: list[float] = []
        self._closed = False
        self._fence = Fence(endpoint, holder=f"stream {self.stream_id} ({endpoint.name})",
                            version=weight_version, sync=lambda: synchronize(cuda_devices(self.model.parameters())),
                            lease_seconds=lease_seconds, wait=wait)

    @staticmethod
    def pick_backend(backend: str | None, device: torch.device) -> str:
        """``backend``, or the default for a model on ``device``, if it can carry that device's buffers."""
        return check_backend(backend or ("nccl" if device.type == "cuda" else "gloo"), device)

    def _make_layout(self, plan: StreamPlan, model: nn.Module) -> Layout:
        """The HF parameters the plan takes (a subclass whose plan is in HF names overrides this)."""
        return engine_layout(plan, model.config)

    def _send_buffers(self) -> list[torch.Tensor]:
        if self._buffers is None:
            self._buffers = new_buffers(self.plan, self._buffer_device)
        return self._buffers

    @property
    def weight_version(self) -> int:
        """The weight version the engine published at this stream's last resume (the manifest's before)."""
        return self._fence.version

    def renew(self) -> None:
        """Extend the current update's lease by its length (for a block that takes longer than it)."""
        self._fence.renew()

    # -- checks --------------------------------------------------------------------------------------

    def _check_model(self) -> dict[str, torch.Tensor]:
        """The model's tensors by HF name, or ``BridgeError`` if they no longer fit the engine's weights."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        check_fits(self._layout, params)
        if self.backend in ("nccl", "ipc"):
            on = {str(p.device) for p in params.values()} - {str(self._device)}
            if on:
                raise BridgeError(f"parameters moved to {sorted(on)}; the stream packs on {self._device}. Fix: "
                                  f"model.to('{self._device}')")
        return {n: p.detach() for n, p in params.items()}

    def _require_open(self) -> TorchGroup:
        if self._closed or self._group is None:
            raise BridgeError("this weight stream is closed (close() or a failed push); open a new one with "
                              "ipcbridge.stream(engine, model)")
        return self._group

    # -- connecting ----------------------------------------------------------------------------------

    def _connect(self) -> None:
        try:
            store = master_store(self.host, self.timeout)
        except Exception as e:  # torch raises several types for bind and address errors
            raise BridgeError(f"cannot serve the stream rendezvous on {self.host} ({e}); pass host= an address "
                              "of this machine that the engine can reach") from e
        call = EngineCall(lambda: self._engine_init(store.port), "stream_init")
        fix = ("Fix: check the engine's log, that it can reach "
               f"{self.host}, and for NCCL that the two ranks use distinct GPUs")
        # The engine sets READY_KEY only once it accepted the request: until then a refusal can still arrive,
        # and joining the group first would block until the timeout instead of reporting it.
        deadline = time.monotonic() + self.timeout
        while not store.check([READY_KEY]):
            # An engine that sets the key and returns (the shared-buffer init) may finish between the two reads:
            # a finished call is a refusal only if the key is still not there.
            if call.done() and not store.check([READY_KEY]):
                raise failure("opening the weight stream", None, call.error, fix)
            if time.monotonic() > deadline:
                raise BridgeError(f"the engine did not join the weight stream within {self.timeout:.0f}s. {fix}")
            time.sleep(0.005)
        try:
            group = self._join(store)
        except Exception as e:
            raise call.failed(e, "opening the weight stream", fix) from e
        call.finish(None, "opening the weight stream", fix, abort=lambda: group.close(abort=True))
        self._group = group

    def _engine_init(self, port: int) -> None:
        """Ask the engine to check the plan and join at ``port`` (in the RPC thread)."""
        self.endpoint.stream_init(self.stream_id, host=self.host, port=port,  # type: ignore[attr-defined]
                                  backend=self.backend, timeout=self.timeout, plan=self.plan.to_dict())

    def _join(self, store: Any) -> Any:
        """Join the group (a ``Group`` with ``close(abort)``) as rank 0, once the engine accepted the stream."""
        return TorchGroup.join(store, 0, 2, self.backend, self.timeout, self.host)

    # -- pushing -------------------------------------------------------------------------------------

    def _pack(self, bucket: Bucket, out: torch.Tensor) -> None:
        """Fill ``out`` with ``bucket``'s engine tensors, straight from HF tensors (Note [packing from HF tensors])."""
        key = (id(bucket), out.data_ptr())
        if key not in self._packing:  # resolved once per bucket and buffer: each push only copies
            views = unpack(out, bucket)
            self._packing[key] = (
                [views[n] for n in bucket.names if n in self._layout.zero],
                # a tied view is the very tensor of the one it is tied to: copied once, under that name
                [(n, v) for n, v in mapping.hf_views(views, self._config).items() if n not in self._tied_names])
        zeros, copies = self._packing[key]
        for view in zeros:
            view.zero_()
        for name, view in copies:
            view.copy_(self._params[name])

    def _transfer(self, params: dict[str, torch.Tensor]) -> None:
        group = self._require_open()
        t0 = time.perf_counter()
        rpc_timeout = self.timeout * (len(self.plan.buckets) + 2)
        call = EngineCall(lambda: self.endpoint.stream_receive(self.stream_id, timeout=rpc_timeout),
                          "stream_receive", on_error=getattr(group, "interrupt", None))
        fix = ("The engine's weights may be partly updated and this stream is closed. Fix: check the engine (its "
               "log), then open a new stream with ipcbridge.stream(engine, model) and push()")
        # No timeout of our own after the last bucket: the RPC's bounds the engine's half.
        self.bytes_sent += self._send(group, params, call, "streaming weights to the engine", fix, None)
        self.push_seconds.append(time.perf_counter() - t0)
        if isinstance(call.result, dict) and isinstance(call.result.get("seconds"), float):
            self.receive_seconds.append(call.result["seconds"])

    def _send(self, group: Any, params: dict[str, torch.Tensor], call: EngineCall, what: str, fix: str,
              timeout: float | None) -> int:
        """Pack ``params`` and broadcast every bucket while ``call`` (the engine's receiving half) runs, then
        wait up to ``timeout`` for it; the bytes sent. Either half failing aborts the group and raises."""
        self._params = params
        try:
            nbytes = send(group, self._pack, self.plan, device=self._buffer_device, buffers=self._send_buffers())
        except BaseException as e:
            self._close_group(abort=True)  # the engine's pending receives fail now, not at the timeout
            error = call.failed(e, what, fix)
            if not isinstance(e, Exception):
                raise
            raise error from e
        finally:
            self._params = {}
        call.finish(timeout, what, fix, abort=lambda: self._close_group(abort=True))
        return nbytes

    @contextmanager
    def update(self) -> Iterator[StreamBridge]:
        """Fence a step on the trainer's model and stream the result into the engine.

        See Note [the streaming fence]. Raises ``BridgeError`` if the model no longer fits the engine's
        weights or the transfer fails, and ``FenceError`` as :meth:`ipcbridge.Bridge.update` does.
        """
        self._require_open()
        self._check_model()  # a mismatch leaves the engine alone
        with self._fence.hold(commit=lambda: self._transfer(self._check_model())):
            yield self

    def push(self) -> None:
        """Stream the model's current weights into the engine (no step): ``with self.update(): pass``."""
        with self.update():
            pass

    # -- the rest ------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "buckets": len(self.plan.buckets),
            "bucket_bytes": self.plan.bucket_bytes,
            "buffer_bytes": self.plan.buffer_bytes,
            "wire_bytes_per_push": self.plan.wire_bytes,
            "pushes": len(self.push_seconds),
            "bytes_sent": self.bytes_sent,
            "push_seconds_total": sum(self.push_seconds),
            "push_seconds_median": statistics.median(self.push_seconds) if self.push_seconds else None,
            "receive_seconds_median": statistics.median(self.receive_seconds) if self.receive_seconds else None,
            "connect_seconds": self.connect_seconds,
            "weight_version": self.weight_version,
        }

    def _close_group(self, abort: bool = False) -> None:
        self._buffers, self._packing = None, {}
        group, self._group = self._group, None
        if group is not None:
            group.close(abort=abort)

    def close(self) -> None:
        """Close the stream on both sides. The engine keeps running with the weights it has."""
        if self._closed:
            return
        self._closed = True
        self._buffers, self._packing = None, {}
        group, self._group = self._group, None
        if group is not None:
            # Both ends at once: an NCCL close waits for the peer's (Note [closing an NCCL group takes both
            # sides] in ipcbridge.stream.group), and the engine closes its end inside the RPC below.
            closer = threading.Thread(target=group.close, name="ipcbridge-stream-close", daemon=True)
            closer.start()
            try:
                self.endpoint.stream_close(self.stream_id)
            except BridgeError as e:  # a dead engine has nothing left to close
                logger.info("the engine did not close its side of the stream: %s", e)
            closer.join()  # bounded by the group's own wait
        self.endpoint.close()

    def __enter__(self) -> StreamBridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _announced_tensors(endpoint: Any) -> tuple[list[tuple[str, Any, Any]], int]:
    """(name, dtype, shape) of every engine tensor in the 'vllm' layout, and the engine's weight version.

    ``stream_layout()`` where the endpoint has it (it exports no memory, so it works where a manifest is
    refused, e.g. vLLM in sleep mode); else the manifest.
    """
    layout = getattr(endpoint, "stream_layout", None)
    if callable(layout):
        return layout()
    manifest: Manifest = endpoint.manifest()
    if manifest.layout != "vllm":
        raise BridgeError(f"the engine exports the {manifest.layout!r} layout; stream() fills 'vllm'-layout "
                          "engines. Export the engine's weights in the 'vllm' layout")
    return [(t.name, t.dtype, t.shape) for t in manifest.tensors], manifest.weight_version


_B = TypeVar("_B", bound=StreamBridge)


def open_stream(make: Callable[[], _B], endpoint: Any) -> _B:
    """``make()`` a bridge, check the model and join the engine. ``endpoint`` is closed if any of it fails:
    the bridge owns it only once open. ``connect_seconds`` counts all of it."""
    t0 = time.perf_counter()
    try:
        sb = make()
        sb._check_model()  # a mismatch surfaces here, before the engine joins anything
        sb._connect()
    except BaseException:
        endpoint.close()
        raise
    sb.connect_seconds = time.perf_counter() - t0
    return sb


def stream_engine(target: Any, model: nn.Module, *, bucket_bytes: int | None = None,
                  backend: str | None = None, timeout: float = 120.0, host: str = "127.0.0.1",
                  lease_seconds: float = DEFAULT_LEASE_SECONDS, wait: float = DEFAULT_WAIT_SECONDS,
                  bridge_cls: type[StreamBridge] | None = None) -> StreamBridge:
    """Stream a trainer-owned HF ``model`` into ``target``'s weights, where they cannot be shared.

    ``bridge_cls``: :class:`StreamBridge` (a process group) by default; ``IpcStreamBridge`` for a shared
    buffer on the trainer's own GPU (:mod:`ipcbridge.stream.ipc`). ``target``: an engine that can receive
    streamed weights (a :class:`~ipcbridge.LocalEngine`). ``model`` stays the trainer's own; it must match
    the engine's model (names, shapes, dtypes). ``backend``: ``"nccl"`` (default for CUDA models; the engine
    must be on another GPU) or ``"gloo"`` (default on CPU; works for any devices, through host memory).
    ``bucket_bytes``: target size of one broadcast (default: Note [bucket policy]); the two buffers on each
    side are that large, or as large as the largest tensor if it is larger. ``timeout`` bounds joining and
    every broadcast; ``host`` is where this process serves the rendezvous. Nothing is sent until
    :meth:`StreamBridge.update` or :meth:`StreamBridge.push`. ``lease_seconds`` and ``wait`` are the
    fence's, as for :func:`ipcbridge.connect`.
    """
    check_settings(lease_seconds, wait)  # before the engine is asked anything
    endpoint = resolve_endpoint(target)
    cls = bridge_cls or StreamBridge

    def make() -> StreamBridge:
        if not isinstance(endpoint, CanReceiveStream):
            raise BridgeError(
                f"endpoint {endpoint.name!r} cannot receive streamed weights (it has no stream_init, "
                "stream_receive, stream_close); stream() works with ipcbridge.LocalEngine and vLLM engines. Where "
                "the memory can be shared, use ipcbridge.connect()"
            )
        chosen = cls.pick_backend(backend, _model_device(model))
        specs, version = _announced_tensors(endpoint)
        return cls(endpoint, model, version, plan=plan_buckets(specs, bucket_bytes), backend=chosen,
                   timeout=timeout, host=host, lease_seconds=lease_seconds, wait=wait)

    sb = open_stream(make, endpoint)
    logger.info("streaming %d tensors in %d bucket(s) of <= %d bytes over %s (connected in %.3fs)",
                len(sb.plan.slots), len(sb.plan.buckets), sb.plan.buffer_bytes, sb.backend, sb.connect_seconds)
    return sb

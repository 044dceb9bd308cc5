"""``ipcbridge.stream(target, model)``: pick the receiver for the target and open the stream.

Note [two receivers in vLLM]
    A vLLM engine (``vllm.LLM``, ``AsyncLLM``, or ``vllm serve`` by URL) can be fed two ways:
      - ``receiver="ipcbridge"``: the engine runs ipcbridge's worker extension
        (:mod:`ipcbridge.vllm.receiver`); buckets are packed in the engine's fused layout and each tensor is
        one ``copy_`` into its parameter. Fastest; one worker only (TP = PP = 1); its group times out, so a
        dead trainer never blocks the engine.
      - ``receiver="vllm"``: the engine was started with vLLM's NCCL weight transfer and has no ipcbridge
        code at all (:mod:`ipcbridge.stream.stock`); HF tensors are sent and vLLM's ``load_weights`` fuses
        and shards them, so TP > 1 engines are fed too.
    ``receiver=None`` takes ipcbridge's where the engine answers its ``ipcbridge_stream_layout`` (extension
    present, one worker), else vLLM's. Both share the fence and :func:`~ipcbridge.stream.protocol.send`.

Note [one GPU: the shared buffer]
    NCCL cannot broadcast between two processes on one GPU, and an engine there that ``connect()`` refuses
    (sleep mode, ``expandable_segments``) cannot be aliased either. ipcbridge's receiver then takes the
    stream through a buffer the trainer shares over CUDA IPC (:mod:`ipcbridge.stream.ipc`):
    ``receiver="ipc"``, or by itself where the worker reports the trainer's own GPU (by UUID). The engine
    endpoint is built for streaming (``streaming=True``), which skips the aliasing-only refusals: sleep
    mode is exactly the engine this path is for.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
from torch import nn

from ipcbridge import mapping
from ipcbridge.endpoints import resolve_endpoint
from ipcbridge.errors import BridgeError, MappingError
from ipcbridge.fence import DEFAULT_LEASE_SECONDS, DEFAULT_WAIT_SECONDS, check_settings
from ipcbridge.manifest import Manifest
from ipcbridge.stream.bridge import StreamBridge, _model_device, open_stream, stream_engine
from ipcbridge.stream.controls import AsyncLLMControl, HttpControl, LLMControl, StockControl
from ipcbridge.stream.ipc import IpcStreamBridge
from ipcbridge.stream.layout import fits_engine
from ipcbridge.stream.plan import plan_vllm_chunks
from ipcbridge.stream.stock import VLLM_BUFFER_BYTES, StockStreamBridge, StockWire, hf_specs, parse_version
from ipcbridge.transports.cuda_ipc import device_uuid, normalize_uuid

logger = logging.getLogger(__name__)

RECEIVERS = ("ipcbridge", "vllm", "ipc")


def _vllm_object(target: Any) -> bool:
    return type(target).__module__.split(".")[0] == "vllm"


def _is_vllm(target: Any) -> bool:
    return (isinstance(target, str) and target.startswith(("http://", "https://"))) or _vllm_object(target)


class VllmReceiverEndpoint:
    """A vLLM endpoint whose worker runs :class:`~ipcbridge.vllm.receiver.StreamReceiverMixin`, as the
    :class:`~ipcbridge.endpoints.CanReceiveStream` endpoint :class:`StreamBridge` drives. The fence's calls
    go to the wrapped endpoint unchanged."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = f"{inner.name} (ipcbridge receiver)"
        #: The worker's GPU by UUID ("" for CPU weights), as of the last :meth:`stream_layout`.
        self.gpu_uuid = ""

    def stream_layout(self) -> tuple[list[tuple[str, str, list[int]]], int]:
        self.inner.tell_worker_version()  # the layout carries the worker's version
        d = self.inner.rpc("ipcbridge_stream_layout")
        try:
            specs = [(str(n), str(dt), [int(x) for x in shape]) for n, dt, shape in d["tensors"]]
            version = int(d["weight_version"])
            self.gpu_uuid = str(d.get("gpu_uuid", ""))
        except (TypeError, KeyError, ValueError, AttributeError) as e:
            raise BridgeError(f"{self.inner.where} answered ipcbridge_stream_layout with {str(d)[:200]!r} ({e}); is "
                              "the same ipcbridge version installed in the engine?") from None
        self.inner.heard_version(version)
        return specs, version

    def manifest(self) -> Manifest:
        return self.inner.manifest()

    def stream_init(self, stream_id: str, *, host: str, port: int, backend: str, timeout: float,
                    plan: dict[str, Any]) -> None:
        self.inner.rpc("ipcbridge_stream_init", stream_id, host, port, backend, timeout,
                       json.dumps(plan, separators=(",", ":")))

    def stream_init_ipc(self, stream_id: str, *, host: str, port: int, timeout: float, plan: dict[str, Any],
                        buffers: str) -> None:
        self.inner.rpc("ipcbridge_stream_init_ipc", stream_id, host, port, timeout,
                       json.dumps(plan, separators=(",", ":")), buffers)

    def stream_receive(self, stream_id: str, *, timeout: float) -> dict[str, Any]:
        return self.inner.rpc("ipcbridge_stream_receive", stream_id)

    def stream_close(self, stream_id: str) -> None:
        self.inner.rpc("ipcbridge_stream_close", stream_id)

    def pause(self, lease: Any, wait: float) -> None:
        if engine_asleep(self.inner):  # Note [receiving after sleep] in ipcbridge.vllm.receiver
            raise BridgeError(f"{self.name} is asleep (vLLM sleep mode): its weights are not in GPU memory. Fix: "
                              "engine.wake_up() before pushing")
        self.inner.pause(lease, wait)

    def renew(self, lease: Any) -> None:
        self.inner.renew(lease)

    def resume(self, lease: Any) -> int:
        return self.inner.resume(lease)

    def cancel(self, lease: Any) -> None:
        self.inner.cancel(lease)

    def close(self) -> None:
        self.inner.close()


def engine_asleep(inner: Any) -> bool:
    """Whether the vLLM engine behind ``inner`` (an ``ipcbridge.vllm`` endpoint) says it is asleep; ``False``
    where it cannot tell (a release without ``is_sleeping``, ``vllm serve`` without dev mode)."""
    try:
        if hasattr(inner, "llm"):
            engine = getattr(inner.llm, "llm_engine", None)
            probe = getattr(engine, "is_sleeping", None)
            return bool(probe()) if callable(probe) and _sleep_mode(engine) else False
        if hasattr(inner, "engine") and hasattr(inner, "_run"):
            probe = getattr(inner.engine, "is_sleeping", None)
            return bool(inner._run(probe())) if callable(probe) and _sleep_mode(inner.engine) else False
        if hasattr(inner, "request"):
            resp = inner.request("GET", "/is_sleeping")
            return isinstance(resp, dict) and resp.get("is_sleeping") is True
    except BridgeError as e:
        logger.debug("cannot tell whether %s is asleep: %s", getattr(inner, "name", inner), e)
    return False


def _sleep_mode(engine: Any) -> bool:
    """Whether an in-process engine may sleep at all (else asking it, one engine-core call per push, is moot)."""
    model_config = getattr(getattr(engine, "vllm_config", None), "model_config", None)
    return bool(getattr(model_config, "enable_sleep_mode", True))


def _streaming_endpoint(target: Any) -> Any:
    """The endpoint of ``target`` for streaming: for ``LLM``/``AsyncLLM`` without the aliasing-only refusals
    (Note [one GPU: the shared buffer]); anything else as :func:`~ipcbridge.endpoints.resolve_endpoint` has it."""
    if _vllm_object(target):
        from ipcbridge.vllm.endpoints import endpoint_for

        return endpoint_for(target, streaming=True)
    return resolve_endpoint(target)


def _ipcbridge_endpoint(target: Any, required: bool) -> VllmReceiverEndpoint | None:
    """The engine's ipcbridge receiver, or ``None`` (if not ``required``) when it has none."""
    try:
        inner = _streaming_endpoint(target)
        ep = inner if isinstance(inner, VllmReceiverEndpoint) else VllmReceiverEndpoint(inner)
        ep.stream_layout()  # answers only with the extension and one worker
        return ep
    except BridgeError as e:
        if required:
            raise
        logger.info("streaming through vLLM's own receiver: the engine has no usable ipcbridge receiver (%s)", e)
        return None


def check_stock_fit(target: Any, model: nn.Module, ask_extension: bool = True) -> None:
    """``BridgeError`` before anything is sent if ``model`` does not fit the stock engine ``target``.
    ``ask_extension=False``: the caller already found no ipcbridge extension to ask.

    Note [vLLM's receiver is not transactional]
        vLLM's own receiver learns names and shapes only while it loads, through ``load_weights`` with
        layerwise reload. A mismatch raises there after some layers were already taken apart for reloading:
        on vLLM 0.25.1 the next forward met meta tensors and the EngineCore died (H200, 2026-11-30). So the
        trainer checks first: against the engine's own tensors where it also runs ipcbridge's extension, else
        against the HF model that an in-process ``LLM``/``AsyncLLM``'s config builds. A ``vllm serve``
        without the extension cannot be asked; that is logged, and a mismatch there is the engine's to survive.
    """
    ep = _ipcbridge_endpoint(target, required=False) if ask_extension else None
    if ep is not None:
        try:
            fits_engine(ep.stream_layout()[0], model)
        finally:
            if target not in (ep, getattr(ep, "inner", None)):  # only what was opened here; the caller's stays
                ep.close()
        return
    engine = getattr(target, "llm_engine", target)
    theirs = getattr(getattr(engine, "model_config", None), "hf_config", None)
    try:
        shapes = mapping.hf_parameter_shapes(theirs)[0] if theirs is not None else None
    except (MappingError, ValueError) as e:  # a config transformers has no causal LM for
        logger.warning("cannot build the engine's HF model from its config (%s)", e)
        shapes = None
    if shapes is None:
        logger.warning("cannot check that the model fits %r before streaming into vLLM's receiver (no ipcbridge "
                       "extension, no HF config in this process); a mismatch would fail inside vLLM's load", target)
        return
    mine = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    differ = sorted(n for n in shapes.keys() | mine.keys() if shapes.get(n) != mine.get(n))
    if differ:
        raise BridgeError(
            f"the trainer's model does not fit the engine's: {len(differ)} parameter(s) differ, e.g. {differ[0]}: "
            f"{mine.get(differ[0])} in the trainer's model, {shapes.get(differ[0])} in the model of the engine's "
            "config. vLLM's receiver would fail halfway through loading and leave the engine unable to serve "
            "(Note [vLLM's receiver is not transactional]). Fix: stream the model the engine serves (same config)"
        )


def stock_control(target: Any, timeout: float) -> StockControl:
    """The control of a stock vLLM engine: an ``LLM``, an ``AsyncLLM`` or a ``vllm serve`` URL."""
    if isinstance(target, str):
        return HttpControl(resolve_endpoint(target), transfer_timeout=timeout)
    kind = type(target).__name__
    if kind == "LLM":
        return LLMControl(target)
    if kind == "AsyncLLM":
        return AsyncLLMControl(target)
    raise BridgeError(f"ipcbridge cannot stream into a {type(target).__module__}.{kind}; pass a vllm.LLM, an AsyncLLM "
                      "or the http://host:port of vllm serve")


def open_stock(control: StockControl, model: nn.Module, *, bucket_bytes: int | None, timeout: float, host: str,
               lease_seconds: float, wait: float, bridge_cls: type[StockStreamBridge] = StockStreamBridge
               ) -> StockStreamBridge:
    """Open a stream into a stock vLLM engine's own NCCL receiver through ``control`` (Note [two receivers in
    vLLM]). Closes ``control`` if it fails. ``bridge_cls`` is for tests (another rendezvous)."""

    def make() -> StockStreamBridge:
        wire = StockWire(parse_version(control.version()), buffer_bytes=bucket_bytes or VLLM_BUFFER_BYTES)
        plan = plan_vllm_chunks(list(hf_specs(model)), wire.buffer_bytes)
        return bridge_cls(control, model, wire=wire, plan=plan, timeout=timeout, host=host,
                          lease_seconds=lease_seconds, wait=wait)

    sb = open_stream(make, control)
    logger.info("streaming %d HF tensors into vLLM %d.%d's receiver in %d chunk(s) of <= %d bytes",
                len(sb.plan.slots), *sb.wire.version, len(sb.plan.buckets), sb.plan.buffer_bytes)
    return sb


def stream(target: Any, model: nn.Module, *, bucket_bytes: int | None = None, backend: str | None = None,
           timeout: float = 120.0, host: str = "127.0.0.1", lease_seconds: float = DEFAULT_LEASE_SECONDS,
           wait: float = DEFAULT_WAIT_SECONDS, receiver: str | None = None) -> StreamBridge:
    """Stream a trainer-owned HF ``model`` into ``target``'s weights, where they cannot be shared.

    ``target``: a :class:`~ipcbridge.LocalEngine`, a ``vllm.LLM``, an ``AsyncLLM`` or the ``http://`` URL of
    ``vllm serve``. ``receiver`` (vLLM only): ``"ipcbridge"``, ``"vllm"``, ``"ipc"`` (ipcbridge's, through a
    shared buffer on the trainer's GPU) or ``None`` to pick (Note [two receivers in vLLM], Note [one GPU:
    the shared buffer]). ``bucket_bytes``: the size of one broadcast (default for ipcbridge's receivers:
    1/16 of the model, at least 256 MiB, at most its largest tensor, Note [bucket policy]; for vLLM's, its
    own 1 GiB, which must agree with it). ``backend``: ``"nccl"`` or ``"gloo"`` for ipcbridge's receivers
    (vLLM's is NCCL only), ``"ipc"`` for the shared buffer. ``timeout`` bounds
    joining, every broadcast and every engine call; ``host`` is where this process serves the rendezvous.
    ``lease_seconds`` and ``wait`` are the fence's, as for :func:`ipcbridge.connect`. Returns a bridge
    with ``update()``, ``push()``, ``stats()`` and ``close()``; nothing is sent before the first push.
    """
    check_settings(lease_seconds, wait)
    if receiver is not None and receiver not in RECEIVERS:
        raise BridgeError(f"unknown receiver {receiver!r}; use one of {RECEIVERS} or None")
    ipc = receiver == "ipc" or backend == "ipc"
    if receiver == "vllm" and ipc:
        raise BridgeError("vLLM's own receiver takes NCCL only; the shared buffer (backend='ipc') needs ipcbridge's "
                          "worker extension (receiver='ipc')")
    kw: dict[str, Any] = {"timeout": timeout, "host": host, "lease_seconds": lease_seconds, "wait": wait,
                          "bucket_bytes": bucket_bytes}
    if not _is_vllm(target):
        if receiver == "vllm":
            raise BridgeError("receiver='vllm' streams into a vLLM engine; this target is not one")
        return stream_engine(target, model, backend=backend, bridge_cls=IpcStreamBridge if ipc else None, **kw)
    if receiver != "vllm":
        ep = _ipcbridge_endpoint(target, required=receiver in ("ipcbridge", "ipc"))
        if ep is not None:
            ipc = ipc or (backend is None and _same_gpu(ep, model))
            return stream_engine(ep, model, backend=backend, bridge_cls=IpcStreamBridge if ipc else None, **kw)
    if backend not in (None, "nccl"):
        raise BridgeError(f"vLLM's own receiver takes NCCL only (backend={backend!r}); use ipcbridge's receiver "
                          "(worker extension) for gloo")
    device = _model_device(model)
    if device.type != "cuda":
        raise BridgeError(f"vLLM's NCCL receiver takes CUDA tensors and the model is on {device}; model.to('cuda')")
    kw.pop("bucket_bytes")
    check_stock_fit(target, model, ask_extension=receiver == "vllm")  # else asked just above
    return open_stock(stock_control(target, timeout), model, bucket_bytes=bucket_bytes, **kw)


def _same_gpu(ep: VllmReceiverEndpoint, model: nn.Module) -> bool:
    """Whether the engine's worker runs on the model's GPU (by UUID: Note [devices by UUID])."""
    device = _model_device(model)
    if device.type != "cuda" or not ep.gpu_uuid:
        return False
    index = torch.cuda.current_device() if device.index is None else device.index
    return normalize_uuid(ep.gpu_uuid) == device_uuid(index)

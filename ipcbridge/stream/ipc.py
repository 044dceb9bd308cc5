"""Streaming on one GPU where the engine's memory cannot be shared: through a trainer-owned CUDA IPC buffer.

``connect()`` aliases the engine's weights through legacy CUDA IPC, which vLLM's sleep mode (cumem
allocations) and ``expandable_segments`` rule out, and NCCL cannot broadcast between two processes on one
GPU. This path needs neither: the *trainer* allocates one bounded buffer with the ordinary caching
allocator (whose memory does have a legacy IPC handle), exports it through the manifest machinery
(:func:`ipcbridge.handles.export`: JSON, no pickle), and the engine's worker maps it once per stream. Each
push then runs :func:`~ipcbridge.stream.protocol.send`/:func:`~ipcbridge.stream.protocol.receive`
unchanged, over :class:`IpcChannel` instead of a process group: the trainer packs a bucket straight into
one half of the shared buffer, the worker copies it out into its parameters with the plan's views.
On CPU the same code runs over the shm transport (how the tests exercise it).

Note [the IPC channel]
    The buffer's two halves are the protocol's two buffers (Note [double buffering] in
    :mod:`ipcbridge.stream.protocol`); what a broadcast would carry, the halves already hold, so the
    channel only signals, through the rendezvous ``TCPStore`` the trainer serves: rank 0's broadcast of
    bucket *i* synchronises the trainer's stream (the packing kernels are done) and sets ``ready/<i%2>``
    to *i*; its ``wait()`` waits for ``done/<i%2>`` = *i*, so the half is rewritten only after the worker
    has copied it out. Rank 1's ``wait()`` waits for ``ready/<i%2>`` = *i*; after loading the bucket it
    synchronises its own stream and sets ``done/<i%2>`` (:meth:`IpcChannel.loaded`). Each key is set by one
    side and read and deleted by the other, strictly alternating per half, so no key outlives a push and
    the two sides cannot pass each other. Sequence numbers count every bucket since the stream opened: a
    mismatch (the sides out of step) fails the transfer instead of loading the wrong bytes. The host
    syncs cost tens of microseconds per bucket; packing bucket *i+1* still overlaps copying bucket *i*.

Note [who notices a failure]
    The worker waits on the trainer's store: if the trainer dies or closes the stream, the store's server
    goes with it and the worker's wait fails at once; a trainer that is alive but stuck is caught by the
    timeout. The trainer waits on the worker: a failed or refused receive ends the engine RPC with an
    error, and :meth:`IpcChannel.interrupt` (called from that RPC's thread) sets both ``done`` keys to a
    value no bucket has, so the trainer's wait returns at once and fails; a stuck worker is caught by the
    timeout. Either way both sides close and the engine resumes (Note [the streaming fence]).

Ownership: the trainer owns the buffer; the worker's mapping keeps the memory alive until the worker
closes the stream (torch's IPC ref counter, Note [the producer keeps the memory] in
:mod:`ipcbridge.transports.cuda_ipc`). Views of a half go stale at the next-but-one bucket.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

import torch

from ipcbridge.errors import BridgeError, ManifestError
from ipcbridge.handles import OpenedManifest, export, open_manifest
from ipcbridge.manifest import Manifest
from ipcbridge.stream.bridge import StreamBridge
from ipcbridge.stream.group import client_store
from ipcbridge.stream.plan import StreamPlan
from ipcbridge.stream.protocol import READY_KEY
from ipcbridge.stream.receiver import StreamReceiver

logger = logging.getLogger(__name__)

#: The one tensor of an IPC stream's manifest: both halves, back to back.
BUFFER_NAME = "buffers"
#: A ``done`` value no bucket has: the trainer's wait returns and fails (Note [who notices a failure]).
_INTERRUPTED = b"interrupted"


#: The longest wait for the peer a stream accepts (a day): beyond it ``timedelta`` overflows.
MAX_TIMEOUT = 86400.0


def check_timeout(timeout: Any) -> float:
    """A positive, finite number of seconds of at most :data:`MAX_TIMEOUT`, else ``BridgeError``."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT:
        raise BridgeError(f"an IPC stream's timeout must be seconds in (0, {MAX_TIMEOUT:.0f}], got {timeout!r:.40}; "
                          "pass the seconds to wait for the peer")
    return float(timeout)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class _Signal:
    """The :class:`~ipcbridge.stream.protocol.Work` of one bucket: wait for ``key`` to say ``seq``."""

    def __init__(self, channel: IpcChannel, key: str, seq: int) -> None:
        self.channel, self.key, self.seq = channel, key, seq
        self._outcome: BridgeError | bool = False  # True once signalled; the error once failed

    def wait(self) -> None:
        # Idempotent: the protocol waits on its pending works again while unwinding (Note [failure and
        # teardown]), and the key was consumed by the first wait.
        if self._outcome is False:
            try:
                self._wait()
                self._outcome = True
            except BridgeError as e:
                self._outcome = e
        if isinstance(self._outcome, BridgeError):
            raise self._outcome

    def _wait(self) -> None:
        store = self.channel.store
        if store is None:
            raise BridgeError("this IPC stream channel is closed; open a new stream")
        try:
            store.wait([self.key], datetime.timedelta(seconds=self.channel.timeout))
            value = store.get(self.key)
            store.delete_key(self.key)
        except RuntimeError as e:  # torch's DistStoreError (timeout) or DistNetworkError (peer gone)
            peer = "engine" if self.channel.rank == 0 else "trainer"
            raise BridgeError(f"bucket {self.seq}: the {peer} did not signal {self.key!r} within "
                              f"{self.channel.timeout:.0f}s or has gone ({type(e).__name__}: {e})") from None
        if value == _INTERRUPTED:
            raise BridgeError(f"bucket {self.seq}: the engine's receive failed (see its error)")
        if value != str(self.seq).encode():
            raise BridgeError(f"{self.key!r} says bucket {value[:40]!r}, expected {self.seq}: the two sides of the "
                              "IPC stream are out of step")


class IpcChannel:
    """A two-rank :class:`~ipcbridge.stream.protocol.Group` over a shared buffer: signals only, through the
    rendezvous store. See Note [the IPC channel]. Rank 0 holds the store's server (closing it tells the
    worker), rank 1 a client. ``device`` is where the buffer is read or written (synchronised per bucket)."""

    def __init__(self, store: Any, rank: int, device: torch.device | str, timeout: float) -> None:
        if rank not in (0, 1):
            raise ValueError(f"an IPC channel has ranks 0 and 1, not {rank}")
        self.store: Any = store
        self.rank = rank
        self.device = torch.device(device)
        self.timeout = check_timeout(timeout)
        self._posted = 0  # buckets posted since the stream opened: the sequence number of the next
        self._loaded = 0  # rank 1: buckets copied out

    @property
    def closed(self) -> bool:
        return self.store is None

    def broadcast(self, tensor: torch.Tensor, src: int) -> _Signal:
        if self.store is None:
            raise BridgeError("this IPC stream channel is closed; open a new stream")
        if src != 0:
            raise ValueError("an IPC stream flows from rank 0 (the trainer) only")
        seq, self._posted = self._posted, self._posted + 1
        if self.rank == 0:
            _sync(self.device)  # the bucket is packed into its half before the worker may read it
            self.store.set(f"ready/{seq % 2}", str(seq))
            return _Signal(self, f"done/{seq % 2}", seq)
        return _Signal(self, f"ready/{seq % 2}", seq)

    def loaded(self) -> None:
        """Rank 1: the oldest bucket not yet reported has been copied out; its half may be rewritten."""
        if self.store is None:
            raise BridgeError("this IPC stream channel is closed; open a new stream")
        seq, self._loaded = self._loaded, self._loaded + 1
        _sync(self.device)
        self.store.set(f"done/{seq % 2}", str(seq))

    def interrupt(self) -> None:
        """Rank 0, from any thread: fail the trainer's pending and next waits at once.

        Through a connection of its own: a ``TCPStore`` client serves one request at a time, and the
        trainer's thread may be blocked in a ``wait`` on the channel's."""
        store = self.store
        if store is None or self.rank != 0:
            return
        try:
            own = client_store(store.host, store.port, min(self.timeout, 10.0))
            for k in (0, 1):
                own.set(f"done/{k}", _INTERRUPTED)
        except RuntimeError:
            logger.debug("could not interrupt the IPC channel", exc_info=True)

    def close(self, abort: bool = False) -> None:
        """Drop the store (rank 0: its server, so the worker's pending wait fails at once)."""
        self.store = None


# ---- the engine's side -------------------------------------------------------------------------------


def open_buffers(manifest_json: str, buffer_bytes: int) -> tuple[OpenedManifest, list[torch.Tensor]]:
    """Map the trainer's shared buffer once; its two halves, each ``buffer_bytes`` long."""
    opened = open_manifest(Manifest.from_json(manifest_json))
    try:
        flat = opened.tensors.get(BUFFER_NAME)
        if (len(opened.tensors) != 1 or flat is None or flat.dtype != torch.uint8 or flat.dim() != 1
                or flat.numel() != 2 * buffer_bytes or not flat.is_contiguous()):
            raise ManifestError(f"the stream's buffer manifest must hold one 1-d uint8 tensor {BUFFER_NAME!r} of "
                             f"{2 * buffer_bytes} contiguous bytes; use the same ipcbridge in the trainer and the engine")
    except BaseException:
        opened.close()
        raise
    return opened, [flat[:buffer_bytes], flat[buffer_bytes:]]


class IpcStreamReceiver(StreamReceiver):
    """A :class:`StreamReceiver` that can also take a stream through a trainer's shared buffer
    (:meth:`init_ipc`); :meth:`~StreamReceiver.receive` and :meth:`~StreamReceiver.close` serve both."""

    _opened: OpenedManifest | None = None

    def init_ipc(self, stream_id: str, host: str, port: int, timeout: float, plan_dict: Any,
                 manifest_json: str) -> None:
        """Check the plan, map the trainer's buffer and connect to its store; replaces any previous stream."""
        check_timeout(timeout)
        with self._lock:
            plan = StreamPlan.from_dict(plan_dict)
            self._check_plan(plan)
            self._close()  # a new trainer replaces the previous one
            opened, buffers = open_buffers(manifest_json, plan.buffer_bytes)
            try:
                store = client_store(host, port, timeout)
                store.set(READY_KEY, "1")
            except BaseException:
                opened.close()
                raise
            self._opened, self._buffers = opened, buffers
            self.group = IpcChannel(store, 1, self.device, timeout)  # type: ignore[assignment]
            self.backend, self.stream_id, self.plan = "ipc", stream_id, plan

    def _load(self, views: dict[str, torch.Tensor]) -> None:
        super()._load(views)
        loaded = getattr(self.group, "loaded", None)
        if loaded is not None:
            loaded()  # Note [the IPC channel]: the half may now be rewritten

    def _close(self, abort: bool = False) -> None:
        super()._close(abort)
        opened, self._opened = self._opened, None
        if opened is not None:
            opened.close()  # unmaps, so the trainer's allocator may reuse the buffer


# ---- the trainer's side ------------------------------------------------------------------------------


class IpcStreamBridge(StreamBridge):
    """:class:`StreamBridge` through a shared buffer on the trainer's device (Note [the IPC channel]).
    Made by :func:`ipcbridge.stream` for an engine on the trainer's own GPU. The buffer (two halves of
    ``plan.buffer_bytes``) is allocated and exported once, at connect, and kept until :meth:`close`."""

    _manifest_json = ""

    @staticmethod
    def pick_backend(backend: str | None, device: torch.device) -> str:
        if backend not in (None, "ipc"):
            raise BridgeError(f"a shared-buffer stream has no backend {backend!r}; leave backend out (or 'ipc')")
        return "ipc"

    def _connect(self) -> None:
        if not callable(getattr(self.endpoint, "stream_init_ipc", None)):
            raise BridgeError(
                f"{self.endpoint.name} cannot receive through a shared buffer (it has no stream_init_ipc); "
                "stream into a vLLM engine started with worker_extension_cls='ipcbridge.vllm.WorkerExtension', "
                "or put the engine on another GPU and use backend='nccl'"
            )
        flat = torch.empty(2 * self.plan.buffer_bytes, dtype=torch.uint8, device=self._buffer_device)
        try:
            self._manifest_json = export({BUFFER_NAME: flat}, layout="meta").to_json()
        except ManifestError as e:  # an expandable segment's handle: the trainer's own allocator setting
            raise BridgeError(
                f"the trainer cannot share its stream buffer ({e}). The trainer process runs with "
                "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; unset it in the trainer (the engine may keep it)"
            ) from None
        self._buffers = [flat[: self.plan.buffer_bytes], flat[self.plan.buffer_bytes:]]
        try:
            super()._connect()
        except BaseException:
            self._buffers = None
            raise

    def _engine_init(self, port: int) -> None:
        self.endpoint.stream_init_ipc(self.stream_id, host=self.host, port=port,  # type: ignore[attr-defined]
                                      timeout=self.timeout, plan=self.plan.to_dict(),
                                      buffers=self._manifest_json)

    def _join(self, store: Any) -> IpcChannel:
        return IpcChannel(store, 0, self._buffer_device, self.timeout)

    def _send_buffers(self) -> list[torch.Tensor]:
        if self._buffers is None:
            raise BridgeError("this weight stream is closed; open a new one with ipcbridge.stream(engine, model)")
        return self._buffers

"""The NCCL link to vLLM's own weight-transfer receiver: its communicator, its rendezvous, one stream.

vLLM's stock receiver (``NCCLWeightTransferEngine`` in ``vllm/distributed/weight_transfer/``) does not join a
``torch.distributed`` group: it joins a bare NCCL communicator (vLLM's ``PyNcclCommunicator``). To feed a
stock engine the trainer must hold the other end of that communicator. :class:`CommGroup` makes such a
communicator a :class:`~ipcbridge.stream.protocol.Group`, so the one double-buffered
:func:`~ipcbridge.stream.protocol.send` drives it too.

Note [vLLM's NCCL group]
    Every rank calls ``ncclCommInitRank`` with one unique id that rank 0 (the trainer) mints, then issues a
    one-element float32 ``all_reduce`` as a warm-up (``PyNcclCommunicator.__init__``), then only
    broadcasts. How the id travels is the only thing that changed across releases:
      - up to 0.29, through vLLM's ``StatelessProcessGroup``, a ``TCPStore`` the trainer serves at
        ``master_address:master_port`` (vLLM pickles the id into it itself). The trainer must run vLLM's
        own helper for that (:func:`open_store_comm`), so vLLM must be importable on the trainer;
      - from 0.30, also pre-shared as ``nccl_unique_id_b64`` in the init info: the trainer mints the id
        with torch's NCCL bindings and needs no vLLM at all (:func:`mint_unique_id`,
        :func:`open_torch_comm`). It must still issue the warm-up ``all_reduce``, or both sides deadlock.
    ``ncclCommInitRank`` has no timeout and blocks until every rank has joined, so each join here runs in
    a daemon thread bounded by the caller's timeout (:func:`_bounded`).

Note [one stream, created once]
    Broadcasts run on one side stream per :class:`CommGroup`, created with it, ordered after the packing
    on the current stream by ``wait_stream`` and back by an event. vLLM 0.25-0.29 made new streams per
    transfer; the caching allocator keys free blocks by stream, so each transfer stranded its buffers'
    memory (vLLM gh-52950). Buffers here are allocated once per stream too (``StreamBridge`` keeps them).

Note [a stuck NCCL peer]
    An NCCL collective never times out by itself. :class:`CommGroup`'s works poll their event against a
    deadline; past it the push fails with ``BridgeError`` and the communicator is aborted (vLLM's
    ``PyNcclCommunicator.destroy``). Torch's own bindings (0.30+ path) expose no abort: the communicator
    is then parked in :data:`_ABANDONED` rather than destroyed, because ``ncclCommDestroy`` waits for the
    very broadcast that is stuck.
"""

from __future__ import annotations

import base64
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from ipcbridge.errors import BridgeError
from ipcbridge.stream.group import poll

logger = logging.getLogger(__name__)

#: Communicators whose peer got stuck and that cannot be aborted: kept, never destroyed. Note [a stuck NCCL peer].
_ABANDONED: list[Any] = []
#: Size of an ``ncclUniqueId`` (``NCCL_UNIQUE_ID_BYTES``).
UNIQUE_ID_BYTES = 128


class Comm(Protocol):
    """What :class:`CommGroup` needs of a communicator: a broadcast enqueued on a given stream, and an abort."""

    def broadcast(self, tensor: torch.Tensor, src: int, stream: torch.cuda.Stream) -> None: ...

    def abort(self) -> None: ...


class VllmComm:
    """vLLM's ``PyNcclCommunicator`` (the store rendezvous, 0.25-0.29), as a :class:`Comm`."""

    def __init__(self, comm: Any) -> None:
        self._comm = comm

    def broadcast(self, tensor: torch.Tensor, src: int, stream: torch.cuda.Stream) -> None:
        self._comm.broadcast(tensor, src=src, stream=stream)

    def abort(self) -> None:
        destroy = getattr(self._comm, "destroy", None)
        if callable(destroy):
            destroy()  # ncclCommAbort in a bounded daemon thread (vLLM's own)
        else:
            _ABANDONED.append(self._comm)


class TorchComm:
    """A communicator from torch's NCCL bindings (``torch.cuda.nccl``), as a :class:`Comm`. No vLLM needed."""

    def __init__(self, comm: Any) -> None:
        self._comm = comm

    def broadcast(self, tensor: torch.Tensor, src: int, stream: torch.cuda.Stream) -> None:
        torch.cuda.nccl.broadcast([tensor], root=src, streams=[stream], comms=[self._comm])

    def abort(self) -> None:
        _ABANDONED.append(self._comm)  # Note [a stuck NCCL peer]
        self._comm = None


class _EventWork:
    """A broadcast in flight on the group's stream. ``wait`` orders the current stream after it, and returns
    once it completed on the device, or raises ``BridgeError`` at the deadline. Note [a stuck NCCL peer]."""

    def __init__(self, event: torch.cuda.Event, device: torch.device, timeout: float) -> None:
        self._event = event
        self._device = device
        self._deadline = time.monotonic() + timeout
        self._timeout = timeout

    def wait(self) -> bool:
        torch.cuda.current_stream(self._device).wait_event(self._event)
        if not poll(self._event.query, self._deadline):  # Note [a wait that does not oversleep] (group.py)
            raise BridgeError(f"an NCCL broadcast did not complete within {self._timeout:.0f}s: the engine is "
                              "stuck or gone")
        return True


class CommGroup:
    """A bare NCCL communicator as a :class:`~ipcbridge.stream.protocol.Group` (rank ``rank`` on ``device``).

    Owns one side stream (Note [one stream, created once]) and the communicator: :meth:`close` aborts it.
    """

    def __init__(self, comm: Comm, rank: int, device: torch.device | str, timeout: float) -> None:
        self._comm: Comm | None = comm
        self.rank = rank
        self.device = torch.device(device)
        self.timeout = timeout
        self._stream = torch.cuda.Stream(device=self.device, priority=-1)  # Note [NCCL on a high-priority stream] (group.py)

    @property
    def closed(self) -> bool:
        return self._comm is None

    def broadcast(self, tensor: torch.Tensor, src: int) -> _EventWork:
        comm = self._comm
        if comm is None:
            raise BridgeError("this NCCL link is closed; open a new stream")
        self._stream.wait_stream(torch.cuda.current_stream(self.device))  # the packing of ``tensor``
        comm.broadcast(tensor, src, self._stream)
        event = torch.cuda.Event()
        event.record(self._stream)
        return _EventWork(event, self.device, self.timeout)

    def close(self, abort: bool = False) -> None:
        """Drop the communicator; vLLM's side keeps its own until its next ``init_weight_transfer_engine``.

        After a clean push nothing is in flight and the communicator is simply released; ``abort`` (after a
        failure) aborts it so a peer blocked in a broadcast fails instead of waiting forever.
        """
        comm, self._comm = self._comm, None
        if comm is not None and abort:
            try:
                comm.abort()
            except Exception:
                logger.warning("aborting the NCCL link failed", exc_info=True)


# ---- rendezvous --------------------------------------------------------------------------------------


#: ``() -> error or None``: whether the engine's side of a join already failed (its RPC answered an error).
PeerCheck = Callable[[], "BaseException | None"]


def _bounded(fn: Callable[[], Any], timeout: float, what: str, peer_failed: PeerCheck | None = None) -> Any:
    """``fn()`` in a daemon thread, waited for at most ``timeout`` s, or until ``peer_failed()`` reports the
    engine's refusal. Note [vLLM's NCCL group]: a join that never completes would otherwise hang the trainer;
    the thread is left behind (NCCL has no cancel)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # reported below, in the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name=f"ipcbridge-{what}", daemon=True)
    t.start()
    deadline = time.monotonic() + timeout
    while t.is_alive() and time.monotonic() < deadline:
        t.join(0.01)
        remote = peer_failed() if peer_failed is not None else None
        if remote is not None and t.is_alive():
            raise BridgeError(f"{what} failed: the engine refused: {remote}")
    if t.is_alive():
        raise BridgeError(f"{what} did not complete within {timeout:.0f}s; the engine did not join the NCCL group. "
                          "Fix: check the engine's log and that it was started with vLLM's NCCL weight transfer")
    if "error" in box:
        raise BridgeError(f"{what} failed: {type(box['error']).__name__}: {box['error']}") from box["error"]
    return box.get("value")


def free_port(host: str) -> int:
    """A port of ``host`` free right now, for vLLM's store rendezvous (which takes a port, not a socket)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def mint_unique_id() -> bytes:
    """A fresh ``ncclUniqueId`` from torch's NCCL bindings (``torch.cuda.nccl.unique_id``, semi-private)."""
    nccl = getattr(torch.cuda, "nccl", None)
    if nccl is None or not hasattr(nccl, "unique_id") or not hasattr(nccl, "init_rank"):
        raise BridgeError(f"torch {torch.__version__} has no torch.cuda.nccl.unique_id/init_rank, which streaming "
                          "into vLLM >= 0.30 without vLLM on the trainer needs; install vLLM on the trainer")
    uid = bytes(nccl.unique_id())
    if len(uid) != UNIQUE_ID_BYTES:
        raise BridgeError(f"torch minted a {len(uid)}-byte NCCL unique id, expected {UNIQUE_ID_BYTES}")
    return uid


def unique_id_b64(uid: bytes) -> str:
    """``nccl_unique_id_b64`` as vLLM 0.30+ decodes it: standard (not URL-safe) base64."""
    return base64.b64encode(uid).decode("ascii")


def open_torch_comm(uid: bytes, world_size: int, device: torch.device, timeout: float,
                    peer_failed: PeerCheck | None = None) -> CommGroup:
    """Join as rank 0 from a pre-shared unique id, with the warm-up vLLM expects. Note [vLLM's NCCL group]."""

    def join() -> Any:
        with torch.cuda.device(device):
            comm = torch.cuda.nccl.init_rank(world_size, uid, 0)
            warm = torch.zeros(1, device=device)  # float32, as PyNcclCommunicator's warm-up
            torch.cuda.nccl.all_reduce([warm], comms=[comm])
            torch.cuda.current_stream(device).synchronize()
            return comm

    return CommGroup(TorchComm(_bounded(join, timeout, "joining the NCCL group", peer_failed)), 0, device, timeout)


def open_store_comm(host: str, port: int, world_size: int, device: torch.device, timeout: float,
                    peer_failed: PeerCheck | None = None) -> CommGroup:
    """Join as rank 0 through vLLM's ``StatelessProcessGroup`` (vLLM 0.25-0.29). Note [vLLM's NCCL group]."""
    try:
        from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group
    except ImportError as e:
        raise BridgeError(
            f"streaming into this vLLM (< 0.30) needs vLLM's own rendezvous helper on the trainer ({e}). Fix: install "
            "the engine's vLLM version in the trainer's environment, or run the engine on vLLM >= 0.30"
        ) from None

    def join() -> Any:
        with torch.cuda.device(device):
            return stateless_init_process_group(host, port, 0, world_size, device.index)

    return CommGroup(VllmComm(_bounded(join, timeout, "joining the NCCL group", peer_failed)), 0, device, timeout)

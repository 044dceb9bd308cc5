"""The process group a weight stream runs over: two ranks, gloo (CPU buffers) or NCCL (CUDA buffers).

The trainer serves the rendezvous (:func:`master_store`) and joins as rank 0; the engine connects to it
(:func:`client_store`) and joins as rank 1. :class:`TorchGroup` is the
:class:`~ipcbridge.stream.protocol.Group` that :func:`~ipcbridge.stream.protocol.send` and
:func:`~ipcbridge.stream.protocol.receive` run over. ``torch.distributed`` is imported inside the
functions, so importing ipcbridge never initialises it.

Every private torch API this needs sits behind one small function below (:func:`_gloo_options`,
:func:`_shutdown`) that says why it is needed and raises ``BridgeError`` naming the torch version if a
torch release drops it.

Note [not the default process group]
    :class:`TorchGroup` builds ``ProcessGroupGloo``/``ProcessGroupNCCL`` directly on a ``TCPStore`` and
    never calls ``init_process_group``. The trainer usually has a default group of its own (DDP, FSDP) and
    vLLM has its own too; one process can have only one default group, and a collective on it would have to
    include every trainer rank. A private two-rank group touches neither.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ipcbridge.errors import BridgeError

logger = logging.getLogger(__name__)

BACKENDS = ("nccl", "gloo")
#: How long one side's close waits for the peer's. Note [closing an NCCL group takes both sides].
CLOSE_WAIT_S = 10.0
_PG_PREFIX = "ipcbridge/stream/pg"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def check_backend(backend: Any, device: torch.device | str) -> str:
    """``backend`` if it can carry buffers on ``device``, else a ``BridgeError`` naming the fix."""
    import torch.distributed as dist

    device = torch.device(device)
    if backend not in BACKENDS:
        raise BridgeError(f"unknown stream backend {backend!r}; use one of {BACKENDS}")
    if not dist.is_available():
        raise BridgeError("this torch build has no torch.distributed; install a build with it to stream weights")
    if backend == "nccl":
        if device.type != "cuda":
            raise BridgeError(f"backend 'nccl' carries CUDA buffers only, and the weights are on {device}; "
                              "use backend='gloo'")
        if not dist.is_nccl_available():
            raise BridgeError("this torch build has no NCCL; use backend='gloo' or a CUDA build of torch")
    elif not dist.is_gloo_available():
        raise BridgeError("this torch build has no gloo backend; use backend='nccl' with CUDA weights")
    return backend


def master_store(host: str, timeout: float) -> Any:
    """The rendezvous store, served by this process on a free port of ``host`` (``.port`` says which)."""
    from torch.distributed import TCPStore

    return TCPStore(host, 0, 2, True, timeout=_timedelta(timeout), wait_for_workers=False)


def client_store(host: str, port: int, timeout: float) -> Any:
    """A connection to the rendezvous store that :func:`master_store` serves at ``host:port``."""
    from torch.distributed import TCPStore

    return TCPStore(host, port, 2, False, timeout=_timedelta(timeout))


# ---- private torch APIs, one function each -----------------------------------------------------------


def _private_api_missing(what: str) -> BridgeError:
    return BridgeError(
        f"torch {torch.__version__} has no {what}, a private torch API that ipcbridge's weight streaming "
        "needs; use the torch version ipcbridge was released with, or report this ipcbridge/torch pair"
    )


def _gloo_options(timeout: float, device: Any) -> Any:
    """Options for a ``ProcessGroupGloo`` that times out after ``timeout`` seconds and connects over ``device``.

    Private: ``ProcessGroupGloo._Options`` and its ``_timeout`` and ``_devices`` fields. The public
    constructor takes only a timeout and always connects over gloo's default device (the interface the
    hostname resolves to), so a loopback rendezvous would still open connections on another interface,
    which may be firewalled or down. If torch drops them, gloo streams cannot be opened (NCCL ones can).
    """
    import torch.distributed as dist

    options = getattr(dist.ProcessGroupGloo, "_Options", None)
    if options is None:
        raise _private_api_missing("ProcessGroupGloo._Options")
    opts = options()
    for field in ("_timeout", "_devices"):
        if not hasattr(opts, field):
            raise _private_api_missing(f"ProcessGroupGloo._Options.{field}")
    opts._timeout = _timedelta(timeout)
    opts._devices = [device]
    return opts


def _nccl_options(timeout: float) -> Any:
    """Options for a ``ProcessGroupNCCL`` that times out after ``timeout`` s, on a high-priority stream.

    Note [NCCL on a high-priority stream]
        Packing (trainer) and loading (engine) are copy kernels that run beside the next bucket's broadcast
        (Note [double buffering]). A copy launched while a broadcast runs can take every free SM, and the
        next broadcast's kernel would then wait behind its blocks; on a high-priority stream its blocks are
        dispatched first. (The per-bucket stall measured on two H200s has a likelier cause, Note [a wait that
        does not oversleep]; neither change was measured yet.) Private: ``_timeout`` (the public constructor
        takes a timeout or options, not both); if torch drops it, NCCL streams cannot be opened (gloo ones can).
    """
    import torch.distributed as dist

    options = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
    if not hasattr(options, "_timeout"):
        raise _private_api_missing("ProcessGroupNCCL.Options._timeout")
    options._timeout = _timedelta(timeout)
    return options


def _shutdown(pg: Any) -> None:
    """Shut an NCCL process group down, waiting for its work, so its communicators are freed now.

    Private on older torch: those bind only ``ProcessGroupNCCL._shutdown``; newer ones a public
    ``shutdown``, preferred when present. Without either, the communicators live until the last reference
    goes, at a time nobody controls, while the peer may still wait on them.
    """
    shutdown = getattr(pg, "shutdown", None) or getattr(pg, "_shutdown", None)
    if shutdown is None:
        raise _private_api_missing("ProcessGroupNCCL.shutdown (or ._shutdown)")
    shutdown()


def _teardown(pg: Any, abort: bool) -> None:
    """Abort or shut down an NCCL group. Note [closing an NCCL group takes both sides]

    ``ProcessGroupNCCL.shutdown`` flushes and destroys the communicators (``ncclCommFinalize`` then
    ``ncclCommDestroy``), and both wait for every rank to destroy its end; in recent NCCL even
    ``ncclCommAbort`` waits for the other ranks of its node. The first close of a stream into real vLLM
    (0.25.1, 2026-11-30) asked the engine, by RPC, to close its end, and closed its own when the RPC
    returned: the engine waited for the trainer, which waited for the RPC, until the test's deadline. So
    each side tears its end down in a daemon thread bounded by :data:`CLOSE_WAIT_S`, and the trainer starts
    its own before it asks the engine (:meth:`ipcbridge.stream.bridge.StreamBridge.close`): a peer that is
    gone or stuck costs the survivor that bound, never a hang.
    """
    try:
        if abort:
            pg.abort()
        else:
            _shutdown(pg)
    except Exception:
        logger.warning("closing the NCCL stream group failed", exc_info=True)


_NCCL_FAILURE_ENV = {"TORCH_NCCL_BLOCKING_WAIT": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}


@contextlib.contextmanager
def _nccl_failure_mode() -> Iterator[None]:
    """Make the NCCL group built inside fail its own work on a timeout, without taking the process down.

    Note [an NCCL timeout must not kill the engine]
        By default (``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``) ``ProcessGroupNCCL``'s watchdog tears the whole
        process down when a collective times out: a stuck or dead trainer would kill the engine it streams
        into (a vLLM worker). And without blocking wait, ``work.wait()`` only orders streams, so a receive
        whose communicator the watchdog aborted would look complete. Both are read from the environment in
        the constructor, per group, and torch has no option field for them: so they are set only around
        this group's construction (2 = abort the communicator and fail the work; blocking wait = ``wait()``
        raises at the timeout) and restored at once, leaving every other group of the process as it was.
    """
    saved = {k: os.environ.get(k) for k in _NCCL_FAILURE_ENV}
    os.environ.update(_NCCL_FAILURE_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- the group ---------------------------------------------------------------------------------------


def _new_process_group(store: Any, rank: int, world_size: int, backend: str, timeout: float, host: str) -> Any:
    import torch.distributed as dist

    prefixed = dist.PrefixStore(_PG_PREFIX, store)
    if backend == "gloo":
        # A loopback rendezvous means both ranks are local: keep gloo's connections on loopback too, not on
        # whatever interface the hostname resolves to.
        device = (dist.ProcessGroupGloo.create_device(hostname=host) if host in _LOOPBACK
                  else dist.ProcessGroupGloo.create_default_device())
        return dist.ProcessGroupGloo(prefixed, rank, world_size, _gloo_options(timeout, device))
    if backend == "nccl":
        with _nccl_failure_mode():
            return dist.ProcessGroupNCCL(prefixed, rank, world_size, _nccl_options(timeout))
    raise BridgeError(f"unknown stream backend {backend!r}; use one of {BACKENDS}")


#: Longest nap between two polls of a broadcast in flight. Note [a wait that does not oversleep].
POLL_CAP_S = 1e-4


def poll(done: Callable[[], bool], deadline: float | None) -> bool:
    """Whether ``done()`` came true by ``deadline`` (``time.monotonic()``; ``None``: no limit), asked in naps
    that grow to :data:`POLL_CAP_S`. Note [a wait that does not oversleep]."""
    pause = 5e-6
    while not done():
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, POLL_CAP_S)
    return True


class PolledWork:
    """An NCCL broadcast whose ``wait()`` polls it briefly first. Note [a wait that does not oversleep]

    ``TorchGroup`` builds NCCL groups with blocking wait (Note [an NCCL timeout must not kill the engine]),
    and torch's blocking ``wait()`` checks completion once per millisecond, sleeping in between. A 256 MiB
    bucket takes about 0.7 ms on NVLink, so each wait overslept its bucket and the two-buffer pipeline
    stalled once per bucket: on two H200s a push took about 0.9-1.1 ms per bucket whatever its size (8B:
    59 ms for 67 buckets, 43 ms of wire; 2026-11-30). Here ``wait()`` polls ``is_completed()`` with naps
    that grow to :data:`POLL_CAP_S`, and calls torch's ``wait()`` only once the work has completed (it then
    returns at once, or raises the work's error), or once the deadline has passed (it then raises NCCL's
    timeout as before).
    """

    def __init__(self, work: Any, timeout: float | None = None) -> None:
        self._work = work
        self._timeout = timeout

    def wait(self) -> Any:
        poll(self._work.is_completed, None if self._timeout is None else time.monotonic() + self._timeout)
        return self._work.wait()


class TorchGroup:
    """A private ``torch.distributed`` process group (gloo or NCCL) as a :class:`~ipcbridge.stream.protocol.Group`.

    Never the default group: see Note [not the default process group]. :meth:`join` blocks until every
    rank has joined (or ``timeout``); every broadcast fails after ``timeout`` too. :meth:`close` drops the
    group, which makes a peer's pending broadcasts fail at once (Note [failure and teardown] in
    :mod:`ipcbridge.stream.protocol`).
    """

    def __init__(self, pg: Any, store: Any, backend: str, rank: int, world_size: int,
                 timeout: float | None = None) -> None:
        self._pg = pg
        self.timeout = timeout
        self._store = store  # NCCL exchanges its unique id through it at the first collective
        self.backend = backend
        self.rank = rank
        self.world_size = world_size

    @classmethod
    def join(cls, store: Any, rank: int, world_size: int, backend: str, timeout: float,
             host: str = "127.0.0.1") -> TorchGroup:
        pg = _new_process_group(store, rank, world_size, backend, timeout, host)
        logger.info("joined a %s stream group as rank %d of %d", backend, rank, world_size)
        return cls(pg, store, backend, rank, world_size, timeout)

    @property
    def closed(self) -> bool:
        return self._pg is None

    def broadcast(self, tensor: torch.Tensor, src: int) -> Any:
        import torch.distributed as dist

        if self._pg is None:
            raise BridgeError("this stream group is closed; open a new stream")
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        work = self._pg.broadcast([tensor], opts)
        return PolledWork(work, self.timeout) if self.backend == "nccl" else work

    def close(self, abort: bool = False, wait: float = CLOSE_WAIT_S) -> None:
        """Leave the group. ``abort=True`` after a failure: NCCL aborts its communicators instead of flushing.

        NCCL: waits at most ``wait`` seconds for the peer to close its side too (Note [closing an NCCL group
        takes both sides]); past it the communicator is left to a daemon thread and a warning is logged.
        """
        pg, self._pg = self._pg, None
        self._store = None
        if pg is None:
            return
        if self.backend == "nccl":
            closer = threading.Thread(target=_teardown, args=(pg, abort), name="ipcbridge-nccl-close", daemon=True)
            del pg  # the thread holds the last reference
            closer.start()
            closer.join(wait)
            if closer.is_alive():
                logger.warning("the peer did not close its side of the NCCL stream group within %.0fs; the "
                               "communicator is left to a daemon thread", wait)
            return
        # gloo: the last reference going away closes the connections (Note [failure and teardown]).
        del pg

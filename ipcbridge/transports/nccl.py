"""Streaming transport: trainer-owned weights broadcast into the engine's tensors, packed and double-buffered.

The fallback for memory that cannot be shared (another GPU or node, MIG, vLLM sleep-mode allocations):
the trainer keeps its own copy of the weights and, after each step, broadcasts them into the engine's
tensors. NCCL carries CUDA buffers, gloo carries CPU ones; both speak the same protocol, so the module is
named for the fast path. Unlike the sharing transports it appears in no manifest: it is registered in
:data:`ipcbridge.transports.STREAMING`.

- :class:`StreamPlan` says where every tensor lies in a flat ``uint8`` buffer, bucket by bucket. It crosses
  the process boundary as JSON and validates itself like a :class:`~ipcbridge.manifest.Manifest`.
- :func:`plan_buckets`, :func:`pack` and :func:`unpack` are pure.
- :func:`send` and :func:`receive` run the double-buffered protocol over any *group*: an object with
  ``rank`` and ``broadcast(tensor, src) -> work`` (``work.wait()``). :class:`TorchGroup` is one over a
  ``torch.distributed`` process group of its own.

Note [bucket policy]
    Tensors are packed in the order given, greedily, each bucket at most ``bucket_bytes``. A tensor larger
    than that gets a bucket of its own, of its own size; tensors are never split. Whole tensors keep every
    view :func:`unpack` returns a complete tensor, so the receiver loads each with one ``copy_`` and the
    sender can pack a fused vLLM tensor straight from its HF parts (``mapping.hf_views`` of a bucket slice)
    without cutting ``[q|k|v]`` rows at a bucket edge. The price is memory: both buffers are as large as the
    largest bucket, which is the largest tensor (usually the embedding) when that exceeds ``bucket_bytes``.

Note [alignment]
    Every tensor starts at a multiple of :data:`ALIGNMENT` (256) bytes of the buffer. ``view(dtype)`` of a
    ``uint8`` slice needs the offset to be a multiple of the dtype's size (8 at most here); 256 also gives
    each view the alignment of a fresh CUDA allocation, so copy kernels take their vectorised paths. The
    padding costs at most 255 bytes per tensor.

Note [double buffering]
    Two flat buffers alternate. The sender packs bucket i+1 into one while bucket i's asynchronous broadcast
    still reads the other; before packing bucket i+2 into a buffer it waits for bucket i's broadcast, which
    used that buffer. The receiver posts the broadcast for bucket i+1 before it loads bucket i, so the wire
    is busy while it copies; the buffer it posts into held bucket i-1, which is loaded already. On CUDA the
    same order holds on streams: NCCL's stream waits for the current stream before a collective, and
    ``work.wait()`` makes the current stream wait for NCCL, so packing, loading and reuse are ordered
    without blocking the CPU. Packing, the wire and loading overlap; memory stays at two buckets.

Note [not the default process group]
    :class:`TorchGroup` builds ``ProcessGroupGloo``/``ProcessGroupNCCL`` directly on a ``TCPStore`` and
    never calls ``init_process_group``. The trainer usually has a default group of its own (DDP, FSDP) and
    vLLM has its own too; one process can have only one default group, and a collective on it would have to
    include every trainer rank. A private two-rank group touches neither.

Note [failure and teardown]
    A failed collective leaves a group unusable (the ranks no longer agree on which broadcast is next), so
    whichever side fails closes its group. For gloo, dropping the process group closes its connections, and
    the peer's pending broadcasts then fail at once ("connection closed by peer") instead of at the
    timeout; a dead process closes them the same way. A peer that is alive but stuck is caught by the
    group's timeout. On error, :func:`send` and :func:`receive` first wait for the broadcasts they already
    posted (they complete or fail quickly), so no broadcast is left running on a buffer being freed.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ipcbridge.errors import BridgeError, ManifestError
from ipcbridge.wire import DTYPES, check_int, check_keys, check_type, dtype_name

logger = logging.getLogger(__name__)

FORMAT = "ipcbridge.stream_plan"
FORMAT_VERSION = 1
#: Byte alignment of every tensor in a bucket. See Note [alignment].
ALIGNMENT = 256
DEFAULT_BUCKET_BYTES = 256 << 20
BACKENDS = ("nccl", "gloo")
#: Key the engine sets in the trainer's store once it has accepted a stream_init, before it joins.
READY_KEY = "ipcbridge/stream/ready"
_PG_PREFIX = "ipcbridge/stream/pg"


# ---- the plan ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One tensor's place in a bucket: ``nbytes`` bytes at byte ``offset`` of the flat buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def __post_init__(self) -> None:
        where = f"stream plan tensor {self.name!r}"
        check_type(self.name, str, f"{where}.name")
        if not self.name:
            raise ManifestError("stream plan: a tensor name must be a non-empty string")
        check_type(self.dtype, str, f"{where}.dtype")
        if self.dtype not in DTYPES:
            raise ManifestError(f"{where}.dtype: unknown dtype {self.dtype!r}; expected one of {sorted(DTYPES)}")
        check_type(self.shape, tuple, f"{where}.shape")
        for i, s in enumerate(self.shape):
            check_int(s, f"{where}.shape[{i}]")
        check_int(self.offset, f"{where}.offset")
        check_int(self.nbytes, f"{where}.nbytes")
        expected = math.prod(self.shape) * self.torch_dtype.itemsize
        if self.nbytes != expected:
            raise ManifestError(f"{where}.nbytes: {self.nbytes} != numel x itemsize = {expected}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset,
                "nbytes": self.nbytes}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Slot:
        check_keys(d, {"name", "dtype", "shape", "offset", "nbytes"}, set(), where)
        check_type(d["shape"], list, f"{where}.shape")
        return cls(**{**d, "shape": tuple(d["shape"])})


@dataclass(frozen=True)
class Bucket:
    """Tensors sent in one broadcast: the first ``nbytes`` bytes of a flat buffer."""

    slots: tuple[Slot, ...]

    @property
    def nbytes(self) -> int:
        return max((s.end for s in self.slots), default=0)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]


@dataclass(frozen=True)
class StreamPlan:
    """Where each tensor lies in the flat buffers of a weight stream. Immutable and self-validating.

    ``bucket_bytes`` is the target bucket size; a bucket holding one tensor may be larger (Note [bucket
    policy]). Both sides allocate two buffers of :attr:`buffer_bytes`.
    """

    buckets: tuple[Bucket, ...]
    bucket_bytes: int
    alignment: int = ALIGNMENT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        check_int(self.bucket_bytes, "stream plan.bucket_bytes", minimum=1)
        check_int(self.alignment, "stream plan.alignment", minimum=8)
        if self.alignment & (self.alignment - 1):
            raise ManifestError(f"stream plan.alignment: must be a power of two, got {self.alignment}")
        if self.format_version != FORMAT_VERSION:
            raise ManifestError(
                f"stream plan.format_version: {self.format_version} is not supported (this ipcbridge reads "
                f"{FORMAT_VERSION}); use the same ipcbridge version in the engine and the trainer"
            )
        check_type(self.buckets, tuple, "stream plan.buckets")
        seen: set[str] = set()
        for i, b in enumerate(self.buckets):
            where = f"stream plan.buckets[{i}]"
            check_type(b, Bucket, where)
            check_type(b.slots, tuple, f"{where}.slots")
            if not b.slots:
                raise ManifestError(f"{where}: a bucket must hold at least one tensor")
            prev_end = 0
            for s in b.slots:
                check_type(s, Slot, f"{where}.slots")
                if s.name in seen:
                    raise ManifestError(f"stream plan: tensor {s.name!r} appears twice")
                seen.add(s.name)
                if s.offset % self.alignment:
                    raise ManifestError(
                        f"{where}: tensor {s.name!r} at byte {s.offset}, not a multiple of the alignment "
                        f"{self.alignment}; build plans with plan_buckets()"
                    )
                if s.offset < prev_end:
                    raise ManifestError(
                        f"{where}: tensor {s.name!r} at byte {s.offset} overlaps the previous tensor, which "
                        f"ends at byte {prev_end}; slots must be in ascending, non-overlapping order"
                    )
                prev_end = s.end
            if len(b.slots) > 1 and b.nbytes > self.bucket_bytes:
                raise ManifestError(
                    f"{where}: {len(b.slots)} tensors fill {b.nbytes} bytes, more than bucket_bytes "
                    f"{self.bucket_bytes}; only a bucket of one tensor may be larger"
                )

    @property
    def slots(self) -> list[Slot]:
        """Every tensor of the plan, in sending order."""
        return [s for b in self.buckets for s in b.slots]

    @property
    def buffer_bytes(self) -> int:
        """Size of each of the two flat buffers: the largest bucket."""
        return max((b.nbytes for b in self.buckets), default=0)

    @property
    def wire_bytes(self) -> int:
        """Bytes one stream of this plan broadcasts (tensors plus alignment padding)."""
        return sum(b.nbytes for b in self.buckets)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": self.format_version, "bucket_bytes": self.bucket_bytes,
            "alignment": self.alignment, "buckets": [[s.to_dict() for s in b.slots] for b in self.buckets],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Any) -> StreamPlan:
        check_type(d, Mapping, "stream plan")
        if d.get("format") != FORMAT:
            raise ManifestError(f"stream plan.format: expected {FORMAT!r}, got {d.get('format')!r}")
        check_keys(d, {"format", "format_version", "bucket_bytes", "alignment", "buckets"}, set(), "stream plan")
        check_type(d["buckets"], list, "stream plan.buckets")
        buckets = []
        for i, b in enumerate(d["buckets"]):
            check_type(b, list, f"stream plan.buckets[{i}]")
            buckets.append(Bucket(tuple(Slot.from_dict(s, f"stream plan.buckets[{i}][{j}]") for j, s in enumerate(b))))
        return cls(buckets=tuple(buckets), bucket_bytes=d["bucket_bytes"], alignment=d["alignment"],
                   format_version=d["format_version"])

    @classmethod
    def from_json(cls, text: str | bytes) -> StreamPlan:
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            raise ManifestError(f"stream plan is not valid JSON ({e}); pass StreamPlan.to_json()") from e
        return cls.from_dict(d)


NamedSpecs = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.dtype | str, Sequence[int]]]


def plan_buckets(named_specs: NamedSpecs, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 alignment: int = ALIGNMENT) -> StreamPlan:
    """Pack tensors, in the order given, into buckets of at most ``bucket_bytes``. See Note [bucket policy].

    ``named_specs``: ``(name, dtype, shape)`` triples, or a mapping of names to tensors (meta tensors do).
    """
    check_int(bucket_bytes, "bucket_bytes", minimum=1)
    items = (((n, t.dtype, t.shape) for n, t in named_specs.items()) if isinstance(named_specs, Mapping)
             else named_specs)
    buckets: list[tuple[Slot, ...]] = []
    current: list[Slot] = []
    end = 0
    for name, dtype, shape in items:
        dt = dtype if isinstance(dtype, str) else dtype_name(dtype)
        shape = tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * DTYPES[dt].itemsize if dt in DTYPES else 0
        offset = -(-end // alignment) * alignment
        if current and offset + nbytes > bucket_bytes:
            buckets.append(tuple(current))
            current, offset = [], 0
        current.append(Slot(name, dt, shape, offset, nbytes))  # validates name, dtype and shape
        end = offset + nbytes
    if current:
        buckets.append(tuple(current))
    return StreamPlan(tuple(Bucket(b) for b in buckets), bucket_bytes, alignment)


def _check_buffer(buffer: torch.Tensor, bucket: Bucket) -> None:
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous():
        raise ManifestError(
            f"a stream buffer must be a contiguous 1-d uint8 tensor, got {buffer.dtype} of shape "
            f"{list(buffer.shape)}; allocate torch.empty(plan.buffer_bytes, dtype=torch.uint8)"
        )
    if buffer.numel() < bucket.nbytes:
        raise ManifestError(
            f"a stream buffer of {buffer.numel()} bytes cannot hold a bucket of {bucket.nbytes}; allocate "
            "plan.buffer_bytes"
        )


def _view(buffer: torch.Tensor, slot: Slot) -> torch.Tensor:
    return buffer.narrow(0, slot.offset, slot.nbytes).view(slot.torch_dtype).view(slot.shape)


def unpack(buffer: torch.Tensor, bucket: Bucket) -> dict[str, torch.Tensor]:
    """Views of ``bucket``'s tensors in ``buffer``: no copy.

    The views alias ``buffer``: they go stale as soon as the buffer is reused (the next-but-one bucket of a
    stream) or freed, so copy what you need before that. Writing through them writes the buffer.
    """
    _check_buffer(buffer, bucket)
    return {s.name: _view(buffer, s) for s in bucket.slots}


def pack(tensors: Mapping[str, torch.Tensor], bucket: Bucket, out: torch.Tensor) -> None:
    """Copy ``bucket``'s tensors from ``tensors`` (any device; same dtype and shape) into ``out``."""
    _check_buffer(out, bucket)
    for s in bucket.slots:
        t = tensors.get(s.name)
        if t is None:
            raise ManifestError(f"tensor {s.name!r} of the stream plan is missing; pass every tensor the plan names")
        if tuple(t.shape) != s.shape or t.dtype != s.torch_dtype:
            raise ManifestError(
                f"tensor {s.name!r}: {t.dtype} {list(t.shape)}, but the stream plan has {s.dtype} {list(s.shape)}; "
                "rebuild the plan with plan_buckets() for these tensors"
            )
        _view(out, s).copy_(t)


# ---- the protocol -----------------------------------------------------------------------------------


class Work(Protocol):
    def wait(self) -> Any: ...


class Group(Protocol):
    """What :func:`send` and :func:`receive` need of a process group."""

    rank: int

    def broadcast(self, tensor: torch.Tensor, src: int) -> Work:
        """Start broadcasting ``tensor`` from rank ``src`` into every rank's ``tensor``; return at once."""


Packer = Callable[[Bucket, torch.Tensor], None]


def _drain(works: Iterable[Work | None]) -> None:
    for w in works:
        if w is not None:
            try:
                w.wait()
            except Exception:  # the error that brought us here is the one to report
                logger.debug("a pending broadcast failed while unwinding", exc_info=True)


def send(group: Group, source: Mapping[str, torch.Tensor] | Packer, plan: StreamPlan, *,
         device: torch.device | str = "cpu") -> int:
    """Broadcast ``plan``'s buckets from ``group.rank``; return the bytes sent. See Note [double buffering].

    ``source`` is either the tensors by name (packed with :func:`pack`) or a callable
    ``(bucket, out) -> None`` that fills ``out[:bucket.nbytes]`` itself (how a trainer packs straight from
    HF tensors). The two flat buffers on ``device`` belong to this call: a packer must not keep ``out`` or
    views of it, and they are freed on return. Returns once every broadcast this rank posted has completed
    (on CUDA: once the current stream is ordered after them).
    """
    packer: Packer = source if callable(source) else (lambda b, out: pack(source, b, out))
    if not plan.buckets:
        return 0
    buffers = [torch.empty(plan.buffer_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
    pending: list[Work | None] = [None, None]
    try:
        for i, bucket in enumerate(plan.buckets):
            k = i % 2
            if pending[k] is not None:
                pending[k].wait()  # bucket i-2's broadcast still reads this buffer
                pending[k] = None
            packer(bucket, buffers[k])
            pending[k] = group.broadcast(buffers[k][: bucket.nbytes], group.rank)
        last = (len(plan.buckets) - 1) % 2
        for k in (1 - last, last):  # in posting order
            w, pending[k] = pending[k], None
            if w is not None:
                w.wait()
    except BaseException:
        _drain(pending)
        pending[:] = [None, None]  # a gloo work holds its group's connections open: let the group close
        raise
    return plan.wire_bytes


def receive(group: Group, plan: StreamPlan, load: Callable[[dict[str, torch.Tensor]], None], *, src: int = 0,
            device: torch.device | str = "cpu") -> int:
    """Receive ``plan``'s buckets broadcast by rank ``src``; return the bytes received.

    ``load(views)`` is called once per bucket, in order, with :func:`unpack` views of the bucket; it must
    copy them where they belong before returning: the buffer under them takes the next-but-one bucket, and
    the two buffers (on ``device``, owned by this call) are freed on return. See Note [double buffering].
    """
    n = len(plan.buckets)
    if n == 0:
        return 0
    buffers = [torch.empty(plan.buffer_bytes, dtype=torch.uint8, device=device) for _ in range(2)]

    def post(i: int) -> Work:
        return group.broadcast(buffers[i % 2][: plan.buckets[i].nbytes], src)

    pending: dict[int, Work] = {0: post(0)}
    try:
        for i, bucket in enumerate(plan.buckets):
            if i + 1 < n:
                pending[i + 1] = post(i + 1)  # its buffer held bucket i-1, loaded already
            pending.pop(i).wait()
            load(unpack(buffers[i % 2], bucket))
    except BaseException:
        _drain(pending[k] for k in sorted(pending))
        pending.clear()  # a gloo work holds its group's connections open: let the group close
        raise
    return plan.wire_bytes


# ---- torch.distributed ------------------------------------------------------------------------------


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
    from torch.distributed import TCPStore

    return TCPStore(host, port, 2, False, timeout=_timedelta(timeout))


class TorchGroup:
    """A private ``torch.distributed`` process group (gloo or NCCL) as a :class:`Group`.

    Never the default group: see Note [not the default process group]. :meth:`join` blocks until every
    rank has joined (or ``timeout``); every broadcast fails after ``timeout`` too. :meth:`close` drops the
    group, which makes a peer's pending broadcasts fail at once (Note [failure and teardown]).
    """

    def __init__(self, pg: Any, store: Any, backend: str, rank: int, world_size: int) -> None:
        self._pg = pg
        self._store = store  # NCCL exchanges its unique id through it at the first collective
        self.backend = backend
        self.rank = rank
        self.world_size = world_size

    @classmethod
    def join(cls, store: Any, rank: int, world_size: int, backend: str, timeout: float,
             host: str = "127.0.0.1") -> TorchGroup:
        import torch.distributed as dist

        prefixed = dist.PrefixStore(_PG_PREFIX, store)
        if backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = _timedelta(timeout)
            # Loopback rendezvous means both ranks are local: keep gloo's connections on loopback too, not
            # on whatever interface the hostname resolves to.
            local = host in ("127.0.0.1", "localhost", "::1")
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host) if local
                             else dist.ProcessGroupGloo.create_default_device()]
            pg = dist.ProcessGroupGloo(prefixed, rank, world_size, opts)
        elif backend == "nccl":
            pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, _timedelta(timeout))
        else:
            raise BridgeError(f"unknown stream backend {backend!r}; use one of {BACKENDS}")
        logger.info("joined a %s stream group as rank %d of %d", backend, rank, world_size)
        return cls(pg, store, backend, rank, world_size)

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
        return self._pg.broadcast([tensor], opts)

    def close(self, abort: bool = False) -> None:
        """Leave the group. ``abort=True`` after a failure: NCCL aborts its communicators instead of waiting."""
        pg, self._pg = self._pg, None
        self._store = None
        if pg is None:
            return
        if self.backend == "nccl":
            try:
                if abort:
                    pg.abort()
                else:  # older torch binds only _shutdown
                    (getattr(pg, "shutdown", None) or pg._shutdown)()
            except Exception:
                logger.warning("closing the NCCL stream group failed", exc_info=True)
        # gloo: the last reference going away closes the connections (Note [failure and teardown]).
        del pg

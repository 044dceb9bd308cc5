"""The stream plan: where every tensor of a weight stream lies in a flat ``uint8`` buffer, bucket by bucket.

Pure: no process groups, no devices of its own. :class:`StreamPlan` crosses the process boundary as JSON
(the trainer builds it from the engine's manifest, the engine checks it against its weights) and, like a
:class:`~ipcbridge.manifest.Manifest`, validates itself through :mod:`ipcbridge.wire` on construction, so a
plan that exists is a plan that is well formed. :func:`pack` and :func:`unpack` move tensors in and out of a
buffer laid out by a plan's :class:`Bucket`.

Note [bucket policy]
    Tensors are packed in the order given, greedily, each bucket at most ``bucket_bytes``. A tensor larger
    than that gets a bucket of its own, of its own size; tensors are never split. Whole tensors keep every
    view :func:`unpack` returns a complete tensor, so the receiver loads each with one ``copy_`` and the
    sender can pack a fused vLLM tensor straight from its HF parts (``mapping.hf_views`` of a bucket slice)
    without cutting ``[q|k|v]`` rows at a bucket edge. The price is memory: both buffers are as large as the
    largest bucket, which is the largest tensor (usually the embedding) when that exceeds ``bucket_bytes``.

    The default ``bucket_bytes`` is the total over :data:`TARGET_BUCKETS`, but at least 256 MiB and at most
    the largest tensor (which sizes the buffers anyway, so it costs no memory). Two costs pull apart: every
    broadcast pays a start-up of its own, and the last bucket's load overlaps nothing. Measured on two
    H200s into vLLM 0.25.1 and 0.26.0 (2026-11-30), as the engine's receive time against one contiguous
    broadcast: 1B shapes (2.47 GB) 0.92x in 9 buckets of 256 MiB, 0.88x in 5 of 525 MB; 8B shapes
    (16.06 GB) 0.93x in 67 of 256 MiB, 0.97x in 18 of 1 GiB. The rule picks 256 MiB for the first and 1.0 GB for the
    second. Sending the largest tensors first with the last buckets cut to 1/4, 1/16 and 1/64 (to hide
    the last load) was slower on both (0.87x, 0.94x): small buckets are paced by the host's waits.

Note [vLLM's packing]
    vLLM's own NCCL receiver (``packed_nccl_broadcast_consumer`` in
    ``vllm/distributed/weight_transfer/packed_tensor.py``, 0.25.1 to 0.33) cuts its buffers differently, and
    a stock engine must be fed exactly its way: tensors are appended, as bytes with no padding, until the
    running total goes *past* the buffer size; the chunk is cut after that tensor (so a chunk may exceed
    the buffer size by up to one tensor), and the last chunk holds what is left. :func:`plan_vllm_chunks`
    builds such a plan (``packing="vllm"``, alignment 1), and a plan says which rule it follows so the
    validation can check the right one. vLLM views each tensor out of its chunk with ``view(dtype)``, which
    torch refuses at an offset that is not a multiple of the dtype's size; such a plan is refused here,
    before anything is sent, rather than failing in the engine.

Note [alignment]
    Every tensor starts at a multiple of :data:`ALIGNMENT` (256) bytes of the buffer. ``view(dtype)`` of a
    ``uint8`` slice needs the offset to be a multiple of the dtype's size (8 at most here); 256 also gives
    each view the alignment of a fresh CUDA allocation, so copy kernels take their vectorised paths. The
    padding costs at most 255 bytes per tensor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ipcbridge.errors import ManifestError
from ipcbridge.wire import (
    DTYPES,
    check_format,
    check_int,
    check_keys,
    check_tensor,
    check_type,
    check_version,
    dtype_name,
)

FORMAT = "ipcbridge.stream_plan"
FORMAT_VERSION = 1
#: Byte alignment of every tensor in a bucket. See Note [alignment].
ALIGNMENT = 256
DEFAULT_BUCKET_BYTES = 256 << 20
#: How many buckets the default size aims at for a large model. Note [bucket policy].
TARGET_BUCKETS = 16
#: The two packing rules: ours (Note [bucket policy], Note [alignment]) and vLLM's (Note [vLLM's packing]).
PACKINGS = ("aligned", "vllm")

_WHERE = "stream plan"


@dataclass(frozen=True)
class Slot:
    """One tensor's place in a bucket: ``nbytes`` bytes at byte ``offset`` of the flat buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def __post_init__(self) -> None:
        where = f"{_WHERE} tensor {self.name!r}"
        check_tensor(self.name, self.dtype, self.shape, self.nbytes, where)
        check_int(self.offset, f"{where}.offset")

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
    """Tensors sent in one broadcast: the first ``nbytes`` bytes of a flat buffer.

    Validated as part of its :class:`StreamPlan` (which knows the alignment and the bucket's index).
    """

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
    #: ``"aligned"`` (ours) or ``"vllm"`` (vLLM's stock receiver): Note [vLLM's packing].
    packing: str = "aligned"

    def __post_init__(self) -> None:
        check_int(self.bucket_bytes, f"{_WHERE}.bucket_bytes", minimum=1)
        if self.packing not in PACKINGS:
            raise ManifestError(f"{_WHERE}.packing: must be one of {PACKINGS}, got {self.packing!r}")
        vllm = self.packing == "vllm"
        check_int(self.alignment, f"{_WHERE}.alignment", minimum=1 if vllm else 8)
        if self.alignment & (self.alignment - 1) or (vllm and self.alignment != 1):
            raise ManifestError(f"{_WHERE}.alignment: must be a power of two >= 8 (1 for packing 'vllm'), got "
                                f"{self.alignment}")
        check_version(self.format_version, FORMAT_VERSION, _WHERE)
        check_type(self.buckets, tuple, f"{_WHERE}.buckets")
        seen: set[str] = set()
        for i, b in enumerate(self.buckets):
            self._check_bucket(b, f"{_WHERE}.buckets[{i}]", seen)
            if vllm:
                self._check_vllm_cut(b, f"{_WHERE}.buckets[{i}]", last=i == len(self.buckets) - 1)

    def _check_vllm_cut(self, b: Bucket, where: str, last: bool) -> None:
        """Note [vLLM's packing]: contiguous, cut right after the tensor that passes ``bucket_bytes``."""
        end = 0
        for j, s in enumerate(b.slots):
            if s.offset != end:
                raise ManifestError(f"{where}: tensor {s.name!r} at byte {s.offset}, but vLLM packs tensors with no "
                                    f"gap (expected byte {end}); build plans with plan_vllm_chunks()")
            if s.offset % s.torch_dtype.itemsize:
                raise ManifestError(
                    f"{where}: tensor {s.name!r} ({s.dtype}) would start at byte {s.offset}, not a multiple of its "
                    "element size, where vLLM's receiver cannot view it; order the tensors so each starts aligned "
                    "(e.g. by dtype), or use ipcbridge's receiver"
                )
            if j < len(b.slots) - 1 and s.end > self.bucket_bytes:
                raise ManifestError(f"{where}: vLLM cuts the chunk after {s.name!r} (it passes bucket_bytes "
                                    f"{self.bucket_bytes}), but the plan continues it")
            end = s.end
        if not last and end <= self.bucket_bytes:
            raise ManifestError(f"{where}: ends at byte {end}, within bucket_bytes {self.bucket_bytes}, so vLLM "
                                "would not cut it there; only the last chunk may be that small")

    def _check_bucket(self, b: Any, where: str, seen: set[str]) -> None:
        check_type(b, Bucket, where)
        check_type(b.slots, tuple, f"{where}.slots")
        if not b.slots:
            raise ManifestError(f"{where}: a bucket must hold at least one tensor")
        prev_end = 0
        for s in b.slots:
            check_type(s, Slot, f"{where}.slots")
            if s.name in seen:
                raise ManifestError(f"{_WHERE}: tensor {s.name!r} appears twice")
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
        if self.packing == "aligned" and len(b.slots) > 1 and b.nbytes > self.bucket_bytes:
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
            "alignment": self.alignment, "packing": self.packing,
            "buckets": [[s.to_dict() for s in b.slots] for b in self.buckets],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Any) -> StreamPlan:
        check_format(d, FORMAT, FORMAT_VERSION, _WHERE)
        check_keys(d, {"format", "format_version", "bucket_bytes", "alignment", "buckets"}, {"packing"}, _WHERE)
        check_type(d["buckets"], list, f"{_WHERE}.buckets")
        buckets = []
        for i, b in enumerate(d["buckets"]):
            where = f"{_WHERE}.buckets[{i}]"
            check_type(b, list, where)
            buckets.append(Bucket(tuple(Slot.from_dict(s, f"{where}[{j}]") for j, s in enumerate(b))))
        return cls(buckets=tuple(buckets), bucket_bytes=d["bucket_bytes"], alignment=d["alignment"],
                   format_version=d["format_version"], packing=d.get("packing", "aligned"))

    @classmethod
    def from_json(cls, text: str | bytes) -> StreamPlan:
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            raise ManifestError(f"stream plan is not valid JSON ({e}); pass StreamPlan.to_json()") from e
        return cls.from_dict(d)


NamedSpecs = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.dtype | str, Sequence[int]]]


def plan_buckets(named_specs: NamedSpecs, bucket_bytes: int | None = None,
                 alignment: int = ALIGNMENT) -> StreamPlan:
    """Pack tensors, in the order given, into buckets of at most ``bucket_bytes``. See Note [bucket policy].

    ``named_specs``: ``(name, dtype, shape)`` triples, or a mapping of names to tensors (meta tensors do).
    ``bucket_bytes``: ``None`` picks it by Note [bucket policy].
    """
    specs = list(_specs(named_specs))
    if bucket_bytes is None:  # Note [bucket policy]
        sizes = [nbytes for *_, nbytes in specs]
        bucket_bytes = max(DEFAULT_BUCKET_BYTES, min(max(sizes, default=0), sum(sizes) // TARGET_BUCKETS))
    check_int(bucket_bytes, "bucket_bytes", minimum=1)
    buckets: list[tuple[Slot, ...]] = []
    current: list[Slot] = []
    end = 0
    for name, dt, shape, nbytes in specs:
        offset = -(-end // alignment) * alignment
        if current and offset + nbytes > bucket_bytes:
            buckets.append(tuple(current))
            current, offset = [], 0
        current.append(Slot(name, dt, shape, offset, nbytes))  # validates name, dtype and shape
        end = offset + nbytes
    if current:
        buckets.append(tuple(current))
    return StreamPlan(tuple(Bucket(b) for b in buckets), bucket_bytes, alignment)


def _specs(named_specs: NamedSpecs) -> Iterator[tuple[str, str, tuple[int, ...], int]]:
    items = (((n, t.dtype, t.shape) for n, t in named_specs.items()) if isinstance(named_specs, Mapping)
             else named_specs)
    for name, dtype, shape in items:
        dt = dtype if isinstance(dtype, str) else dtype_name(dtype)
        shape = tuple(int(s) for s in shape)
        yield name, dt, shape, (math.prod(shape) * DTYPES[dt].itemsize if dt in DTYPES else 0)


def plan_vllm_chunks(named_specs: NamedSpecs, buffer_size_bytes: int) -> StreamPlan:
    """The chunks vLLM's stock NCCL receiver expects for these tensors, in this order. Note [vLLM's packing].

    ``buffer_size_bytes`` is vLLM's ``packed_buffer_size_bytes``; both sides must use the same value.
    """
    check_int(buffer_size_bytes, "buffer_size_bytes", minimum=1)
    buckets: list[Bucket] = []
    current: list[Slot] = []
    total = 0
    for name, dt, shape, nbytes in _specs(named_specs):
        current.append(Slot(name, dt, shape, total, nbytes))
        total += nbytes
        if total > buffer_size_bytes:  # packed_tensor.py: `if total_bytes > buffer_size_bytes: break`
            buckets.append(Bucket(tuple(current)))
            current, total = [], 0
    if current:
        buckets.append(Bucket(tuple(current)))
    return StreamPlan(tuple(buckets), buffer_size_bytes, alignment=1, packing="vllm")


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

    The caller owns ``buffer``; the views alias it. They go stale as soon as the buffer is reused (the
    next-but-one bucket of a stream) or freed, so copy what you need before that. Writing through them
    writes the buffer (which is how a sender packs a fused tensor from its parts).
    """
    _check_buffer(buffer, bucket)
    return {s.name: _view(buffer, s) for s in bucket.slots}


def pack(tensors: Mapping[str, torch.Tensor], bucket: Bucket, out: torch.Tensor) -> None:
    """Copy ``bucket``'s tensors from ``tensors`` (any device; same dtype and shape) into ``out``.

    ``out`` stays the caller's; nothing keeps a reference to it or to ``tensors`` after the call.
    """
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
        _view(out, s).copy_(t.detach())  # a parameter that requires grad: the wire needs no autograd history

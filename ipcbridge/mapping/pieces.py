"""The one strided view an HF tensor's copied pieces make: from a loader's copies to a :class:`Landing`.

The recorder (:mod:`ipcbridge.vllm.loader_plan`) sees a loader copy one HF tensor into parameters in one or
more *pieces* (the vocab rows, one expert's gate rows, ...). A piece pairs, element for element, HF flat
indices with element offsets in one parameter. :func:`landing` checks that the pieces of one HF tensor cover
it exactly once, in one parameter, at ``offset + sum(i_k * stride_k)``, and returns that landing; otherwise
``MappingError`` naming the tensor and what is wrong.

Note [pieces stay symbolic]
    A piece the loader made by views alone is affine on both sides: position ``p`` of the piece's shape holds
    HF flat index ``src_offset + sum(p_i * src_stride_i)`` and goes to parameter offset ``dst_offset +
    sum(p_i * dst_stride_i)`` (:class:`AffinePiece`). That is a few small tuples however large the tensor
    (an 8B model's 525M-element embedding too), and checking it against the candidate view is arithmetic on
    those tuples whenever each of its dimensions walks one HF dimension without wrapping, which is what
    narrow, chunk, unbind, select and transpose make. Pieces that fail that test, and pieces a loader made
    with copying ops (:class:`ExplicitPiece`), are checked element by element, ``CHUNK`` elements at a time.
    Coverage follows from counting when the pieces' flat extents are disjoint and each piece is injective;
    otherwise one byte per element of this one HF tensor proves it. So the memory a derived plan costs is
    that of the largest piece a loader copies with a non-view op, not 8 bytes per weight of the model.

Pure: names, numbers and CPU int64 tensors; nothing here touches a parameter.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ipcbridge.errors import ManifestError, MappingError
from ipcbridge.mapping.derived import Landing
from ipcbridge.wire import check_strides

#: Elements per chunk when a piece is checked element by element (three int64 temporaries of this size).
CHUNK = 1 << 22


def affine_values(offset: int, stride: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """``offset + sum(p_i * stride_i)`` for every position ``p`` of ``shape``, flat, as int64."""
    out = torch.full((), offset, dtype=torch.int64)
    for k, (n, s) in enumerate(zip(shape, stride, strict=True)):
        out = out + (torch.arange(n, dtype=torch.int64) * s).view([n if i == k else 1 for i in range(len(shape))])
    return out.expand(tuple(shape)).reshape(-1)


@dataclass(frozen=True)
class AffinePiece:
    """A copy made by views only (Note [pieces stay symbolic])."""

    target: str
    shape: tuple[int, ...]
    src_offset: int
    src_stride: tuple[int, ...]
    dst_offset: int
    dst_stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def injective(self) -> bool:
        """Whether no two positions read the same HF element (no expanded dimension, no overlap)."""
        try:
            check_strides(self.shape, self.src_stride, "piece")
        except ManifestError:
            return False
        return all(s >= 0 for s in self.src_stride)

    def src_extent(self) -> tuple[int, int]:
        """The smallest and largest HF flat index the piece reads."""
        lo = self.src_offset + sum((n - 1) * s for n, s in zip(self.shape, self.src_stride, strict=True) if s < 0)
        hi = self.src_offset + sum((n - 1) * s for n, s in zip(self.shape, self.src_stride, strict=True) if s > 0)
        return lo, hi

    def dst_of(self, flat: int) -> int | None:
        """The parameter offset HF flat index ``flat`` goes to, if this (injective) piece reads it."""
        rem, off = flat - self.src_offset, self.dst_offset
        for s, n, d in sorted(zip(self.src_stride, self.shape, self.dst_stride, strict=True), reverse=True):
            if n == 1:
                continue
            q = rem // s
            if not 0 <= q < n:
                return None
            rem, off = rem - q * s, off + q * d
        return off if rem == 0 else None

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from _affine_chunks(self.shape, self.src_offset, self.src_stride, self.dst_offset, self.dst_stride)


def _affine_chunks(shape: tuple[int, ...], so: int, ss: tuple[int, ...], do: int,
                   ds: tuple[int, ...]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if not shape or math.prod(shape) <= CHUNK:
        yield affine_values(so, ss, shape), affine_values(do, ds, shape)
        return
    inner = math.prod(shape[1:])
    if inner > CHUNK:
        for i in range(shape[0]):
            yield from _affine_chunks(shape[1:], so + i * ss[0], ss[1:], do + i * ds[0], ds[1:])
        return
    step = CHUNK // inner
    for start in range(0, shape[0], step):
        sub = (min(step, shape[0] - start), *shape[1:])
        yield affine_values(so + start * ss[0], ss, sub), affine_values(do + start * ds[0], ds, sub)


@dataclass(frozen=True, eq=False)
class ExplicitPiece:
    """A copy whose HF indices a loader computed with a copying op (``contiguous`` of a transpose, ``cat``):
    ``src`` (HF flat indices) and ``dst`` (parameter offsets), flat int64 CPU tensors of one length."""

    target: str
    src: torch.Tensor
    dst: torch.Tensor

    @property
    def numel(self) -> int:
        return int(self.src.numel())

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, max(self.numel, 1), CHUNK):
            yield self.src[start:start + CHUNK], self.dst[start:start + CHUNK]


Piece = AffinePiece | ExplicitPiece


def _contiguous_strides(shape: tuple[int, ...]) -> list[int]:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return out[::-1]


def _dst_of(pieces: Sequence[Piece], flat: int) -> int | None:
    for p in pieces:
        if isinstance(p, AffinePiece) and p.injective():
            hit = p.dst_of(flat)
        else:
            hit = next((int(d[s == flat][0]) for s, d in p.chunks() if bool((s == flat).any())), None)
        if hit is not None:
            return hit
    return None


def _candidate(name: str, shape: tuple[int, ...], pieces: Sequence[Piece]) -> tuple[int, list[int]]:
    """The view the pieces must make: where HF element 0 went, and one step along each dimension."""
    contiguous = _contiguous_strides(shape)
    base = _dst_of(pieces, 0)
    if base is None:
        raise MappingError(f"{name}: part of it never lands in {pieces[0].target}; not a view")
    stride: list[int] = []
    for k in reversed(range(len(shape))):
        if shape[k] > 1:
            step = _dst_of(pieces, contiguous[k])
            if step is None:
                raise MappingError(f"{name}: part of it never lands in {pieces[0].target}; not a view")
            stride.append(step - base)
        else:  # size-1 dimensions: the stride torch gives them, so plans compare equal
            stride.append(stride[-1] * shape[k + 1] if stride else 1)
    return base, stride[::-1]


def _walks(p: AffinePiece, shape: tuple[int, ...], contiguous: list[int]) -> list[int] | None:
    """For each piece dimension, the HF dimension it walks without wrapping (-1 for size 1); ``None`` if
    some dimension does not (Note [pieces stay symbolic]: then the piece is checked element by element)."""
    if not 0 <= p.src_offset < max(math.prod(shape), 1):
        return None
    start = [(p.src_offset // c) % n for c, n in zip(contiguous, shape, strict=True)]
    used: set[int] = set()
    walks = []
    for n, s in zip(p.shape, p.src_stride, strict=True):
        if n == 1:
            walks.append(-1)
            continue
        j = next((j for j in reversed(range(len(shape))) if contiguous[j] == s and shape[j] > 1 and j not in used),
                 None)
        if j is None or start[j] + n > shape[j]:
            return None
        used.add(j)
        walks.append(j)
    return walks


def _check_piece(name: str, shape: tuple[int, ...], base: int, stride: list[int], p: Piece) -> None:
    contiguous = _contiguous_strides(shape)
    walks = _walks(p, shape, contiguous) if isinstance(p, AffinePiece) else None
    if walks is not None and isinstance(p, AffinePiece):
        start = [(p.src_offset // c) % n for c, n in zip(contiguous, shape, strict=True)]
        ok = p.dst_offset == base + sum(h * s for h, s in zip(start, stride, strict=True)) and all(
            j < 0 or d == stride[j] for j, d in zip(walks, p.dst_stride, strict=True))
    else:
        ok = True
        for src, dst in p.chunks():
            if bool(((src < 0) | (src >= math.prod(shape))).any()):
                ok = False
                break
            expected = torch.full_like(src, base)
            for c, n, s in zip(contiguous, shape, stride, strict=True):
                expected += (src // c) % n * s
            if not torch.equal(expected, dst):
                ok = False
                break
    if not ok:
        raise MappingError(
            f"{name}: its elements land in {p.target} in an order no strided view has (a permutation)")


def _covered_once(numel: int, pieces: Sequence[Piece]) -> bool:
    """Whether the pieces, which hold ``numel`` elements in all, read every HF element (so each once)."""
    if all(isinstance(p, AffinePiece) and p.injective() for p in pieces):
        extents = sorted(p.src_extent() for p in pieces if isinstance(p, AffinePiece) and p.numel)
        if all(a[1] < b[0] for a, b in itertools.pairwise(extents)):
            return True
    seen = torch.zeros(numel, dtype=torch.bool)
    for p in pieces:
        for src, _ in p.chunks():
            seen[src] = True
    return bool(seen.all())


def landing(name: str, shape: tuple[int, ...], pieces: Sequence[Piece]) -> Landing:
    """The one strided view ``pieces`` make of HF tensor ``name`` (of ``shape``), or ``MappingError`` why not."""
    shape = tuple(shape)
    numel = math.prod(shape)
    if not pieces:
        raise MappingError(f"{name}: vLLM's loader did not copy it into any parameter (it skipped or renamed it)")
    targets = sorted({p.target for p in pieces})
    if "" in targets:
        raise MappingError(f"{name}: vLLM's loader copies it into a tensor that is not a model parameter")
    if len(targets) > 1:
        raise MappingError(f"{name}: vLLM's loader splits it over {targets}; one HF tensor must be one view")
    total = sum(p.numel for p in pieces)
    if total != numel:
        what = "never lands" if total < numel else "lands more than once"
        raise MappingError(f"{name}: part of it {what} in {targets[0]}; not a view")
    if numel == 0:
        return Landing(hf=name, target=targets[0], offset=0, shape=shape, stride=tuple(_contiguous_strides(shape)))
    if not _covered_once(numel, pieces):
        raise MappingError(f"{name}: part of it lands more than once in {targets[0]} (and part never); not a view")
    base, stride = _candidate(name, shape, pieces)
    for p in pieces:
        _check_piece(name, shape, base, stride, p)
    try:
        return Landing(hf=name, target=targets[0], offset=base, shape=shape, stride=tuple(stride))
    except ValueError as e:  # negative strides, overlaps: not a trainable view
        raise MappingError(f"{name}: lands in {targets[0]} as no trainable view ({e})") from None

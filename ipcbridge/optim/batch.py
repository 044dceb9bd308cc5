"""The codec over a chunk of tensors at once: the fused kernels where they run, the eager codec elsewhere.

:mod:`ipcbridge.optim.codec` is the reference (one tensor, eager); :mod:`ipcbridge.optim.kernels` does the
same for a whole chunk in one launch per operation (Note [fused codec kernels]). Every function here
gives bit-identical results either way; which way runs is decided per call: the kernels when every
tensor is usable by them and the served tensors share a dtype, else the eager loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ipcbridge.optim import codec, kernels
from ipcbridge.optim.codec import Exceptions

logger = logging.getLogger(__name__)


@dataclass
class Masters:
    """fp32 tensors of one chunk (masters or gradients). ``flat`` is the one buffer they are views of
    when the fused kernels made them (the kernels address the chunk through it), else ``None``."""

    tensors: list[torch.Tensor]
    flat: torch.Tensor | None = None


def _fused(*groups: list[torch.Tensor]) -> bool:
    first = groups[0]
    return bool(first) and len({t.dtype for t in first}) == 1 and all(kernels.usable(*g) for g in groups)


def upcast(tensors: list[torch.Tensor]) -> Masters:
    """``tensors`` in fp32 (gradients for the step, or stochastic mode's masters), as new tensors."""
    if _fused(tensors):
        flat = kernels.upcast(tensors)
        return Masters(kernels.views(flat, kernels.layout(_numels(tensors), flat.device), _shapes(tensors)), flat)
    return Masters([t.to(torch.float32, copy=True) for t in tensors])


def join(served: list[torch.Tensor], remainders: list[torch.Tensor], exceptions: list[Exceptions]) -> Masters:
    """The exact fp32 masters of ``served`` from their remainders and exceptions."""
    if not _fused(served, remainders):
        return Masters([codec.join_master(s, r, e) for s, r, e in zip(served, remainders, exceptions, strict=True)])
    flat = kernels.join(served, remainders)
    lay = kernels.layout(_numels(served), flat.device)
    with_exc = [(o, e) for o, e in zip(lay.host_offsets, exceptions, strict=True) if len(e)]
    if with_exc:  # one scatter for the chunk: each tensor's indices moved to its place in the flat buffer
        index = torch.cat([e.index for _, e in with_exc])
        shift = torch.repeat_interleave(kernels.device_ints([o for o, _ in with_exc], flat.device),
                                        kernels.device_ints([len(e) for _, e in with_exc], flat.device),
                                        output_size=index.numel())
        flat.index_copy_(0, index + shift, torch.cat([e.value for _, e in with_exc]))
    return Masters(kernels.views(flat, lay, _shapes(served)), flat)


@dataclass
class Split:
    """The outcome of :func:`split` for one chunk: its exceptions, or (bf16 on the fused path) the device
    buffers they are in, read by :func:`finish` with one sync for a whole step."""

    done: list[Exceptions] | None = None
    counts: torch.Tensor | None = None  # int32 [T] on the device
    index: torch.Tensor | None = None
    value: torch.Tensor | None = None
    layout: kernels.Layout | None = None

    def _slice(self, t: int, n: int) -> Exceptions:
        assert self.index is not None and self.value is not None and self.layout is not None
        o = self.layout.host_exc_offsets[t]
        return Exceptions(self.index[o:o + n], self.value[o:o + n]) if n else Exceptions.none(self.index.device)

    def _take(self, counts: list[int]) -> list[Exceptions]:
        assert self.layout is not None
        caps = self.layout.host_capacities
        spilled = sum(max(0, n - cap) for n, cap in zip(counts, caps, strict=True))
        if spilled:
            logger.warning("%d bf16 ties were served rounded up rather than to even: more than a tensor's "
                           "exception slots (the masters stay exact)", spilled)
        return [self._slice(t, min(n, cap)) for t, (n, cap) in enumerate(zip(counts, caps, strict=True))]


def split(masters: Masters, served: list[torch.Tensor], remainders: list[torch.Tensor]) -> Split:
    """Round each master to nearest even into ``served`` and keep the exact rest in ``remainders``, in
    place. For bf16 on the fused path the exceptions stay on the device until :func:`finish` (a tie
    beyond a tensor's slots is served rounded up: Note [fused codec kernels]); elsewhere they are
    gathered now, with one sync for the chunk."""
    if masters.flat is None or not _fused(served, remainders):
        return Split(_split_eager(masters.tensors, served, remainders))
    counts, index, value, lay = kernels.split(masters.flat, served, remainders)
    pending = Split(None, counts, index, value, lay)
    if served[0].dtype == torch.bfloat16:
        return pending
    out = []
    for t, n in enumerate(counts.tolist()):  # the one sync
        if n > lay.host_capacities[t]:  # fp16: overflows past the slots need the masters, alive now
            out.append(codec.gather_exceptions(masters.tensors[t], codec.overflow(served[t], masters.tensors[t])[1]))
        else:
            out.append(pending._slice(t, n))
    return Split(out)


def finish(splits: list[Split]) -> list[list[Exceptions]]:
    """The exceptions of every split of a step, reading the device counts of all of them at once."""
    waiting = [s for s in splits if s.done is None]
    if waiting:
        counts = torch.cat([s.counts for s in waiting]).tolist()  # type: ignore[misc]  # the one sync
        for s in waiting:
            n = len(s.counts)  # type: ignore[arg-type]
            s.done, counts = s._take(counts[:n]), counts[n:]
    return [s.done for s in splits]  # type: ignore[misc]


def _split_eager(masters: list[torch.Tensor], served: list[torch.Tensor],
                 remainders: list[torch.Tensor]) -> list[Exceptions]:
    pending = [codec.begin_split(s, m) for s, m in zip(served, masters, strict=True)]
    counts = torch.stack([mask.sum() for _, mask in pending]).tolist() if pending else []  # the one sync
    return [codec.end_split(m, rem, r, mask, n)
            for (r, mask), m, rem, n in zip(pending, masters, remainders, counts, strict=True)]


def stochastic_round(masters: Masters, served: list[torch.Tensor], generator: torch.Generator | None,
                     seed: int) -> None:
    """Round each master into ``served`` stochastically: the fused kernel keyed by ``seed`` for bf16
    chunks it can take, else :func:`~ipcbridge.optim.codec.stochastic_round_` with ``generator``."""
    if masters.flat is not None and _fused(served) and served[0].dtype == torch.bfloat16:
        kernels.stochastic_round(masters.flat, served, seed)
        return
    for s, m in zip(served, masters.tensors, strict=True):
        codec.stochastic_round_(s, m, generator)


def _numels(tensors: list[torch.Tensor]) -> tuple[int, ...]:
    return tuple(t.numel() for t in tensors)


def _shapes(tensors: list[torch.Tensor]) -> list[torch.Size]:
    return [t.shape for t in tensors]

"""Pure encode/decode of an fp32 master weight against its bf16/fp16 served copy.

Note [the remainder identity]
    Let ``m`` be an fp32 master weight and ``h = m.to(bf16)`` its round-to-nearest-even served copy.
    ``h.float()`` is exact, and fp32 bit patterns of one sign are ordered like their magnitudes, so
    ``r = bits(m) - bits(h.float())`` counts the fp32 values between them and ``bits(h.float()) + r``
    gives ``m`` back bit for bit. Rounding never changes the sign (a tiny negative rounds to -0), so the
    subtraction never crosses the sign bit.

    For bf16, ``h.float()`` is ``m`` with its low 16 bits rounded away, so ``|r| <= 2**15``: a signed
    16-bit remainder holds every value but one, ``r = +2**15``. That is a tie (low bits exactly
    ``0x8000``) rounded *down* to an even ``h``; its mirror, a tie rounded up, is ``-2**15``. Both have
    an even ``h``, so no per-element encoding of 16 bits can tell them apart. Megatron and Transformer
    Engine round ties away from zero to dodge this, which makes their served weights differ from
    ``m.to(bf16)`` about once per 2**17 element-steps. We keep round-to-nearest-even, bit-identical to
    classic mixed precision, and store the rare elements whose ``r`` does not fit in int16 as a sparse
    exception list of (flat index, exact fp32 value).

    For fp16 the same subtraction works; ``|r| <= 2**13`` for every ``m`` whose fp16 copy is normal.
    Masters below fp16's normal range (``|m| < 2**-14``, where the fp16 grid is coarse but fp32's is
    not) or above it (``h`` is inf) are exceptions. For weights drawn like N(0, 0.02) that is about 0.2%
    of elements, 12 bytes each.

The functions here are pure (tensors in, tensors out) so they are tested without a model or optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Served dtypes whose master can be rebuilt from a 16-bit remainder. See Note [the remainder identity].
HALF_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)

_R_MIN, _R_MAX = -(1 << 15), (1 << 15) - 1  # int16's range


@dataclass(frozen=True)
class Exceptions:
    """Elements whose remainder does not fit in int16: flat indices and their exact fp32 masters."""

    index: torch.Tensor  # int64, 1-D
    value: torch.Tensor  # float32, 1-D, same length

    def __post_init__(self) -> None:
        if self.index.dtype != torch.int64 or self.value.dtype != torch.float32:
            raise ValueError(f"exceptions must be int64 indices and float32 values, got "
                             f"{self.index.dtype} and {self.value.dtype}")
        if self.index.dim() != 1 or self.index.shape != self.value.shape:
            raise ValueError(f"exception index and value must be 1-D of one length, got "
                             f"{tuple(self.index.shape)} and {tuple(self.value.shape)}")

    @staticmethod
    def none(device: torch.device | str) -> Exceptions:
        return Exceptions(torch.empty(0, dtype=torch.int64, device=device),
                          torch.empty(0, dtype=torch.float32, device=device))

    def __len__(self) -> int:
        return self.index.numel()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def join_master(served: torch.Tensor, remainder: torch.Tensor, exceptions: Exceptions) -> torch.Tensor:
    """The exact fp32 master of ``served`` (bf16/fp16) from its int16 ``remainder``: a new tensor."""
    master = served.to(torch.float32)
    _bits(master).add_(remainder)  # int32 += int16 widens in the kernel, with no int32 copy
    if len(exceptions):
        master.view(-1).index_copy_(0, exceptions.index, exceptions.value)
    return master


def overflow(served: torch.Tensor, master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int32 remainder of ``master`` against the rounded ``served``, and where it leaves int16."""
    r = _bits(master) - _bits(served.to(torch.float32))
    return r, (r < _R_MIN) | (r > _R_MAX)


def gather_exceptions(master: torch.Tensor, mask: torch.Tensor) -> Exceptions:
    index = mask.view(-1).nonzero().view(-1)
    return Exceptions(index, master.reshape(-1).index_select(0, index))


def begin_split(served: torch.Tensor, master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``master`` to nearest even into ``served``; return its int32 remainder and where it overflows.
    The caller counts the overflows (a device sync: batch them) and passes the count to :func:`end_split`."""
    served.copy_(master)
    return overflow(served, master)


def end_split(master: torch.Tensor, remainder: torch.Tensor, r: torch.Tensor, mask: torch.Tensor,
              n: int) -> Exceptions:
    """Store ``r`` into the int16 ``remainder`` and return the ``n`` elements that overflow it."""
    if n:
        r.masked_fill_(mask, 0)
    remainder.copy_(r)
    return gather_exceptions(master, mask) if n else Exceptions.none(master.device)


def encode_remainder(served: torch.Tensor, master: torch.Tensor, remainder: torch.Tensor) -> Exceptions:
    """Round ``master`` to nearest even into ``served`` and keep the exact rest in ``remainder``, in
    place; returns the exceptions (Note [the remainder identity]). Syncs once, to count them."""
    r, mask = begin_split(served, master)
    return end_split(master, remainder, r, mask, int(mask.sum()))


def stochastic_round_(served: torch.Tensor, master: torch.Tensor, generator: torch.Generator | None) -> None:
    """Write ``master`` into ``served`` (bf16/fp16) rounded up or down at random, unbiased.

    Each element becomes one of its two neighbours on the served grid, the far one with probability
    (distance to the near one) / (gap between them), so its expectation is the master. For bf16 that is
    adding 16 uniform random bits below the kept half and truncating (fp32 bit patterns order like
    magnitudes); fp16 is not a prefix of fp32 and takes the general route. Infinities and NaNs round to
    nearest.
    """
    if served.dtype == torch.bfloat16:
        noise = torch.randint(0, 1 << 16, master.shape, generator=generator, device=master.device,
                              dtype=torch.int32)
        high = (_bits(master) + noise).bitwise_right_shift_(16).to(torch.int16).view(torch.bfloat16)
        served.copy_(torch.where(master.isfinite(), high, master.to(torch.bfloat16)))
        return
    near = master.to(served.dtype)
    near32 = near.to(torch.float32)
    toward = torch.where(master > near32, float("inf"), float("-inf")).to(served.dtype)
    far32 = torch.nextafter(near, toward).to(torch.float32)
    p_far = (master - near32) / (far32 - near32)  # in [0, 0.5]; NaN for non-finite, which never wins
    u = torch.rand(master.shape, generator=generator, device=master.device, dtype=torch.float32)
    served.copy_(torch.where(u < p_far, far32, near32))

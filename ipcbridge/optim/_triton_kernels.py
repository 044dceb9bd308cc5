"""The Triton kernels of :mod:`ipcbridge.optim.kernels` (Note [fused codec kernels] there).

This module imports Triton at import time; :mod:`ipcbridge.optim.kernels` imports it only on first use,
so that nothing in ipcbridge needs Triton unless a CUDA chunk is stepped.
"""

import triton
import triton.language as tl

# Tensors are reached as base + delta: ``base`` is a kernel argument (the first tensor), so Triton
# knows its alignment, and ``delta`` (elements) is declared a multiple of 16 bytes; an address loaded
# from a table and cast to a pointer would lose that, and with it the vectorized loads.

@triton.jit
def _at(base, deltas, t, offs):
    step: tl.constexpr = 128 // base.dtype.element_ty.primitive_bitwidth  # elements in 16 bytes
    return base + tl.multiple_of(tl.load(deltas + t), step) + offs


@triton.jit
def _block(block_tensor, block_start, numels, BLOCK: tl.constexpr):
    t = tl.load(block_tensor + tl.program_id(0))
    offs = tl.multiple_of(tl.load(block_start + tl.program_id(0)), BLOCK) + tl.arange(0, BLOCK)
    return t, offs, offs < tl.multiple_of(tl.load(numels + t), 8)


@triton.jit
def _flat_at(flat, offsets, t, offs):
    return flat + tl.multiple_of(tl.load(offsets + t), 4) + offs


@triton.jit
def join_kernel(served, served_d, rem, rem_d, out, offsets, numels, block_tensor, block_start,
                BLOCK: tl.constexpr):
    t, offs, mask = _block(block_tensor, block_start, numels, BLOCK)
    hi = tl.load(_at(served, served_d, t, offs), mask=mask).to(tl.float32).to(tl.int32, bitcast=True)
    r = tl.load(_at(rem, rem_d, t, offs), mask=mask).to(tl.int32)
    tl.store(_flat_at(out, offsets, t, offs), (hi + r).to(tl.float32, bitcast=True), mask=mask)


@triton.jit
def upcast_kernel(src, src_d, out, offsets, numels, block_tensor, block_start, BLOCK: tl.constexpr):
    t, offs, mask = _block(block_tensor, block_start, numels, BLOCK)
    x = tl.load(_at(src, src_d, t, offs), mask=mask).to(tl.float32)
    tl.store(_flat_at(out, offsets, t, offs), x, mask=mask)


@triton.jit
def split_kernel(master, served, served_d, rem, rem_d, counts, exc_index, exc_value, exc_offsets, capacities,
                 offsets, numels, block_tensor, block_start, BLOCK: tl.constexpr):
    t, offs, mask = _block(block_tensor, block_start, numels, BLOCK)
    m = tl.load(_flat_at(master, offsets, t, offs), mask=mask)
    h = m.to(served.dtype.element_ty)  # round to nearest even
    r = m.to(tl.int32, bitcast=True) - h.to(tl.float32).to(tl.int32, bitcast=True)
    over = ((r < -32768) | (r > 32767)) & mask
    if tl.sum(over.to(tl.int32), axis=0) > 0:  # rare: most blocks skip the atomics
        # Each overflowing element claims a slot; past the capacity only the count grows.
        slot = tl.atomic_add(counts + t + tl.zeros_like(offs), 1, mask=over)
        keep = over & (slot < tl.load(capacities + t))
        if served.dtype.element_ty == tl.bfloat16:
            # A bf16 overflow is a tie rounded down (r = +2**15). One that found no slot is served rounded
            # up instead (r = -2**15 fits): the master stays exact, the served weight is one ulp from
            # round-to-nearest-even (Note [fused codec kernels]).
            spill = over & ~keep
            h = tl.where(spill, (h.to(tl.int16, bitcast=True) + 1).to(tl.bfloat16, bitcast=True), h)
            r = tl.where(spill, r - 65536, r)
            over = keep
        at = tl.load(exc_offsets + t) + slot
        tl.store(exc_index + at, offs, mask=keep)
        tl.store(exc_value + at, m, mask=keep)
    tl.store(_at(served, served_d, t, offs), h, mask=mask)
    tl.store(_at(rem, rem_d, t, offs), tl.where(over, 0, r).to(tl.int16), mask=mask)


@triton.jit
def stochastic_kernel(master, served, served_d, seed, offsets, numels, block_tensor, block_start,
                      BLOCK: tl.constexpr):
    t, offs, mask = _block(block_tensor, block_start, numels, BLOCK)
    at = tl.multiple_of(tl.load(offsets + t), 4) + offs
    m = tl.load(master + at, mask=mask)
    noise = (tl.randint(seed, at.to(tl.uint32)) & 0xFFFF).to(tl.int32)
    high = ((m.to(tl.int32, bitcast=True) + noise) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    finite = (m == m) & (tl.abs(m) < float("inf"))
    tl.store(_at(served, served_d, t, offs), tl.where(finite, high, m.to(tl.bfloat16)), mask=mask)

"""Multi-tensor CUDA kernels (Triton) for the remainder codec of :mod:`ipcbridge.optim.codec`.

Note [fused codec kernels]
    Rebuilding a master and splitting it again in eager PyTorch takes about ten elementwise passes
    (casts, a bit subtraction, two comparisons, a fill, a narrowing copy): some 60 bytes of memory
    traffic per element. One kernel per tensor fixed the bytes but not the launches: with about ten
    launches and allocations per parameter, a 1B model's step was bound by the CPU (about 150 us per
    parameter). These kernels work like torch's ``multi_tensor_apply``: one launch covers every tensor
    of a chunk, each program one block of one tensor (a block table, built once per chunk layout and
    cached), the tensors reached through a table of their addresses. The fp32 masters and gradients
    of a chunk live in one flat buffer each.

    :func:`join` reads the served 16-bit weight and the remainder and writes the fp32 master (8 bytes
    per element); :func:`split` reads the master and writes the rounded served weight and the remainder
    (8 bytes), and records the rare elements whose remainder leaves int16 (index and exact value) into
    per-tensor slots, counting them with atomics, so the caller learns with one device sync per chunk
    whether a tensor had more than its slots hold (then eager code gathers them). Results are
    bit-identical to the eager functions' (``tests/gpu/test_master_weights_gpu.py``): integer
    arithmetic is exact, and Triton's fp32 -> bf16/fp16 cast rounds to nearest even like torch's.

    Triton ships with CUDA builds of torch and is imported on first use, never at import time. Without
    it, or for CPU, non-contiguous or unaligned tensors, :func:`usable` is false and the eager path runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

_BLOCK = 4096  # elements per program
_ALIGN = 16  # bytes: the kernels promise Triton 16-byte-aligned tensors, so its loads are vectorized


@functools.cache
def _kernels() -> dict[str, Any] | None:
    """The compiled-on-first-use kernels, or ``None`` without Triton (Note [fused codec kernels])."""
    try:
        from ipcbridge.optim import _triton_kernels as k
    except ImportError:
        return None
    return {"join": k.join_kernel, "upcast": k.upcast_kernel, "split": k.split_kernel,
            "stochastic": k.stochastic_kernel}


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels can run on ``tensors``: CUDA, contiguous, 16-byte aligned, a multiple of 8
    elements (the kernels promise Triton both, for vectorized loads), and Triton importable."""
    return all(t.is_cuda and t.is_contiguous() and t.data_ptr() % _ALIGN == 0 and t.numel() % 8 == 0
               for t in tensors) and _kernels() is not None


def exception_capacity(numel: int) -> int:
    """Exception slots :func:`split` keeps per tensor: 32x the expected count for bf16 (a tie rounded
    down is about one element in 2**17). fp16 and adversarial inputs may exceed it, which costs speed
    (an eager gather), never exactness."""
    return numel // 4096 + 64


def _padded(n: int) -> int:
    return -(-n // 4) * 4  # flat-buffer offsets stay 16-byte aligned for fp32


@dataclass(frozen=True)
class Layout:
    """Device tables for one list of tensor sizes (a chunk): where each tensor's blocks and its slices
    of the flat fp32 buffer and of the exception buffers are. Built once per layout, then cached."""

    numels: torch.Tensor  # int64 [T]
    offsets: torch.Tensor  # int64 [T], into the flat fp32 buffer
    exc_offsets: torch.Tensor  # int64 [T], into the exception buffers
    capacities: torch.Tensor  # int64 [T]
    block_tensor: torch.Tensor  # int32 [B]
    block_start: torch.Tensor  # int64 [B]
    host_numels: tuple[int, ...]
    host_offsets: tuple[int, ...]
    host_exc_offsets: tuple[int, ...]
    host_capacities: tuple[int, ...]
    total: int
    exc_total: int


@functools.lru_cache(maxsize=256)
def layout(numels: tuple[int, ...], device: torch.device) -> Layout:
    offsets, exc_offsets, caps, o, e = [], [], [], 0, 0
    for n in numels:
        offsets.append(o)
        exc_offsets.append(e)
        caps.append(exception_capacity(n))
        o, e = o + _padded(n), e + caps[-1]
    blocks = torch.tensor([-(-n // _BLOCK) for n in numels], dtype=torch.int64)
    block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), blocks)
    first = torch.cumsum(blocks, 0) - blocks
    block_start = (torch.arange(int(blocks.sum()), dtype=torch.int64) - first[block_tensor.long()]) * _BLOCK

    def dev(values: Any, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.as_tensor(values, dtype=dtype).to(device)

    return Layout(dev(list(numels)), dev(offsets), dev(exc_offsets), dev(caps), dev(block_tensor, torch.int32),
                  dev(block_start), numels, tuple(offsets), tuple(exc_offsets), tuple(caps), o, e)


def _deltas(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(base, deltas)``: the first tensor and each tensor's distance from it, in elements (Note [fused
    codec kernels]; :func:`usable` checked that every address is aligned)."""
    base, size = tensors[0], tensors[0].element_size()
    return base, device_ints([(t.data_ptr() - base.data_ptr()) // size for t in tensors], base.device)


def device_ints(values: list[int], device: torch.device) -> torch.Tensor:
    """``values`` as an int64 tensor on ``device``, copied from pinned memory without waiting.

    A copy from pageable memory makes the CUDA stream synchronize first; a step of 1B parameters made
    about ten such copies, and the device idled for each. The caching host allocator keeps the pinned
    buffer until the copy is done.
    """
    pinned = device.type == "cuda"
    return torch.tensor(values, dtype=torch.int64, pin_memory=pinned).to(device, non_blocking=pinned)


def views(flat: torch.Tensor, lay: Layout, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """The per-tensor views of a flat fp32 buffer laid out by ``lay``."""
    return [flat[o:o + shape.numel()].view(shape) for o, shape in zip(lay.host_offsets, shapes, strict=True)]


def _launch(name: str, lay: Layout, *args: Any) -> None:
    kernel = _kernels()[name]  # type: ignore[index]  # callers checked usable()
    kernel[(lay.block_tensor.numel(),)](*args, lay.numels, lay.block_tensor, lay.block_start, BLOCK=_BLOCK)


def _new_flat(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, Layout]:
    device = tensors[0].device
    lay = layout(tuple(t.numel() for t in tensors), device)
    return torch.empty(lay.total, dtype=torch.float32, device=device), lay


def join(served: list[torch.Tensor], remainders: list[torch.Tensor]) -> torch.Tensor:
    """The fp32 masters of ``served`` (one dtype) from ``remainders``, exceptions not applied: one new
    flat buffer (:func:`views` cuts it into tensors)."""
    flat, lay = _new_flat(served)
    _launch("join", lay, *_deltas(served), *_deltas(remainders), flat, lay.offsets)
    return flat


def upcast(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``tensors`` (one dtype) in fp32, as one new flat buffer (:func:`views` cuts it into tensors)."""
    flat, lay = _new_flat(tensors)
    _launch("upcast", lay, *_deltas(tensors), flat, lay.offsets)
    return flat


def split(flat: torch.Tensor, served: list[torch.Tensor], remainders: list[torch.Tensor],
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Layout]:
    """Round the masters in ``flat`` into ``served`` and their remainders into ``remainders`` (0 where it
    overflows). Returns per-tensor overflow counts (int32, on the device), the exception index and value
    buffers, and the layout that gives each tensor's slots in them."""
    device = flat.device
    lay = layout(tuple(t.numel() for t in served), device)
    counts = torch.zeros(len(served), dtype=torch.int32, device=device)
    index = torch.empty(lay.exc_total, dtype=torch.int64, device=device)
    value = torch.empty(lay.exc_total, dtype=torch.float32, device=device)
    _launch("split", lay, flat, *_deltas(served), *_deltas(remainders), counts, index, value, lay.exc_offsets,
            lay.capacities, lay.offsets)
    return counts, index, value, lay


def stochastic_round(flat: torch.Tensor, served: list[torch.Tensor], seed: int) -> None:
    """Stochastic rounding of the masters in ``flat`` into bf16 ``served``, with Philox noise keyed by
    ``seed`` and each element's place in the buffer."""
    lay = layout(tuple(t.numel() for t in served), flat.device)
    _launch("stochastic", lay, flat, *_deltas(served), seed, lay.offsets)

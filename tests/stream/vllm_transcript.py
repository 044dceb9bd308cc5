"""vLLM's packed NCCL weight transfer, transcribed from its source so the CPU tests can check wire compatibility.

Not a test module. Transcribed from the vllm==0.25.1 wheel, ``vllm/distributed/weight_transfer/packed_tensor.py``:
``unpack_tensor`` (lines 19-46), ``pack_tensors`` (lines 60-130), ``packed_nccl_broadcast_producer`` (lines
136-179) and ``packed_nccl_broadcast_consumer`` (lines 182-281); the same code is unchanged in 0.26.0 to 0.33.0
except for cached CUDA streams (0.30), which do not touch the bytes. The CUDA streams are dropped (CPU); every
line that decides which bytes go into which chunk is kept as it is, ``torch.cat`` included. ``group`` is
duck-typed: ``broadcast(tensor, src)`` returning a work with ``wait()`` (vLLM's PyNccl broadcast is enqueued and
ordered by streams; on CPU the work is waited at once, which orders the same way).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


def unpack_tensor(packed_tensor: torch.Tensor, names: list[str], shapes: list[list[int]],
                  dtypes: list[torch.dtype], tensor_sizes: list[int]) -> list[tuple[str, torch.Tensor]]:
    unpacked_tensors = packed_tensor.split(tensor_sizes)
    return [
        (name, tensor.contiguous().view(dtype).view(*shape))
        for name, shape, dtype, tensor in zip(names, shapes, dtypes, unpacked_tensors, strict=False)
    ]


@dataclass
class PackedChunk:
    packed_tensor: torch.Tensor
    names: list[str]
    shapes: list[list[int]]
    dtypes: list[torch.dtype]
    tensor_sizes: list[int]


def pack_tensors(iterator: Iterator[tuple[str, torch.Tensor]], post_iter_func: Callable[[Any], torch.Tensor],
                 buffer_size_bytes: int) -> PackedChunk | None:
    tensor_list: list[torch.Tensor] = []
    names: list[str] = []
    shapes: list[list[int]] = []
    dtypes: list[torch.dtype] = []
    tensor_sizes: list[int] = []
    total_bytes = 0
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            break
        name, orig_tensor = item
        tensor = post_iter_func(item).contiguous().view(torch.uint8).view(-1)
        tensor_list.append(tensor)
        names.append(name)
        shapes.append(list(orig_tensor.shape))
        dtypes.append(orig_tensor.dtype)
        tensor_sizes.append(tensor.numel())
        total_bytes += tensor.numel()
        if total_bytes > buffer_size_bytes:
            break
    if not tensor_list:
        return None
    packed = torch.cat(tensor_list, dim=0)
    return PackedChunk(packed, names, shapes, dtypes, tensor_sizes)


def producer(iterator: Iterator[tuple[str, torch.Tensor]], group: Any, src: int, buffer_size_bytes: int) -> None:
    """``packed_nccl_broadcast_producer`` with ``post_iter_func = lambda x: x[1]`` (vLLM's default)."""
    while True:
        chunk = pack_tensors(iterator, lambda x: x[1], buffer_size_bytes)
        if chunk is None:
            break
        group.broadcast(chunk.packed_tensor, src).wait()


def consumer(iterator: Iterator[tuple[str, tuple[list[int], torch.dtype]]], group: Any, src: int,
             post_unpack_func: Callable[[list[tuple[str, torch.Tensor]]], None], buffer_size_bytes: int,
             num_buffers: int = 2, device: str = "cpu") -> None:
    target_packed_tensor_size = buffer_size_bytes
    buffer_idx = 0
    meta: list[list[tuple[str, list[int], torch.dtype, int]]] = [[] for _ in range(num_buffers)]
    sizes = [0 for _ in range(num_buffers)]
    packed_tensors = [torch.empty(0, dtype=torch.uint8, device=device) for _ in range(num_buffers)]

    def flush() -> None:
        packed_tensors[buffer_idx] = torch.empty(sizes[buffer_idx], dtype=torch.uint8, device=device)
        group.broadcast(packed_tensors[buffer_idx], src).wait()
        names, shapes, dtypes, tensor_sizes = zip(*meta[buffer_idx], strict=True)
        post_unpack_func(unpack_tensor(packed_tensors[buffer_idx], list(names), list(shapes), list(dtypes),
                                       list(tensor_sizes)))

    while True:
        meta[buffer_idx] = []
        sizes[buffer_idx] = 0
        try:
            while True:
                name, (shape, dtype) = next(iterator)
                tensor_size = math.prod(shape) * dtype.itemsize
                meta[buffer_idx].append((name, shape, dtype, tensor_size))
                sizes[buffer_idx] += tensor_size
                if sizes[buffer_idx] > target_packed_tensor_size:
                    break
            flush()
            buffer_idx = (buffer_idx + 1) % num_buffers
        except StopIteration:
            if len(meta[buffer_idx]) > 0:
                flush()
            break


def update_info_iterator(info: dict[str, Any]) -> Iterator[tuple[str, tuple[list[int], torch.dtype]]]:
    """``NCCLWeightTransferEngine.receive_weights``' ``state_dict_info_iterator`` (nccl_engine.py, 0.25.1)."""
    for name, dtype_name, shape in zip(info["names"], info["dtype_names"], info["shapes"], strict=True):
        yield name, (shape, getattr(torch, dtype_name))


#: The fields vLLM's dataclasses accept (``NCCLWeightTransferInitInfo``, ``NCCLWeightTransferUpdateInfo``), from
#: ``nccl_common.py`` / ``nccl_engine.py`` of each wheel: an unknown key is a TypeError in the worker.
INIT_FIELDS = {
    (0, 25): {"master_address", "master_port", "rank_offset", "world_size"},
    (0, 28): {"master_address", "master_port", "rank_offset", "world_size", "packed", "packed_buffer_size_bytes",
              "packed_num_buffers"},
    (0, 30): {"master_address", "master_port", "rank_offset", "world_size", "nccl_unique_id_b64", "packed",
              "packed_buffer_size_bytes", "packed_num_buffers"},
}
UPDATE_FIELDS = {
    (0, 25): {"names", "dtype_names", "shapes", "packed", "packed_buffer_size_bytes", "packed_num_buffers"},
    (0, 28): {"names", "dtype_names", "shapes"},
    (0, 30): {"names", "dtype_names", "shapes"},
}

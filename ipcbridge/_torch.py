"""The private torch APIs ipcbridge depends on, each behind one named function that says why.

Note [private torch APIs]
    Sharing a storage's memory with another process is what ``torch.multiprocessing`` does, but only
    through its pickler; ipcbridge speaks JSON (no pickle), so it calls the same storage methods the
    pickler's ``reduce_storage``/``rebuild_storage`` call. They are private and may change in any release:
    - :func:`share_cuda` / :func:`open_shared_cuda`: ``UntypedStorage._share_cuda_()`` and
      ``UntypedStorage._new_shared_cuda(*args)``, the 8-tuple of a CUDA IPC export (torch's
      ``reduce_storage``/``rebuild_cuda_tensor``), and ``torch.cuda._lazy_init()`` before opening one;
    - :func:`share_fd_cpu`: ``UntypedStorage._share_fd_cpu_()``, the (fd, nbytes) of a /dev/shm storage;
    - :func:`storage_key`: ``UntypedStorage._cdata``, the StorageImpl's address, the one identity that
      survives ``share_memory_()`` moving the bytes (``data_ptr()`` changes);
    - :func:`module_buffers`: ``nn.Module._buffers``, to move buffers without ``Module.to()``, which would
      also re-assign parameters that must stay views of an engine's memory;
    - :func:`tensor_version`: ``Tensor._version``, the in-place write counter the step guard reads.
    A release that drops one fails the CPU contract test (``tests/test_torch_private.py``) loudly, and a
    changed tuple raises ``BridgeError`` naming ``torch.__version__`` instead of unpacking garbage.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ipcbridge.errors import BridgeError

#: Items of ``UntypedStorage._share_cuda_()``: device, handle, nbytes, offset, ref-counter handle and
#: offset, event handle, event-sync flag.
CUDA_SHARE_ARITY = 8


def _arity(result: Any, expected: int, what: str) -> tuple[Any, ...]:
    if not isinstance(result, tuple) or len(result) != expected:
        n = len(result) if isinstance(result, tuple) else type(result).__name__
        raise BridgeError(
            f"{what} returned {n} items where ipcbridge expects {expected}: torch {torch.__version__} changed "
            "this private API (Note [private torch APIs]). Use a torch release ipcbridge supports, or upgrade "
            "ipcbridge"
        )
    return result


def share_cuda(storage: torch.UntypedStorage) -> tuple[Any, ...]:
    """The CUDA IPC export of ``storage``: the 8 items torch's own ``reduce_storage`` sends."""
    return _arity(storage._share_cuda_(), CUDA_SHARE_ARITY, "UntypedStorage._share_cuda_()")


def open_shared_cuda(args: tuple[Any, ...]) -> torch.UntypedStorage:
    """Open a CUDA IPC export (``args`` in :func:`share_cuda`'s order, device first) in this process."""
    _arity(args, CUDA_SHARE_ARITY, "the CUDA IPC export")
    torch.cuda._lazy_init()  # _new_shared_cuda does not initialise CUDA itself
    return torch.UntypedStorage._new_shared_cuda(*args)


def share_fd_cpu(storage: torch.UntypedStorage) -> tuple[int, int]:
    """(fd, nbytes) of a CPU storage already in shared memory (the ``file_descriptor`` strategy)."""
    fd, nbytes = _arity(storage._share_fd_cpu_(), 2, "UntypedStorage._share_fd_cpu_()")
    return int(fd), int(nbytes)


def storage_key(storage: torch.UntypedStorage) -> int:
    """The identity of ``storage``'s StorageImpl, stable across ``share_memory_()``."""
    return int(storage._cdata)


def module_buffers(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """``module``'s own buffers, as the live dict (assigning an item replaces the buffer)."""
    return module._buffers


def tensor_version(t: torch.Tensor) -> int:
    """torch's in-place write counter of ``t`` (shared by every view of its memory made without ``.data``).

    ``Tensor._version`` is what autograd's "modified by an inplace operation" check reads; torch has no
    public accessor. The step guard uses it to see writes made outside ``update()``.
    """
    return int(t._version)

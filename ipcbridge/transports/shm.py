"""CPU transport: POSIX shared memory, mapped by another process through ``/proc/<pid>/fd/<fd>``.

Note [CPU export moves storages into /dev/shm]
    A plain CPU tensor lives in private anonymous memory that no other process can map. ``reduce_storage``
    calls torch's own ``UntypedStorage.share_memory_()``, which copies the bytes into a fresh ``/dev/shm``
    file and swaps the storage's data pointer *in place*, so every tensor and view of that storage
    (parameters, fused-tensor row slices) follows it; nothing else of the producer changes. This is what
    ``Module.share_memory()`` does. Do it once, before handing out views: a tensor created afterwards from
    a stale ``data_ptr`` would not follow.

Note [why /proc/<pid>/fd and not a named file]
    torch creates the shm file and unlinks it at once, keeping only the file descriptor: the memory is
    freed by the kernel when the last process unmaps it, so a crashed engine or trainer can never leak a
    file in /dev/shm. Another process of the same user opens the very same file through the producer's
    ``/proc/<pid>/fd/<fd>`` link and maps it ``MAP_SHARED``; after that the mapping outlives the producer.
    The inode number guards against the producer having closed that fd and reused the number.

Ownership: the producer owns the memory; a consumer's views stay valid (and keep the memory alive) until
the consumer drops them, even if the producer exits. Writes from either side are visible to the other
immediately (same physical pages); ordering is the fence protocol's job, not this module's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ipcbridge._torch import share_fd_cpu
from ipcbridge.errors import BridgeError, ManifestError
from ipcbridge.wire import check_int, check_keys

KIND = "shm"


@dataclass(frozen=True)
class Spec:
    """A shared-memory storage: the producer's fd number, the file's inode, and the byte range."""

    kind: ClassVar[str] = KIND
    pid: int
    fd: int
    inode: int
    nbytes: int

    def __post_init__(self) -> None:
        check_int(self.pid, "shm.pid", minimum=1)
        check_int(self.fd, "shm.fd")
        check_int(self.inode, "shm.inode")
        check_int(self.nbytes, "shm.nbytes")

    @property
    def path(self) -> str:
        return f"/proc/{self.pid}/fd/{self.fd}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, "pid": self.pid, "fd": self.fd, "inode": self.inode, "nbytes": self.nbytes}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Spec:
        check_keys(d, {"kind", "pid", "fd", "inode", "nbytes"}, set(), where)
        try:
            return cls(pid=d["pid"], fd=d["fd"], inode=d["inode"], nbytes=d["nbytes"])
        except ManifestError as e:
            raise ManifestError(f"{where}: {e}") from None


def reduce_storage(storage: torch.UntypedStorage) -> Spec:
    """Share ``storage`` (moving it into /dev/shm in place if needed) and describe it. See the Notes."""
    if storage.device.type != "cpu":
        raise ManifestError(f"shm transport takes CPU storages, got {storage.device}")
    if not storage.is_shared():
        storage.share_memory_()
    try:
        fd, nbytes = share_fd_cpu(storage)
    except RuntimeError as e:
        raise BridgeError(
            f"this CPU storage is shared with torch's 'file_system' strategy and has no fd ({e}); call "
            "torch.multiprocessing.set_sharing_strategy('file_descriptor') before creating the weights"
        ) from e
    return Spec(pid=os.getpid(), fd=fd, inode=os.fstat(fd).st_ino, nbytes=nbytes)


def rebuild_storage(spec: Spec) -> torch.UntypedStorage:
    """Map the producer's shared memory. The result aliases the producer's bytes."""
    try:
        st = os.stat(spec.path)
    except FileNotFoundError:
        raise BridgeError(
            f"cannot open shared memory {spec.path}: process {spec.pid} has exited or closed it; "
            "ask the engine for a fresh manifest (engine.manifest()) and attach again"
        ) from None
    except PermissionError:
        raise BridgeError(
            f"permission denied opening {spec.path}: the engine runs as another user; run the trainer "
            "as the same user as the engine"
        ) from None
    if st.st_ino != spec.inode:
        raise BridgeError(
            f"{spec.path} is no longer the exported memory (inode {st.st_ino} != {spec.inode}): the "
            "engine released those weights; ask it for a fresh manifest"
        )
    if st.st_size < spec.nbytes:
        raise BridgeError(f"{spec.path} holds {st.st_size} bytes, fewer than the {spec.nbytes} exported")
    return torch.UntypedStorage.from_file(spec.path, shared=True, nbytes=spec.nbytes)

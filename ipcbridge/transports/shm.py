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
    The inode number guards against the producer having closed that fd and reused the number; it is the
    manifest's word, so it is compared but never trusted alone (Note [the trust model] in
    :mod:`ipcbridge.transports.provenance` lists what is checked before anything is mapped).

Ownership: the producer owns the memory; a consumer's views stay valid (and keep the memory alive) until
the consumer drops them, even if the producer exits. Writes from either side are visible to the other
immediately (same physical pages); ordering is the fence protocol's job, not this module's.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ipcbridge._torch import share_fd_cpu
from ipcbridge.errors import BridgeError, ManifestError
from ipcbridge.transports import provenance
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


class Claim:
    """One storage that passed every provenance check, held open by this process until it is mapped.

    ``fd`` is *our* descriptor of the producer's object: it is what was checked and what gets mapped (through
    ``/proc/self/fd``, which nobody else can re-point), so nothing can be swapped in between.
    """

    def __init__(self, spec: Spec, fd: int) -> None:
        self.spec = spec
        self.fd: int | None = fd

    def open(self) -> torch.UntypedStorage:
        """Map the checked object. The mapping keeps the memory; the descriptor is closed either way."""
        if self.fd is None:
            raise BridgeError(f"{self.spec.path} was already mapped or released; open the manifest again")
        try:
            return torch.UntypedStorage.from_file(f"/proc/self/fd/{self.fd}", shared=True, nbytes=self.spec.nbytes)
        finally:
            self.close()

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def claim(spec: Spec, producer: int, where: str = "shm storage", *, checked: set[str] | None = None) -> Claim:
    """Check that ``spec`` is shared memory of process ``producer`` and open it (Note [the trust model] in
    :mod:`ipcbridge.transports.provenance`). Nothing is mapped; ``BridgeError`` names what was wrong.

    ``checked`` is the transports' common argument and unused here: every shm storage is an object of its
    own, checked on the descriptor that is then mapped, so nothing carries over from one to the next."""
    provenance.storage_pid(spec.pid, producer, f"{where} ({spec.path})")
    st = _stat(spec)
    if not stat.S_ISREG(st.st_mode):  # a pipe, socket or device: never opened, opening can have effects
        raise _refused(spec, where, f"it is not a file (mode {stat.filemode(st.st_mode)})")
    try:
        fd = os.open(spec.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise BridgeError(f"cannot open shared memory {spec.path} ({e.strerror}); ask the engine for a fresh "
                          "manifest and attach again") from None
    try:
        _check_opened(spec, fd, producer, where)
    except BaseException:
        os.close(fd)
        raise
    return Claim(spec, fd)


def _stat(spec: Spec) -> os.stat_result:
    try:
        return os.stat(spec.path)
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


def _check_opened(spec: Spec, fd: int, producer: int, where: str) -> None:
    """The checks on the descriptor we opened: what it is, where it lives, who made it, how big it is."""
    st = os.fstat(fd)
    target = os.readlink(f"/proc/self/fd/{fd}")
    if not stat.S_ISREG(st.st_mode):
        raise _refused(spec, where, f"it is not a file (mode {stat.filemode(st.st_mode)})")
    if not provenance.on_tmpfs(st.st_dev):
        raise _refused(spec, where, f"{target!r} is not on a tmpfs: mapping it would write to a file on disk")
    if st.st_nlink != 0 or not provenance.torch_shm_target(target, producer):
        raise _refused(
            spec, where, f"it is {target!r}, not an unlinked shared-memory object that torch made in process {producer} "
            f"(/dev/shm/torch_{producer}_..., unlinked at once)"
        )
    if st.st_ino != spec.inode:
        raise BridgeError(
            f"{spec.path} is no longer the exported memory (inode {st.st_ino} != {spec.inode}): the "
            "engine released those weights; ask it for a fresh manifest"
        )
    if st.st_size < spec.nbytes:
        raise BridgeError(f"{spec.path} holds {st.st_size} bytes, fewer than the {spec.nbytes} exported; ask the "
                          "engine for a fresh manifest")


def _refused(spec: Spec, where: str, why: str) -> BridgeError:
    return BridgeError(
        f"{where}: refusing to map {spec.path}: {why}. A manifest may only map its producer's own shared memory; this one "
        "was not written by ipcbridge.export for that process. Attach to the engine itself (ipcbridge.connect("
        "engine)) or to a fresh engine.manifest(); see docs/security.md"
    )


def rebuild_storage(spec: Spec, producer: int | None = None) -> torch.UntypedStorage:
    """Map the producer's shared memory (after :func:`claim`'s checks). The result aliases its bytes.

    ``producer`` is the manifest's producer pid; ``None`` takes the storage's own (the checks that the
    object is torch's, unlinked and on tmpfs still apply).
    """
    return claim(spec, spec.pid if producer is None else producer).open()

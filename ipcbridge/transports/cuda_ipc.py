"""CUDA transport: legacy CUDA IPC memory handles, through torch's own storage sharing.

Note [the whole segment is shared]
    ``cudaIpcGetMemHandle`` names a whole ``cudaMalloc`` allocation, and torch's caching allocator carves
    many tensors out of one such segment. So a handle exposes the whole segment; ``offset_bytes`` says where
    this storage starts in it. A consumer can therefore *read* neighbouring tensors of the same segment;
    sharing is only for processes that already trust each other (one user, one machine). torch caches
    opened segments per process, so many storages from one segment map it once.

Note [IPC tensors must never be resized]
    A consumer's storage is a window onto the producer's segment. Resizing it (``resize_``,
    ``resize_token_embeddings``, ``set_`` to a larger size) would make torch allocate fresh local memory and
    silently stop aliasing, so the trainer would update a private copy the engine never sees. Attach
    checks every parameter's pointer lies inside an exported storage; ``Bridge.check()`` re-checks.

Note [the producer keeps the memory]
    torch's ref-counter file (``ref_counter_handle``/``offset``) tells the producer's caching allocator that
    a consumer still maps a block, so freeing the tensor in the producer does not hand the memory to another
    tensor while we hold it. The event (``event_handle``) orders our first use after the producer's last
    write at export time when ``event_sync_required``.

Note [devices by UUID]
    A device index means nothing across processes with different ``CUDA_VISIBLE_DEVICES``; the manifest
    carries the GPU UUID and the consumer opens the handle on whichever local index has that UUID.

Note [what a CUDA handle may be]
    Opening a handle makes torch act on the manifest's bytes, so each is checked first (Note [the trust
    model] in :mod:`ipcbridge.transports.provenance`): the memory handle must be torch's legacy kind (a
    version byte, ``'c'``, then the 64-byte ``cudaIpcMemHandle_t``); an expandable segment's handle (``'e'``)
    carries a pid and fds that torch would pull out of that process, and such memory cannot be aliased
    anyway. The ref-counter handle names a /dev/shm file that torch opens and *writes* (at
    ``ref_counter_offset``): it must be ``/torch_<producer pid>_<n>_<n>``, exist, live on a tmpfs and hold
    the slot, since an offset past the file's end would write outside the mapping.

Ownership: the producer (the engine) owns the memory. Consumer views stay valid while the consumer holds
them; drop them and call ``torch.cuda.ipc_collect()`` before the producer exits.
"""

from __future__ import annotations

import base64
import functools
import os
import re
import stat
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ipcbridge._torch import open_shared_cuda, share_cuda
from ipcbridge.errors import BridgeError, ManifestError
from ipcbridge.transports import provenance
from ipcbridge.wire import check_int, check_keys, check_type

KIND = "cuda_ipc"
#: torch's legacy memory handle: a version byte, the type ``'c'`` (``SHAREABLE_CUDA_MALLOC``), then the
#: 64-byte ``cudaIpcMemHandle_t`` (c10's ``CUDACachingAllocator::shareIpcHandle``).
MEM_HANDLE_TYPE = ord("c")
MEM_HANDLE_BYTES = 2 + 64
#: A ``cudaIpcEventHandle_t``.
EVENT_HANDLE_BYTES = 64
#: int64 slots of torch's ref-counter file (``CUDA_IPC_REF_COUNTER_FILE_SIZE``); torch writes slot
#: ``ref_counter_offset`` of it, so a larger offset would write past the mapping.
REF_COUNTER_SLOTS = 10000
#: A GPU UUID as torch reports it, after :func:`normalize_uuid` (MIG instances are not shareable).
_GPU_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _unb64(s: Any, where: str) -> bytes:
    check_type(s, str, where)
    try:
        return base64.b64decode(s.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as e:
        raise ManifestError(f"{where}: not valid base64 ({e})") from None


@dataclass(frozen=True)
class Spec:
    """One CUDA storage as :func:`ipcbridge._torch.share_cuda` returns it, plus the GPU's UUID."""

    kind: ClassVar[str] = KIND
    gpu_uuid: str
    device_index: int
    handle: bytes
    nbytes: int
    offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool

    def __post_init__(self) -> None:
        check_type(self.gpu_uuid, str, "cuda_ipc.gpu_uuid")
        if not _GPU_UUID.fullmatch(normalize_uuid(self.gpu_uuid)):
            raise ManifestError(f"cuda_ipc.gpu_uuid: {self.gpu_uuid[:60]!r} is not a GPU UUID (GPU-xxxxxxxx-xxxx-...)")
        check_int(self.device_index, "cuda_ipc.device_index")
        check_type(self.handle, bytes, "cuda_ipc.handle")
        _check_mem_handle(self.handle)
        check_int(self.nbytes, "cuda_ipc.nbytes")
        check_int(self.offset_bytes, "cuda_ipc.offset_bytes")
        check_type(self.ref_counter_handle, bytes, "cuda_ipc.ref_counter_handle")
        if provenance.torch_shm_name(self.ref_counter_handle.decode("ascii", "replace")) is None:
            raise ManifestError(
                f"cuda_ipc.ref_counter_handle: {self.ref_counter_handle[:60]!r} is not a torch ref-counter name "
                "(/torch_<pid>_<n>_<n>)"
            )
        check_int(self.ref_counter_offset, "cuda_ipc.ref_counter_offset", maximum=REF_COUNTER_SLOTS - 1)
        if self.event_handle is not None:
            check_type(self.event_handle, bytes, "cuda_ipc.event_handle")
            if len(self.event_handle) != EVENT_HANDLE_BYTES:
                raise ManifestError(f"cuda_ipc.event_handle: {len(self.event_handle)} bytes, expected "
                                    f"{EVENT_HANDLE_BYTES} (a cudaIpcEventHandle_t)")
        check_type(self.event_sync_required, bool, "cuda_ipc.event_sync_required")

    @property
    def ref_counter_pid(self) -> int:
        """The process that made the ref-counter file (its pid is in the name torch gives it)."""
        pid = provenance.torch_shm_name(self.ref_counter_handle.decode("ascii", "replace"))
        if pid is None:  # unreachable: __post_init__ refused such a name
            raise ManifestError(f"cuda_ipc.ref_counter_handle: {self.ref_counter_handle[:60]!r} names no process")
        return pid

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": KIND, "gpu_uuid": self.gpu_uuid, "device_index": self.device_index,
            "handle": _b64(self.handle), "nbytes": self.nbytes, "offset_bytes": self.offset_bytes,
            "ref_counter_handle": _b64(self.ref_counter_handle), "ref_counter_offset": self.ref_counter_offset,
            "event_handle": None if self.event_handle is None else _b64(self.event_handle),
            "event_sync_required": self.event_sync_required,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Spec:
        fields = {"kind", "gpu_uuid", "device_index", "handle", "nbytes", "offset_bytes",
                  "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required"}
        check_keys(d, fields, set(), where)
        kw = {k: d[k] for k in fields - {"kind"}}
        kw["handle"] = _unb64(d["handle"], f"{where}.handle")
        kw["ref_counter_handle"] = _unb64(d["ref_counter_handle"], f"{where}.ref_counter_handle")
        if d["event_handle"] is not None:
            kw["event_handle"] = _unb64(d["event_handle"], f"{where}.event_handle")
        try:
            return cls(**kw)
        except ManifestError as e:
            raise ManifestError(f"{where}: {e}") from None


def _check_mem_handle(handle: bytes) -> None:
    """Note [what a CUDA handle may be]: torch's legacy ``'c'`` handle, nothing else."""
    kind = chr(handle[1]) if len(handle) > 1 else "?"
    if kind == "e":
        raise ManifestError(
            "cuda_ipc.handle: an expandable segment's handle (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True); "
            "its memory cannot be aliased and opening it would pull file descriptors out of the process it names. "
            "Start the engine without expandable_segments"
        )
    if len(handle) != MEM_HANDLE_BYTES or handle[1] != MEM_HANDLE_TYPE:
        raise ManifestError(
            f"cuda_ipc.handle: {len(handle)} bytes of type {kind!r}, expected torch's legacy CUDA IPC handle "
            f"({MEM_HANDLE_BYTES} bytes, type 'c'); use the same torch and ipcbridge in the engine and the trainer"
        )


def normalize_uuid(uuid: object) -> str:
    return str(uuid).lower().removeprefix("gpu-")


@functools.cache
def _uuid_to_index() -> dict[str, int]:
    return {normalize_uuid(torch.cuda.get_device_properties(i).uuid): i for i in range(torch.cuda.device_count())}


def device_uuid(index: int) -> str:
    return normalize_uuid(torch.cuda.get_device_properties(index).uuid)


def local_device_index(gpu_uuid: str) -> int:
    """This process's index of the GPU with ``gpu_uuid``. See Note [devices by UUID]."""
    if not torch.cuda.is_available():
        raise BridgeError(
            "the manifest holds CUDA IPC handles but this process sees no CUDA device; run the trainer on "
            "the engine's machine with its GPU visible"
        )
    index = _uuid_to_index().get(normalize_uuid(gpu_uuid))
    if index is None:
        raise BridgeError(
            f"GPU {gpu_uuid} is not visible to this process (visible: {sorted(_uuid_to_index())}); set "
            "CUDA_VISIBLE_DEVICES so the engine's GPU is visible, or stream instead: ipcbridge.stream(engine, model)"
        )
    return index


def reduce_storage(storage: torch.UntypedStorage) -> Spec:
    """Describe ``storage`` with a CUDA IPC handle. See Note [the whole segment is shared]."""
    try:
        (device, handle, nbytes, offset_bytes, ref_handle, ref_offset, event_handle, event_sync) = share_cuda(storage)
    except RuntimeError as e:
        raise BridgeError(
            f"torch could not export this CUDA storage through IPC ({e}). Memory from vLLM's sleep mode "
            "(cumem allocator) or from PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True cannot be shared "
            "with legacy CUDA IPC: start the engine without them, or stream: ipcbridge.stream(engine, model), which feeds sleep-mode engines on the same GPU through a shared buffer"
        ) from e
    return Spec(
        gpu_uuid=device_uuid(device),
        device_index=int(device),
        handle=bytes(handle),
        nbytes=int(nbytes),
        offset_bytes=int(offset_bytes),
        ref_counter_handle=bytes(ref_handle),
        ref_counter_offset=int(ref_offset),
        event_handle=None if event_handle is None else bytes(event_handle),
        event_sync_required=bool(event_sync),
    )


def _new_shared_cuda_args(spec: Spec, local_index: int) -> tuple[Any, ...]:
    """Arguments of :func:`ipcbridge._torch.open_shared_cuda`, in the order of ``share_cuda``'s result.

    Position 0 is the storage *device*: it must be this process's index of the GPU (Note [devices by
    UUID]), never the producer's ``device_index``; otherwise a trainer with another CUDA_VISIBLE_DEVICES
    would open the handle on the wrong GPU and fail, or worse, succeed on a peer-mapped one.
    """
    return (
        local_index, spec.handle, spec.nbytes, spec.offset_bytes, spec.ref_counter_handle,
        spec.ref_counter_offset, spec.event_handle, spec.event_sync_required,
    )


class Claim:
    """A CUDA storage that passed the provenance checks, and the local device to open it on."""

    def __init__(self, spec: Spec, local_index: int) -> None:
        self.spec = spec
        self.local_index = local_index

    def open(self) -> torch.UntypedStorage:
        """Open the producer's IPC handle. A process cannot open its own handles (CUDA refuses)."""
        spec, index = self.spec, self.local_index
        try:
            with torch.cuda.device(index):
                return open_shared_cuda(_new_shared_cuda_args(spec, index))
        except RuntimeError as e:
            raise BridgeError(
                f"could not open the CUDA IPC handle of GPU {spec.gpu_uuid} ({e}); the engine may have exited "
                "or freed its weights: ask it for a fresh manifest. Processes in different containers need a "
                "shared IPC namespace (docker --ipc=host)"
            ) from e

    def close(self) -> None:
        """Nothing is held before the handle is opened."""


def claim(spec: Spec, producer: int, where: str = "cuda_ipc storage", *, checked: set[str] | None = None) -> Claim:
    """Check ``spec`` against Note [what a CUDA handle may be] for process ``producer``, and find the local
    device with its GPU UUID. Opens nothing; ``BridgeError`` names what was wrong.

    ``checked``: the ref-counter files this open already checked (Note [one check per ref-counter file]).
    """
    provenance.storage_pid(spec.ref_counter_pid, producer, f"{where} (its ref-counter file)")
    path = "/dev/shm" + spec.ref_counter_handle.decode("ascii")
    if checked is None or path not in checked:
        _check_ref_counter_file(path, producer, where)
        if checked is not None:
            checked.add(path)
    return Claim(spec, local_device_index(spec.gpu_uuid))


# Note [one check per ref-counter file]
#     A producer's storages share its ref-counter files (10000 slots each: every storage of an 8B model
#     names the same one), so the file is checked once per manifest open, not once per storage. What is
#     checked of a file (a regular file on a tmpfs, big enough for every slot) does not depend on the
#     storage, and the storage's own facts (whose file it is, its slot) are still checked per storage; the
#     file is opened by torch by name after all claims either way, so caching for the length of one open
#     leaves the window between check and use what it was.


def _check_ref_counter_file(path: str, producer: int, where: str) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise BridgeError(
            f"{where}: the ref-counter file {path} of process {producer} cannot be opened ({e.strerror}): the "
            "engine exited or freed those weights, or runs in another IPC namespace; ask it for a fresh manifest"
        ) from None
    if not stat.S_ISREG(st.st_mode) or not provenance.on_tmpfs(st.st_dev) or st.st_size < 8 * REF_COUNTER_SLOTS:
        raise BridgeError(
            f"{where}: {path} is not a torch ref-counter file (a {8 * REF_COUNTER_SLOTS}-byte file on tmpfs): "
            "this manifest was not written by ipcbridge.export; attach to a fresh engine.manifest()"
        )


def rebuild_storage(spec: Spec, producer: int | None = None) -> torch.UntypedStorage:
    """Open the producer's IPC handle after :func:`claim`'s checks (``producer``: the manifest's producer
    pid; ``None`` takes the one the ref-counter file names)."""
    return claim(spec, spec.ref_counter_pid if producer is None else producer).open()
